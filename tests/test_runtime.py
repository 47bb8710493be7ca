import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from turbotrt.core.bundle import MANIFEST, Bundle, BundleError
from turbotrt.core.errors import TurbotrtError
from turbotrt.core.manifest import EngineEntry
from turbotrt.core.video import read_mp4
from turbotrt.runtime.pipeline import Pipeline

quiet = dict(log=lambda *_: None)
PROMPT = "a red bird flies over a river at night"


@pytest.fixture(scope="module")
def t2v_bundle(tiny_bundle):
    assert tiny_bundle.result("sagesla").passed
    return tiny_bundle("sagesla")


def _reference(bundle_path, mode="sla"):
    from turbotrt.validation import reference_pipeline

    return reference_pipeline(Bundle.load(bundle_path), mode)


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("steps", [1, 4])
def test_runtime_latents_equal_the_reference_pipeline(t2v_bundle, steps):
    out = Pipeline.from_bundle(t2v_bundle, backend="ort", **quiet)(PROMPT, seed=7, steps=steps)
    ref = _reference(t2v_bundle)(PROMPT, seed=7, steps=steps, noise="philox")
    # Same graphs' math in fp32 (ORT vs PyTorch kernels) and the same float64 sampler and noise:
    # ~1e-6 apart on latents of magnitude ~5. 1e-4 leaves room for summation order, nothing else.
    np.testing.assert_allclose(out.latents, ref.latents.numpy(), atol=1e-4, rtol=0)
    assert np.abs(out.frames.astype(int) - ref.frames.astype(int)).max() <= 1  # one rounding level
    other = Pipeline.from_bundle(t2v_bundle, backend="ort", **quiet)(PROMPT, seed=8, steps=steps)
    assert _cosine(other.latents, out.latents) < 0.99  # the seed matters: the comparison is not vacuous


def test_run_writes_an_mp4_with_the_right_frame_count(t2v_bundle, tmp_path):
    from click.testing import CliRunner

    from turbotrt.cli import main

    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(main, ["run", str(t2v_bundle), "--prompt", PROMPT, "--steps", "2", "--out", str(out),
                                  "--backend", "ort"])
    assert r.exit_code == 0, r.output
    assert read_mp4(out).shape == (17, 64, 128, 3)


def test_validate_bundle_end_to_end(t2v_bundle):
    from turbotrt.validation import validate_bundle

    result = validate_bundle(t2v_bundle, steps=2, **quiet)
    assert result.passed
    assert {r.network for r in result.graphs} == {"dit", "text_encoder", "vae_decode_first", "vae_decode_step"}
    assert result.end_to_end["latent_cosine"] > 0.9999 and result.end_to_end["video_psnr_db"] > 40
    assert result.skipped == []  # no engines in the bundle: nothing that could not run here


