"""The C++ runtime (cpp/) against the Python runtime: the same bundles, prompts and seeds give the same
latents and frames, and bad bundles are refused with the same messages.

cpp/build.sh builds once per session (its outputs, in cpp/build/, make later runs quick). Where the
build is impossible the tests skip with the build script's reason, except under CI=true, where a
build that fails fails them: CI must really build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from turbotrt.core import noise, rcm
from turbotrt.core.bundle import Bundle, BundleError

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "cpp" / "build" / "bin"
PROMPT = "a red bird flies over a river at night"


@pytest.fixture(scope="session")
def cpp():
    """Build cpp/ (quick when already built) and return a runner of its programs."""
    ci = os.environ.get("CI") == "true"
    cmd = ["bash", str(ROOT / "cpp" / "build.sh"), "--python", sys.executable]
    if ci and hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--install-deps")  # a fresh CI machine has no -dev packages yet
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        proc, reason = None, f"cpp/build.sh could not run: {e}"
    if proc is None or proc.returncode != 0:
        if ci:
            pytest.fail(f"the C++ build failed under CI: {reason}")
        pytest.skip(f"the C++ runtime cannot be built here: {reason}")

    def run(program, *args, input=None, check=True):
        out = subprocess.run([str(BIN / program), *map(str, args)], capture_output=True, text=True, input=input,
                             timeout=300)
        if check and out.returncode != 0:
            raise AssertionError(f"{program} {' '.join(map(str, args))} failed ({out.returncode}): {out.stderr}")
        return out

    return run


@pytest.fixture(scope="module")
def t2v(tiny_bundle):
    return tiny_bundle("sagesla")  # what `turbotrt export wan-tiny --precision fp32` makes


@pytest.fixture(scope="module")
def i2v(tiny_bundle):
    return tiny_bundle("i2v")


# --- noise, schedule, tokenizer -------------------------------------------------------------------------

def test_philox_matches_random123_known_answers(cpp):
    # Random123's kat_vectors for philox4x32 with 10 rounds: counter, key -> output.
    kat = [("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
           ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
           ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1")]
    for ctr, key, want in kat:
        assert cpp("turbotrt_check", "philox", *ctr.split(), *key.split()).stdout.strip() == want
        py = noise.philox4x32_10(np.array([[int(w, 16) for w in ctr.split()]], np.uint32),
                                 tuple(int(w, 16) for w in key.split()))
        assert " ".join(f"{v:08x}" for v in py[0]) == want


def test_sha256_matches_hashlib(cpp, tmp_path):
    rng = np.random.default_rng(0)
    for n in (0, 55, 56, 63, 64, 65, 1_000_003):  # around the padding boundaries, and many blocks
        f = tmp_path / f"r{n}"
        f.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        digest, portable, _ = cpp("turbotrt_check", "sha256", f).stdout.split()
        assert digest == portable == hashlib.sha256(f.read_bytes()).hexdigest()


def test_noise_is_bit_identical_to_python(cpp, tmp_path):
    """Integers are exact; glibc's float64 log may differ from numpy's by an ulp (about 0.4% of values
    here), which changes the float32 result with probability ~1e-9 per such value: expect equality."""
    cases = [(0, 0, 1_000_001), (2**64 - 1, 1, 300_000), (2**32, 4, 300_000), (12345, 2, 7), (987654321987, 3, 1)]
    for seed, draw, count in cases:
        out = tmp_path / "noise.npy"
        cpp("turbotrt_check", "noise", seed, draw, count, out)
        got, want = np.load(out), noise.normal(seed, draw, count)
        assert got.dtype == np.float32 and got.shape == (count,)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (seed, draw)


def test_schedule_and_timestep_embedding_are_identical(cpp, tmp_path):
    for steps in range(1, rcm.MAX_STEPS + 1):
        for sigma_max in (80.0, 200.0):
            prefix = tmp_path / f"s{steps}"
            cpp("turbotrt_check", "schedule", steps, sigma_max, 256, prefix)
            times = rcm.rcm_times(steps, sigma_max)
            net = rcm.net_timesteps(times)
            assert np.array_equal(np.load(f"{prefix}.times.npy"), times)
            assert np.array_equal(np.load(f"{prefix}.net.npy"), net)
            assert np.array_equal(np.load(f"{prefix}.sin.npy"), rcm.timestep_sinusoid(net, 256))


PROMPTS = [
    PROMPT, "", "   ", "  tabs\tand\nnew lines\r\n and  spaces  ", "a \u201ccurly\u201d \u2018quote\u2019 \u201elow\u201f",
    "fish &amp; chips &lt;3 &amp;amp; more &nbsp;x", "<b>bold</b> &amp; a tag", "line &amp;\nthen < &amp; after",
    "x &copy; y", "\u4e00\u53ea\u732b\uff0c\u5728\u8349\u5730\u4e0a\uff01\uff08\u5954\u8dd1\uff09",
    "full\uff37\uff49\uff44\uff54\uff48 \uff76\uff80\uff76\uff85 \u3000space",
    "\ufb02u\ufb03e\ufb06 \u0149 \u01c4", "nbsp\u00a0here\u2028line\u2029para\u200bzw",
    "control\u0007chars\u000bvt\u001b[31mred\u001b[0m\u001cfs", "emoji \U0001f426 bird", "A & B &; &#;",
    "word " * 600,  # longer than text_len: truncated, EOS kept
]
# Where C++ cleans differently (mojibake, NFC, entities it does not know), it says so.
APPROXIMATE = ["caf\u00c3\u00a9", "e\u0301", "a\u0085b", "&eacute;t&eacute;", "\uff8a\uff9f", "&#128038;", "A&B"]


def test_tokenizer_matches_python(cpp, t2v):
    from turbotrt.core.tokenizer import Tokenizer, clean_text

    bundle = Bundle.load(t2v, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer(bundle.tokenizer, text_len=bundle.model.text_len)
    out = cpp("turbotrt_check", "tokenize", bundle.tokenizer, bundle.model.text_len, input=json.dumps(PROMPTS))
    for prompt, got in zip(PROMPTS, json.loads(out.stdout)):
        assert not got["approximate"], prompt
        assert got["clean"] == clean_text(prompt), prompt
        assert got["ids"] == tok(prompt)[0][0].tolist(), prompt
    out = cpp("turbotrt_check", "tokenize", bundle.tokenizer, 16, input=json.dumps(APPROXIMATE))
    assert all(r["approximate"] for r in json.loads(out.stdout))


# --- whole pipelines ------------------------------------------------------------------------------------

def _python_run(bundle, prompt, seed, steps, image=None, ode=False):
    from turbotrt.runtime.pipeline import Pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_bundle(bundle, backend="ort", log=lambda *_: None)
        return pipe(prompt, seed=seed, steps=steps, image=image, ode=ode)


def _compare(result, latents_path, frames_path):
    latents, frames = np.load(latents_path), np.load(frames_path)
    assert latents.shape == result.latents.shape and frames.shape == result.frames.shape
    # The same ONNX Runtime library computes the graphs; the float64 sampler rounds as numpy does.
    # 1e-5 leaves room for a last-ulp difference in a float64 math function (see the noise test).
    assert np.abs(latents - result.latents).max() <= 1e-5
    assert np.array_equal(frames, result.frames)


def test_text_to_video_matches_python(cpp, t2v, tmp_path):
    from turbotrt.core.video import read_mp4, write_mp4

    want = _python_run(t2v, PROMPT, seed=7, steps=4)
    out = cpp("turbotrt_run", t2v, "--prompt", PROMPT, "--seed", 7, "--steps", 4, "--out", tmp_path / "v.mp4",
              "--save-latents", tmp_path / "l.npy", "--save-frames", tmp_path / "f.npy")
    assert "backend: ONNX Runtime" in out.stdout and "wrote" in out.stdout
    _compare(want, tmp_path / "l.npy", tmp_path / "f.npy")
    # Every frame is in the mp4, and H.264 (crf 18) loses about as much as Python's writer does (the
    # tiny model's frames are noise, the hardest case for it).
    video = read_mp4(tmp_path / "v.mp4")
    assert video.shape == want.frames.shape
    python_video = read_mp4(write_mp4(want.frames, tmp_path / "python.mp4"))
    error = lambda v: np.abs(v.astype(np.float32) - want.frames).mean()  # noqa: E731
    assert error(video) <= error(python_video) + 1
    assert not list(tmp_path.glob(".*partial"))


def test_image_to_video_matches_python(cpp, i2v, tmp_path):
    bundle = Bundle.load(i2v, verify=False)
    h, w = bundle.profile.height, bundle.profile.width
    image = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[: h // 2, : w // 2] = (200, 30, 30)
    (tmp_path / "first.ppm").write_bytes(b"P6\n%d %d\n255\n" % (w, h) + image.tobytes())
    want = _python_run(i2v, "a cat walks", seed=3, steps=3, image=image)
    cpp("turbotrt_run", i2v, "--prompt", "a cat walks", "--seed", 3, "--steps", 3, "--image", tmp_path / "first.ppm",
        "--out", tmp_path / "v.y4m", "--save-latents", tmp_path / "l.npy", "--save-frames", tmp_path / "f.npy")
    _compare(want, tmp_path / "l.npy", tmp_path / "f.npy")
    raw = (tmp_path / "v.y4m").read_bytes()
    t = want.frames.shape[0]
    assert raw.startswith(b"YUV4MPEG2 W%d H%d F16:1" % (w, h)) and raw.count(b"FRAME\n") == t
    # --ode: deterministic Euler steps instead of rCM's stochastic ones
    want = _python_run(i2v, "a cat walks", seed=3, steps=2, image=image, ode=True)
    cpp("turbotrt_run", i2v, "--prompt", "a cat walks", "--seed", 3, "--steps", 2, "--image", tmp_path / "first.ppm",
        "--ode", "--out", tmp_path / "v.y4m", "--save-latents", tmp_path / "l.npy", "--save-frames", tmp_path / "f.npy")
    _compare(want, tmp_path / "l.npy", tmp_path / "f.npy")


def test_run_errors_are_one_line(cpp, t2v, i2v, tmp_path):
    cases = [
        ((t2v, "--prompt", "x", "--seed", "-1"), "seed must be an integer in 0..2^64-1, got -1"),
        ((t2v, "--prompt", "x", "--steps", "5"), "--steps: 5 is not in the range 1<=x<=4"),
        ((i2v, "--prompt", "x"), "wan-tiny-i2v is image-to-video: pass an image"),
        ((t2v, "--prompt", "x", "--backend", "tensorflow"), "unknown backend 'tensorflow'; choose from auto, ort, trt"),
        ((tmp_path / "nowhere", "--prompt", "x"), f"{tmp_path / 'nowhere'} is not a folder (a bundle is the folder "
                                                  "`turbotrt export --out` wrote)"),
    ]
    for args, message in cases:
        out = cpp("turbotrt_run", *args, "--out", tmp_path / "v.mp4", check=False)
        assert out.returncode == 1 and out.stderr == f"Error: {message}\n", out.stderr


# --- refusals ---------------------------------------------------------------------------------------------

_DIGEST = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')


def _edit_manifest(bundle: Path, change, redigest: bool = True) -> None:
    """Apply change(dict) to manifest.json; with redigest, write a matching manifest_sha256 (so only
    the change itself is what a reader objects to)."""
    mf = bundle / "manifest.json"
    d = json.loads(mf.read_bytes())
    change(d)
    raw = (json.dumps(d, indent=2) + "\n").encode()
    if redigest:
        m = _DIGEST.search(raw)
        zeroed = raw[:m.start(1)] + b"0" * 64 + raw[m.end(1):]
        raw = zeroed[:m.start(1)] + hashlib.sha256(zeroed).hexdigest().encode() + zeroed[m.end(1):]
    mf.write_bytes(raw)


def _set(path: str, value):
    def change(d):
        *keys, last = path.split(".")
        for k in keys:
            d = d[k]
        d[last] = value
    return change


def _rename_file(old: str, new: str):
    def change(d):
        d["files"] = {(new if k == old else k): v for k, v in d["files"].items()}
    return change


def _break(case: str, b: Path) -> None:
    if case == "missing file":
        (b / "text_encoder.onnx.data").unlink()
    elif case == "changed file":
        with open(b / "vae_decode_step.onnx.data", "ab") as f:
            f.write(b"\0")
    elif case == "edited manifest":
        _edit_manifest(b, _set("precision", "fp16"), redigest=False)
    elif case == "schema version":
        _edit_manifest(b, _set("schema_version", 1))
    elif case == "schema version, not re-digested":
        _edit_manifest(b, _set("schema_version", "2"), redigest=False)
    elif case == "../ graph path":
        _edit_manifest(b, _set("graphs.dit.file", "../dit.onnx"))
    elif case == "../ in files":
        _edit_manifest(b, _rename_file("dit.onnx.data", "tokenizer/../../dit.onnx.data"))
    elif case == "absolute tokenizer path":
        _edit_manifest(b, _set("tokenizer", "/etc/passwd"))
    elif case == "absolute data path":
        _edit_manifest(b, _set("graphs.dit.data", "/tmp/dit.onnx.data"))
    elif case == "symlink":
        (b / "tokenizer" / "spiece.model").unlink()
        (b / "tokenizer" / "spiece.model").symlink_to(b / "dit.onnx")
    elif case == "symlinked manifest":
        (b / "manifest.json").rename(b.parent / "elsewhere.json")
        (b / "manifest.json").symlink_to(b.parent / "elsewhere.json")
    elif case == "no manifest":
        (b / "manifest.json").unlink()
        (b.parent / (b.name + ".partial")).mkdir()
    elif case == "no digest":
        _edit_manifest(b, lambda d: d.pop("manifest_sha256"), redigest=False)
    else:
        raise ValueError(case)


REFUSALS = ["missing file", "changed file", "edited manifest", "schema version", "schema version, not re-digested",
            "../ graph path", "../ in files", "absolute tokenizer path", "absolute data path", "symlink",
            "symlinked manifest", "no manifest", "no digest"]


def test_bad_bundles_are_refused_with_pythons_messages(cpp, t2v, tmp_path):
    for i, case in enumerate(REFUSALS):
        b = tmp_path / f"b{i}" / "bundle"
        shutil.copytree(t2v, b)
        _break(case, b)
        with pytest.raises(BundleError) as want:
            Bundle.load(b)
        got = cpp("turbotrt_check", "load", b, check=False)
        assert got.returncode == 1, case
        assert got.stderr == f"{want.value}\n", case
        if i == 0:  # and the example says it in one line
            out = cpp("turbotrt_run", b, "--prompt", "x", "--out", tmp_path / "v.mp4", check=False)
            assert out.returncode == 1 and out.stderr == f"Error: {want.value}\n"
    # --no-verify skips the hashes and the digest, as in Python; paths and symlinks are still refused.
    b = tmp_path / "nv" / "bundle"
    shutil.copytree(t2v, b)
    _break("changed file", b)
    _edit_manifest(b, _set("lint", {"edited": ["by hand"]}), redigest=False)
    Bundle.load(b, verify=False)
    assert cpp("turbotrt_check", "load", b, "--no-verify").stdout == "ok\n"


def test_engine_refusals_name_the_rebuild_command(cpp, t2v, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(t2v, b)
    plan = b / "engines" / "tensorrt" / "sm_89" / "dit.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"not really a plan")
    digest = hashlib.sha256(plan.read_bytes()).hexdigest()
    entry = dict(file="engines/tensorrt/sm_89/dit.plan", flavour="tensorrt", target="sm_89", library_version="10.9.0.34",
                 sha256=digest, bytes=plan.stat().st_size, attention="sagesla-plugin", hardware_compatibility="none",
                 version_compatible=True, details={})

    def add(d):
        d["engines"] = {"dit": [entry]}
        d["files"]["engines/tensorrt/sm_89/dit.plan"] = digest
    _edit_manifest(b, add)
    bundle = Bundle.load(b)
    queries = [("dit", "tensorrt", "sm_89", "10.9.0.34"), ("dit", "tensorrt", "sm_90", "10.9.0.34"),
               ("dit", "tensorrt", "sm_89", "10.8.0.40"), ("dit", "tensorrt", "sm_89", "10.11.0.33"),
               ("dit", "tensorrt", "sm_89", "11.0.0.1"), ("dit", "tensorrt-rtx", "sm_89", "1.0.0"),
               ("text_encoder", "tensorrt", "sm_89", "10.9.0.34")]
    for query in queries:
        got = cpp("turbotrt_check", "engine", b, *query, check=False)
        try:
            want = f"{bundle.engine(*query)}\n"
            assert got.returncode == 0 and got.stdout == want, query
        except BundleError as e:
            assert got.returncode == 1 and got.stderr == f"{e}\n", query


def test_a_tokenizer_cpp_cannot_read_is_refused(cpp, t2v, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(t2v, b)
    tok = b / "tokenizer" / "spiece.model"
    tok.write_bytes(b"this is not a sentencepiece model")
    _edit_manifest(b, lambda d: d["files"].update({"tokenizer/spiece.model": hashlib.sha256(tok.read_bytes()).hexdigest()}))
    Bundle.load(b)  # the bundle itself is consistent
    out = cpp("turbotrt_run", b, "--prompt", "x", "--out", tmp_path / "v.mp4", check=False)
    assert out.returncode == 1
    assert out.stderr.startswith(f"Error: {tok}: sentencepiece's C++ library cannot read this tokenizer")
    assert out.stderr.count("\n") == 1


def test_bf16_bundle_on_the_cpu_provider_is_refused_as_in_python(cpp, t2v, tmp_path):
    from turbotrt.core.errors import TurbotrtError
    from turbotrt.runtime.backends import OrtBackend

    b = tmp_path / "bundle"
    shutil.copytree(t2v, b)
    _edit_manifest(b, _set("precision", "bf16"))
    with pytest.raises(TurbotrtError) as want:
        OrtBackend(Bundle.load(b))
    out = cpp("turbotrt_run", b, "--prompt", "x", "--backend", "ort", "--out", tmp_path / "v.mp4", check=False)
    assert out.returncode == 1 and out.stderr == f"Error: {want.value}\n"
