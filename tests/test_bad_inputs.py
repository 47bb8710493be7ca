"""Bad input, table by table: hand-edited bundles, wrong files, unwritable or occupied outputs.

Every case asserts the message (one line, no traceback), the exit code (1, or 2 for usage
errors), that nothing is left behind, and, for bundles, that nothing outside the bundle was read:
the edits below are made as an attacker would, re-sealing the manifest's digest and re-hashing
files, so only the path rules and bounds stand in the way. A canary file outside the bundle has
a content whose hash we know; no message may confirm or deny it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from turbotrt.cli import main
from turbotrt.core.bundle import Bundle
from turbotrt.core.errors import BundleError, TurbotrtError
from turbotrt.core.manifest import MANIFEST, sealed_json

CANARY = b"outside the bundle\n"


def _cli(*args, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r.exit_code, r.output


def _one_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.startswith("Error:")]
    assert lines, output
    assert "Traceback" not in output and "internal error" not in output, output
    return lines[-1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Edited:
    """A copy of a bundle to edit as an attacker would: the manifest re-sealed, files re-hashed."""

    def __init__(self, src: Path, dst: Path):
        self.root = Path(shutil.copytree(src, dst))
        self.outside = dst.parent / "outside.txt"
        self.outside.write_bytes(CANARY)

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text())

    def write(self, m: dict, rehash=()) -> "Edited":
        for rel in rehash:
            m["files"][rel] = _sha(self.root / rel)
        (self.root / MANIFEST).write_bytes(sealed_json(m))
        return self

    def edit(self, change) -> "Edited":
        m = self.manifest
        change(m)
        return self.write(m)


@pytest.fixture(scope="module")
def t2v(tiny_bundle):
    return tiny_bundle("sagesla")


def _escape(m, key_path, value):
    d = m
    for k in key_path[:-1]:
        d = d[k]
    d[key_path[-1]] = value


@pytest.mark.parametrize("change,message", [
    (lambda m: m["files"].update({"../outside.txt": hashlib.sha256(CANARY).hexdigest()}),
     "files: '../outside.txt' is not a plain relative path"),
    (lambda m: m["files"].update({"/etc/hostname": "0" * 64}), "files: '/etc/hostname' is not a plain relative path"),
    (lambda m: _escape(m, ["graphs", "dit", "file"], "../outside.txt"), "graphs.dit.file: '../outside.txt'"),
    (lambda m: _escape(m, ["graphs", "dit", "data"], "/dev/zero"), "graphs.dit.data: '/dev/zero'"),
    (lambda m: m.update(tokenizer="/etc/hostname"), "tokenizer: '/etc/hostname'"),
    (lambda m: m["graphs"].update({"../../../outside/pwned": m["graphs"]["dit"]}),
     "graph name: '../../../outside/pwned' is not a plain name"),
    (lambda m: _escape(m, ["graphs", "dit", "spec", "inputs", 0, "shape"], [1, 16, 5, 8, 16000000]),
     "x has shape [1, 16, 5, 8, 16000000], but model wan-tiny at tiny-16x9-17f implies [1, 16, 5, 8, 16]"),
    (lambda m: _escape(m, ["graphs", "text_encoder", "spec", "inputs", 0, "shape"], [1, 10**9]),
     "ids has shape [1, 1000000000]"),
    (lambda m: _escape(m, ["model", "text_len"], 10**9), "the model differs from preset 'wan-tiny' in text_len"),
    (lambda m: _escape(m, ["profile", "frames"], 10**6), "profile: frames must be of the form 4k+1"),
    (lambda m: _escape(m, ["graphs", "vae_decode_step", "spec", "outputs", 1, "shape"], [1, 16, 2, 10**5, 10**4]),
     "larger than profile tiny-16x9-17f allows"),
    (lambda m: m.pop("model"), "manifest lacks 'model'"),
    (lambda m: m["sampler"].update(noise="pcg64"), "noise generator pcg64"),
])
def test_hand_edited_manifests_are_refused(t2v, tmp_path, change, message):
    b = Edited(t2v, tmp_path / "b").edit(change)
    for verify in (True, False):  # paths and bounds are checked even without --no-verify's hashing
        with pytest.raises(BundleError, match=_re(message)):
            Bundle.load(b.root, verify=verify)
    code, out = _cli("run", b.root, "--prompt", "a cat", "--out", tmp_path / "v.mp4", "--backend", "ort")
    line = _one_line(out)
    assert code == 1 and message in line and not (tmp_path / "v.mp4").exists()
    assert hashlib.sha256(CANARY).hexdigest() not in out


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_manifest_that_is_not_an_object_or_was_edited(t2v, tmp_path):
    b = Edited(t2v, tmp_path / "b")
    raw = (b.root / MANIFEST).read_bytes()
    (b.root / MANIFEST).write_bytes(raw.replace(b'"frames": 17', b'"frames": 21'))  # a hand edit, not re-sealed
    with pytest.raises(BundleError, match="changed since it was written .* --no-verify"):
        Bundle.load(b.root)
    (b.root / MANIFEST).write_text("[1, 2, 3]")
    code, out = _cli("run", b.root, "--prompt", "a cat", "--out", tmp_path / "v.mp4")
    assert code == 1 and "is not a JSON object" in _one_line(out)


def test_symlinks_in_a_bundle_are_refused(t2v, tmp_path):
    b = Edited(t2v, tmp_path / "b")
    shutil.rmtree(b.root / "tokenizer")
    outside_tok = tmp_path / "tok"
    shutil.copytree(t2v / "tokenizer", outside_tok)
    os.symlink(outside_tok, b.root / "tokenizer")  # same bytes, so the hashes would pass
    with pytest.raises(BundleError, match="tokenizer.*symlink"):
        Bundle.load(b.root)
    code, out = _cli("validate", b.root)
    assert code == 1 and "symlink" in _one_line(out)


def _point_external_data(graph: Path, location: str, length: int | None) -> None:
    model = onnx.load(str(graph), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e for e in t.external_data}
    entries["location"].value = location
    if length is None:
        t.external_data.remove(entries["length"])
    graph.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("location,length,message", [
    ("../outside.txt", len(CANARY), "keeps its data in '../outside.txt', not in the graph's own data file"),
    ("/dev/zero", None, "keeps its data in '/dev/zero'"),
    ("tokenizer/spiece.model", 16, "keeps its data in 'tokenizer/spiece.model'"),
])
def test_external_data_outside_the_graphs_data_file_is_never_read(t2v, tmp_path, location, length, message):
    b = Edited(t2v, tmp_path / "b")
    _point_external_data(b.root / "dit.onnx", location, length)
    b.write(b.manifest, rehash=["dit.onnx"])  # the attacker also fixes the hash: it still must not be read
    for args in (("calibrate", b.root, "--out", tmp_path / "q", "--no-eval"),
                 ("build", b.root, "--dry-run", "--target", "sm_90"),
                 ("validate", b.root),
                 ("run", b.root, "--prompt", "a cat", "--out", tmp_path / "v.mp4", "--backend", "ort")):
        code, out = _cli(*args)
        assert code == 1 and message in _one_line(out), (args, out)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()
    assert not (tmp_path / "v.mp4").exists()


def test_tampered_bundles_are_refused_by_every_command(t2v, tmp_path):
    b = Edited(t2v, tmp_path / "b")
    with open(b.root / "dit.onnx.data", "r+b") as f:
        f.seek(4096)
        f.write(b"\x7f" * 8)
    for args in (("run", b.root, "--prompt", "a cat", "--out", tmp_path / "v.mp4"),
                 ("calibrate", b.root, "--out", tmp_path / "q", "--no-eval"),
                 ("build", b.root, "--dry-run", "--target", "sm_90"),
                 ("bench", b.root, "--repeat", "1"),
                 ("validate", b.root)):
        code, out = _cli(*args)
        assert code == 1 and "dit.onnx.data changed since export" in _one_line(out), (args, out)
    assert not (tmp_path / "q").exists()


def test_truncated_data_with_no_verify_is_one_line(t2v, tmp_path):
    b = Edited(t2v, tmp_path / "b")
    data = b.root / "dit.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, out = _cli("run", b.root, "--prompt", "a cat", "--out", tmp_path / "v.mp4", "--no-verify", "--backend", "ort")
    line = _one_line(out)
    assert code == 1 and "dit.onnx: tensor" in line and "truncated or edited" in line
    assert not (tmp_path / "v.mp4").exists()


# --- outputs -----------------------------------------------------------------------------------------------

def test_force_replaces_only_a_bundle_and_only_when_the_new_one_is_complete(t2v, tmp_path, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    code, out = _cli("export", "wan-tiny", "--out", user, "--precision", "fp32", "--force")
    assert code == 1 and "is not a turbotrt bundle; --force only replaces a bundle" in _one_line(out)
    assert (user / "thesis.txt").read_text() == "years of work" and not (tmp_path / "mine.partial").exists()
    # An existing bundle survives a replacement that fails half-way (here: calibration without text).
    old = Edited(t2v, tmp_path / "old").root
    before = (old / MANIFEST).read_bytes()
    import turbotrt.calibration.api as calib

    def boom(*a, **k):
        raise TurbotrtError("calibration failed half-way")

    monkeypatch.setattr(calib, "_calibrate", boom)
    code, out = _cli("export", "wan-tiny", "--out", old, "--precision", "int8", "--force")
    assert code == 1 and "calibration failed half-way" in _one_line(out)
    assert (old / MANIFEST).read_bytes() == before and not (tmp_path / "old.partial").exists()
    Bundle.load(old)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import turbotrt.export.onnx_io as io

    real = io.ExternalDataWriter.append

    def full(self, tp, raw):
        if self.file.tell() > 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp_data))
        return real(self, tp, raw)

    monkeypatch.setattr(io.ExternalDataWriter, "append", full)
    code, out = _cli("export", "wan-tiny", "--out", tmp_path / "b", "--precision", "fp32", "--no-validate")
    assert code == 1 and "no space left on the device" in _one_line(out)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_outputs_are_refused_before_any_work(t2v, tmp_path, monkeypatch):
    import turbotrt.core.files as files

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    started = time.perf_counter()
    code, out = _cli("run", t2v, "--prompt", "a cat", "--out", tmp_path / "v.mp4", "--backend", "ort")
    assert code == 1 and "cannot write into" in _one_line(out) and "Read-only file system" in out
    code, out = _cli("export", "wan-tiny", "--out", tmp_path / "b", "--precision", "fp32")
    assert code == 1 and "cannot write into" in _one_line(out)
    assert time.perf_counter() - started < 30 and list(tmp_path.iterdir()) == []


def test_run_does_not_overwrite_and_needs_a_prompt(t2v, tmp_path):
    out_file = tmp_path / "v.mp4"
    out_file.write_bytes(b"my video")
    code, out = _cli("run", t2v, "--prompt", "a cat", "--out", out_file)
    assert code == 1 and "exists; pass --force" in _one_line(out) and out_file.read_bytes() == b"my video"
    code, out = _cli("run", t2v, "--prompt", "  ", "--out", tmp_path / "w.mp4")
    assert code == 2 and "the prompt is empty" in out
    code, out = _cli("run", t2v, "--prompt", "a cat", "--seed", "-1", "--out", tmp_path / "w.mp4")
    assert code == 2 and "--seed" in out
    code, out = _cli("run", t2v, "--prompt", "a cat", "--out", tmp_path)
    assert code == 2 and "is a directory" in out
    code, out = _cli("run", t2v, "--prompt", "a cat", "--image", out_file, "--out", tmp_path / "w.mp4")
    assert code == 2 and "text-to-video: it takes no --image" in out


def test_i2v_image_is_checked_before_any_work(tiny_bundle, tmp_path):
    i2v = tiny_bundle("i2v")
    code, out = _cli("run", i2v, "--prompt", "a dog", "--out", tmp_path / "v.mp4")
    assert code == 2 and "pass the first frame with --image" in out
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    code, out = _cli("run", i2v, "--prompt", "a dog", "--image", not_image, "--out", tmp_path / "v.mp4")
    assert code == 2 and "is not a readable image" in out
    import av

    small = tmp_path / "small.png"
    with av.open(str(small), "w", format="image2") as f:
        s = f.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 32, 16, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 32, 3), np.uint8), format="rgb24")):
            f.mux(p)
        for p in s.encode():
            f.mux(p)
    code, out = _cli("run", i2v, "--prompt", "a dog", "--image", small, "--out", tmp_path / "v.mp4")
    assert code == 2 and "is 32x16; the bundle was exported for 128x64" in out
    assert not (tmp_path / "v.mp4").exists()


# --- sources and options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,code,message", [
    (("export", "wan-tiny", "--frames", "0"), 1, "frames must be of the form 4k+1"),
    (("export", "wan-tiny", "--target", "sm_75"), 1, "unsupported target 'sm_75'"),
    (("export", "wan-tiny", "--precision", "fp32", "--observer", "max"), 2, "--observer apply to --precision int8/fp8"),
    (("export", "wan2.1-t2v-14b"), 1, "is a full-size preset: give its checkpoint file"),
    (("calibrate", "wan2.1-t2v-1.3b"), 1, "is a full-size preset: give its checkpoint file"),
    (("export", "wan-tiny", "--tokenizer", "{ckpt}"), 1, "built-in tiny preset with its own seeded weights"),
    (("export", "{folder}"), 1, "is a folder, not a checkpoint file"),
    (("export", "{i2v}"), 1, "has two experts: pass the low-noise checkpoint with --low-noise"),
    (("export", "{ckpt}", "--low-noise", "{ckpt}"), 1, "--low-noise is for two-expert models"),
    (("inspect", "{folder}"), 1, "is a folder, not a checkpoint file"),
])
def test_bad_sources_and_options_fail_before_any_work(tmp_path, args, code, message):
    from turbotrt.core.configs import get_config
    from turbotrt.models.checkpoint import save_state_dict
    from turbotrt.models.wan import random_wan_state_dict

    ckpt = save_state_dict(random_wan_state_dict(get_config("wan-tiny"), dtype="bf16"), tmp_path / "c.safetensors")
    i2v = save_state_dict(random_wan_state_dict(get_config("wan-tiny-i2v"), dtype="bf16"), tmp_path / "i.safetensors")
    folder = tmp_path / "folder"
    folder.mkdir()
    args = [a.format(ckpt=ckpt, i2v=i2v, folder=folder) for a in args]
    if args[0] in ("export", "calibrate"):
        args += ["--out", str(tmp_path / "out")]
    got, out = _cli(*args)
    assert got == code and message in out, out
    if code == 1:
        _one_line(out)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_lying_safetensors_shapes_are_a_checkpoint_error(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "liar.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 16)
    code, out = _cli("inspect", path)
    assert code == 1 and "do not hold F32" in _one_line(out)


# --- interrupted runs --------------------------------------------------------------------------------------

def test_a_killed_runs_leftovers_are_removed_by_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = tmp_path / "b.partial"
    partial.mkdir()
    (partial / ".turbotrt-owner").write_text(dead.stdout)  # a pid that no longer runs
    (partial / "dit.onnx.data").write_bytes(b"\0" * 1024)
    code, out = _cli("export", "wan-tiny", "--out", tmp_path / "b", "--precision", "fp32", "--no-validate")
    assert code == 0, out
    assert f"removing {partial}, left by an earlier run that was interrupted" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_sigterm_during_export_removes_the_partial_bundle(tmp_path):
    out = tmp_path / "b"
    code = (f"from turbotrt.export.api import export; "
            f"export('wan-tiny', {str(out)!r}, precision='fp32', validate=False, log=lambda m: None)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "b.partial").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and list(tmp_path.iterdir()) == []