def test_runtime_does_not_import_torch(t2v_bundle):
    code = (f"import sys; from turbotrt.runtime.pipeline import Pipeline; "
            f"r = Pipeline.from_bundle({str(t2v_bundle)!r}, backend='ort', log=lambda *_: None)('a cat', steps=1); "
            f"assert 'torch' not in sys.modules, 'torch was imported'; print(r.frames.shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(17, 64, 128, 3)" in p.stdout


def _copy(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_file_is_refused(t2v_bundle, tmp_path):
    b = _copy(t2v_bundle, tmp_path)
    with open(b / "dit.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03")
    with pytest.raises(BundleError, match="dit.onnx.data changed since export"):
        Bundle.load(b)
    Bundle.load(b, verify=False)  # sizes and presence only: the user can opt out of hashing


def test_missing_file_and_wrong_schema_are_refused(t2v_bundle, tmp_path):
    b = _copy(t2v_bundle, tmp_path)
    (b / "vae_decode_step.onnx").unlink()
    with pytest.raises(BundleError, match="missing vae_decode_step.onnx"):
        Bundle.load(b, verify=False)
    m = json.loads((b / MANIFEST).read_text())
    m["schema_version"] = 1  # bundles of the first schema (numpy PCG64 noise) are refused, not misread
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 1, this turbotrt reads version 2; export it again"):
        Bundle.load(b)
    (b / MANIFEST).unlink()
    with pytest.raises(BundleError, match="not a turbotrt bundle"):
        Bundle.load(b)


def test_engine_for_another_gpu_is_refused(t2v_bundle):
    bundle = Bundle.load(t2v_bundle, verify=False)
    with pytest.raises(BundleError, match="no tensorrt engine for dit; run `turbotrt build"):
        bundle.engine("dit", "tensorrt", "sm_90", "10.13.0")
    entry = EngineEntry(file="engines/tensorrt/sm_89/dit.plan", flavour="tensorrt", target="sm_89",
                        library_version="10.13.0", sha256="0" * 64, bytes=1, attention="sagesla-plugin")
    bundle.manifest.engines = {"dit": [entry]}
    assert bundle.engine("dit", "tensorrt", "sm_89", "10.13.0").name == "dit.plan"
    assert bundle.engine("dit", "tensorrt", "sm_89", "10.13.0.35").name == "dit.plan"  # build number spelled out
    with pytest.raises(BundleError, match="built for sm_89 / tensorrt 10.13.0, but this machine has sm_90"):
        bundle.engine("dit", "tensorrt", "sm_90", "10.13.0")
    with pytest.raises(BundleError, match="--target sm_89"):
        bundle.engine("dit", "tensorrt", "sm_89", "11.4.0")
    with pytest.raises(BundleError, match="no tensorrt-rtx engine for dit; run `turbotrt build .* --runtime tensorrt-rtx"):
        bundle.engine("dit", "tensorrt-rtx", "sm_89", "1.7.1")  # one flavour's engine is not the other's
    # Engines built for portability say so in the manifest, and are then accepted.
    bundle.manifest.engines["dit"][0] = dataclasses.replace(entry, hardware_compatibility="ampere_plus",
                                                            version_compatible=True)
    assert bundle.engine("dit", "tensorrt", "sm_90", "10.14.1").name == "dit.plan"
    with pytest.raises(BundleError):
        bundle.engine("dit", "tensorrt", "sm_90", "11.0.0")  # version compatibility stays within a major version
    with pytest.raises(BundleError):
        bundle.engine("dit", "tensorrt", "sm_90", "10.12.0")  # and does not run on an older TensorRT


def test_trt_backend_without_tensorrt_is_a_clear_error(t2v_bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    with pytest.raises(TurbotrtError, match="needs the `tensorrt` package"):
        Pipeline.from_bundle(t2v_bundle, backend="trt", **quiet)
    msgs = []
    Pipeline.from_bundle(t2v_bundle, backend="auto", log=msgs.append)
    # says which, and why not each engine flavour
    assert "ONNX Runtime" in msgs[0] and "engines not used: tensorrt:" in msgs[0] and "tensorrt-rtx:" in msgs[0]


def test_wrong_inputs_to_the_pipeline(t2v_bundle):
    pipe = Pipeline.from_bundle(t2v_bundle, backend="ort", **quiet)
    with pytest.raises(ValueError, match="text-to-video"):
        pipe(PROMPT, image=np.zeros((64, 128, 3), np.uint8))
    with pytest.raises(ValueError, match="1 to 4"):
        pipe(PROMPT, steps=5)


def test_i2v_bundle_switches_experts_and_matches_the_reference(tiny_bundle):
    out = tiny_bundle("i2v")
    assert set(tiny_bundle.result("i2v").graphs) >= {"dit_high", "dit_low", "vae_encode_first", "vae_encode_step"}
    pipe = Pipeline.from_bundle(out, backend="ort", **quiet)
    image = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    got = pipe("a dog runs", seed=1, steps=4, image=image)
    ref = _reference(out, None)("a dog runs", seed=1, steps=4, image=image, noise="philox")
    # fp32 throughout; the VAE encoder's conditioning adds its own ~1e-6 differences.
    np.testing.assert_allclose(got.latents, ref.latents.numpy(), atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="exported for 128x64"):
        pipe("a dog runs", image=np.zeros((32, 32, 3), np.uint8))


def test_demo_command(tmp_path):
    from click.testing import CliRunner

    from turbotrt.cli import main

    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert read_mp4(tmp_path / "turbotrt-demo.mp4").shape[0] == 17
    Bundle.load(tmp_path / "turbotrt-demo-bundle")
    # The trained toy model: the video is the default prompt's ("a red circle moves right").
    assert "prompt check: red shape, moving right" in r.output and r.output.rstrip().endswith("pass")
