"""The README's Python snippets and its quantization commands, run as written (on tiny inputs).

Python blocks run in a fresh interpreter each, in a folder holding the demo bundle they name. The
quantization block runs command by command through the CLI, with the real file names swapped for
tiny stand-ins written here (a tiny DiT checkpoint, umT5 and VAE checkpoints, a tokenizer) and the
480p/81-frame profile for the tiny one: what a newcomer would type, at a size CI can afford.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from turbotrt.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str, after: str | None = None) -> list[str]:
    text = README.read_text()
    if after is not None:
        text = text[text.index(after):]
        text = text[: text.index("\n## ", 1)]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_snippets_run(index, tiny_bundle, tmp_path):
    shutil.copytree(tiny_bundle("sagesla"), tmp_path / "turbotrt-demo-bundle")
    code = _blocks("python")[index]
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def _commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("turbotrt "):
            out.append(shlex.split(line)[1:])
    return out


def test_quantization_section_runs_as_written(tiny_bundle, tmp_path):
    from turbotrt.core.configs import get_config
    from turbotrt.core.tokenizer import make_tiny_tokenizer
    from turbotrt.models.checkpoint import save_state_dict
    from turbotrt.models.t5 import random_t5_state_dict
    from turbotrt.models.vae import random_vae_state_dict
    from turbotrt.models.wan import random_wan_state_dict

    cfg = get_config("wan-tiny")
    files = {
        "TurboWan2.1-T2V-1.3B-480P.pth": save_state_dict(random_wan_state_dict(cfg, seed=3), tmp_path / "dit.safetensors"),
        "models_t5_umt5-xxl-enc-bf16.pth": save_state_dict(random_t5_state_dict(cfg.text_encoder, 0), tmp_path / "t5.pth"),
        "Wan2.1_VAE.pth": save_state_dict(random_vae_state_dict(cfg.vae, 0), tmp_path / "vae.pth"),
        "spiece.model": make_tiny_tokenizer(tmp_path / "tok"),
    }
    shutil.copytree(tiny_bundle("sagesla"), tmp_path / "wan13b")
    (block,) = _blocks("bash", after="## INT8 and FP8")
    commands = _commands(block)
    assert [c[0] for c in commands] == ["calibrate", "validate", "export"]
    swap = {**{k: str(v) for k, v in files.items()}, "480p": "tiny", "81": "17"}
    for args in commands:
        args = [str(tmp_path / a) if a.startswith("wan13b") else swap.get(a, a) for a in args]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, (args, r.output[-3000:])
    for out in ("wan13b-int8", "wan13b-fp8"):
        from turbotrt.core.bundle import Bundle

        b = Bundle.load(tmp_path / out)
        assert b.manifest.quantization is not None and set(b.networks) >= {"dit", "text_encoder", "vae_decode_step"}
