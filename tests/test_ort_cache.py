"""ONNX Runtime sessions started from the optimized models kept in the user cache, and all at once."""

import shutil

import numpy as np
import pytest

from turbotrt.core.bundle import Bundle
from turbotrt.runtime.backends import BackendError, OrtBackend, OrtSession
from turbotrt.runtime.pipeline import Pipeline

PROMPT = "a red bird flies over a river at night"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOTRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("turbotrt.core.cache._warned", set())
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def sla(tiny_bundle):
    return tiny_bundle("sla")


@pytest.fixture
def creations(monkeypatch):
    """The graphs optimized from the bundle (not loaded from the cache)."""
    seen = []
    create = OrtSession._create

    def counting(path, providers, cache):
        seen.append(path.name)
        return create(path, providers, cache)

    monkeypatch.setattr(OrtSession, "_create", staticmethod(counting))
    return seen


def _run(path, cache, notes=None):
    bundle = Bundle.load(path)
    backend = OrtBackend(bundle, ["CPUExecutionProvider"], cache=cache,
                         log=notes.append if notes is not None else (lambda *_: None))
    return Pipeline(bundle, backend)(PROMPT, seed=3, steps=2)


def _entries(cache):
    return sorted(p for p in (cache / "ort-optimized").iterdir()) if (cache / "ort-optimized").exists() else []


def test_cached_sessions_give_the_same_outputs(sla, cache, creations):
    plain = _run(sla, cache=False)
    assert len(creations) == 4 and _entries(cache) == []
    cold = _run(sla, cache=True)
    assert len(creations) == 8 and len(_entries(cache)) == 4
    warm = _run(sla, cache=True)
    assert len(creations) == 8  # every session came from the cache
    for other in (cold, warm):
        np.testing.assert_allclose(other.latents, plain.latents, atol=1e-6, rtol=0)
        assert np.array_equal(other.frames, plain.frames)
    assert not list((cache / "ort-optimized").glob(".*"))  # no temp folders left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "meta", "no model"])
def test_a_damaged_entry_is_discarded_and_rebuilt(sla, cache, creations, damage):
    want = _run(sla, cache=True).latents
    for entry in _entries(cache):
        if damage == "truncate":
            data = entry / "model.onnx.data"
            data.write_bytes(data.read_bytes()[:100])
        elif damage == "garbage":  # the same size, so only ONNX Runtime can tell
            model = entry / "model.onnx"
            model.write_bytes(b"\x00" * model.stat().st_size)
        elif damage == "meta":
            (entry / "meta.json").write_text("{")
        else:
            (entry / "model.onnx").unlink()
    creations.clear()
    notes = []
    got = _run(sla, cache=True, notes=notes).latents
    assert len(creations) == 4 and len(notes) == (0 if damage == "no model" else 4)
    assert all(n.startswith("discarding the cached optimized ") and "\n" not in n for n in notes)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    creations.clear()
    _run(sla, cache=True)
    assert creations == []  # rebuilt


def test_an_unverified_bundle_is_not_saved(sla, cache):
    bundle = Bundle.load(sla, verify=False)
    OrtBackend(bundle, ["CPUExecutionProvider"]).session("dit")
    assert _entries(cache) == []


def test_an_unwritable_cache_warns_once(sla, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TURBOTRT_CACHE", str(blocker / "cache"))
    monkeypatch.setattr("turbotrt.core.cache._warned", set())
    _run(sla, cache=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "verification stamps" in err[0] and "optimized ONNX Runtime graphs" in err[1]


def test_sessions_start_together_and_failures_keep_their_message(sla, tmp_path, cache, monkeypatch, creations):
    bundle = Bundle.load(sla)
    backend = OrtBackend(bundle, ["CPUExecutionProvider"])
    pipe = Pipeline(bundle, backend)
    started = []
    session = backend.session
    monkeypatch.setattr(backend, "session", lambda n: started.append(n) or session(n))
    pipe.start_sessions()
    pipe._starting.shutdown(wait=True)
    assert sorted(started) == sorted(bundle.networks)
    monkeypatch.setenv("TURBOTRT_CACHE", str(tmp_path / "empty-cache"))  # nothing optimized yet
    b = tmp_path / "damaged"
    shutil.copytree(sla, b)
    graph = b / "vae_decode_step.onnx"
    graph.write_bytes(b"\x00" * graph.stat().st_size)
    pipe = Pipeline.from_bundle(b, backend="ort", verify=False, log=lambda *_: None)
    creations.clear()
    with pytest.raises(BackendError, match=r"^ONNX Runtime cannot load vae_decode_step.onnx: .*verification on"):
        pipe(PROMPT, steps=1)
    assert creations.count("vae_decode_step.onnx") == 1  # failed in the background, raised where used


def test_intra_op_threads_sleep_unless_told_to_spin(monkeypatch):
    from turbotrt.runtime.backends import session_options

    monkeypatch.delenv("TURBOTRT_ORT_SPINNING", raising=False)
    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv("TURBOTRT_ORT_SPINNING", "1")
    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    monkeypatch.setenv("TURBOTRT_ORT_SPINNING", "yes")
    with pytest.raises(BackendError, match="TURBOTRT_ORT_SPINNING='yes': set it to 1"):
        session_options()


def test_a_save_that_fails_still_gives_a_session(sla, tmp_path, cache, monkeypatch, capsys):
    """ONNX Runtime fails the whole session when it cannot write the optimized model (a full disk)."""
    from turbotrt.runtime import ort_cache

    configure = ort_cache._Saving.configure

    def unwritable(self, opts):
        configure(self, opts)
        opts.optimized_model_filepath = str(tmp_path / "gone" / "model.onnx")

    monkeypatch.setattr(ort_cache._Saving, "configure", unwritable)
    got = _run(sla, cache=True).latents
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot keep optimized ONNX Runtime graphs" in err[0]
    assert _entries(cache) == [] and not list((cache / "ort-optimized").glob(".*"))
    np.testing.assert_allclose(got, _run(sla, cache=False).latents, atol=1e-6, rtol=0)
