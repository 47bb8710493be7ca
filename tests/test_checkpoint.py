import pickle

import pytest
import torch

from turbotrt.models.checkpoint import (
    CheckpointError,
    inspect_checkpoint,
    load_wan,
    normalize_wan_state_dict,
    read_state_dict,
    save_state_dict,
)
from turbotrt.core.configs import get_config
from turbotrt.models.wan import random_wan_state_dict


@pytest.fixture(scope="module")
def tiny_sd():
    return random_wan_state_dict(get_config("wan-tiny"), seed=0, dtype="bf16")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_keeps_values_and_dtype(tmp_path, tiny_sd, suffix):
    path = save_state_dict(tiny_sd, tmp_path / f"tiny{suffix}")
    model = load_wan(path)
    assert model.config.name == "wan-tiny"
    loaded = model.state_dict()
    assert set(loaded) == set(tiny_sd)
    for k, v in tiny_sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert model.patch_embedding.weight.dtype == torch.bfloat16


def test_prefixed_and_conv3d_variants_normalise(tmp_path, tiny_sd):
    c = get_config("wan-tiny")
    sd = {("net." + k): v for k, v in tiny_sd.items()}
    sd["net.patch_embedding.weight"] = tiny_sd["patch_embedding.weight"].view(c.dim, c.in_dim, 1, 2, 2)
    model = load_wan(save_state_dict(sd, tmp_path / "wrapped.pth"))
    assert torch.equal(model.patch_embedding.weight, tiny_sd["patch_embedding.weight"])


def test_quant_checkpoint_is_detected_and_loads(tmp_path):
    sd = random_wan_state_dict(get_config("wan-tiny"), seed=0, dtype="bf16", quantized=True)
    path = save_state_dict(sd, tmp_path / "tiny-quant.safetensors")
    info = inspect_checkpoint(path)
    assert info["preset"] == "wan-tiny" and info["quantization"].startswith("w8a8") and info["problems"] == []
    model = load_wan(path)
    assert type(model.blocks[0].self_attn.q).__name__ == "Int8Linear"
    assert type(model.blocks[0].self_attn.attn_op.local_attn.proj_l) is torch.nn.Linear  # proj_l stays float


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    sd["head.modulation"] = torch.zeros(1, 3, 256)
    with pytest.raises(CheckpointError) as e:
        load_wan(save_state_dict(sd, tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "blocks.1.ffn.2.bias" in msg and "blocks.1.extra.weight" in msg and "head.modulation" in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg


def test_wrong_preset_names_the_one_that_fits(tmp_path, tiny_sd):
    path = save_state_dict(tiny_sd, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="fit preset 'wan-tiny'"):
        load_wan(path, preset="wan-tiny-i2v")


def test_no_preset_fits(tmp_path, tiny_sd):
    sd = {k: v for k, v in tiny_sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match="no preset has these shapes.*num_layers': 1"):
        load_wan(save_state_dict(sd, tmp_path / "one-layer.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_checkpoint(tmp_path, tiny_sd, suffix):
    path = save_state_dict(tiny_sd, tmp_path / f"tiny{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="tiny"):
        load_wan(path)


def test_garbage_and_non_checkpoints(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="could not be read"):
        read_state_dict(junk)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")
    other = tmp_path / "w.bin"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        read_state_dict(other)
    notdit = save_state_dict({"encoder.weight": torch.zeros(2)}, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="does not look like a Wan DiT"):
        load_wan(notdit)


class Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"patch_embedding.weight": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_interrupted_save_leaves_nothing(tmp_path, tiny_sd, monkeypatch):
    import safetensors.torch

    def failing_save(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict(tiny_sd, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_normalize_is_views_only(tiny_sd):
    sd = normalize_wan_state_dict({"net." + k: v for k, v in tiny_sd.items()})
    assert all(sd[k].data_ptr() == tiny_sd[k].data_ptr() for k in tiny_sd)


def test_inspect_reports_facts(tmp_path, tiny_sd):
    path = save_state_dict(tiny_sd, tmp_path / "tiny.safetensors")
    info = inspect_checkpoint(path)
    assert info["preset"] == "wan-tiny" and info["dtype"] == "bfloat16" and info["quantization"] == "none"
    assert info["parameters"] == sum(v.numel() for v in tiny_sd.values())
    assert info["problems"] == []
    assert pickle.dumps(info)  # plain data, printable as JSON


def test_streamed_safetensors_equals_in_memory_state_dict(tmp_path):
    from turbotrt.models.checkpoint import write_safetensors_streaming
    from turbotrt.models.wan import random_wan_entries

    cfg = get_config("wan-tiny")
    for quant in (False, True):
        path = write_safetensors_streaming(random_wan_entries(cfg, 3, "bf16", quant), tmp_path / f"s{quant}.safetensors")
        ref = random_wan_state_dict(cfg, seed=3, dtype="bf16", quantized=quant)
        got = read_state_dict(path)
        assert list(got) == list(ref)
        assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    assert load_wan(path).config.name == "wan-tiny"


def test_random_tensors_depend_on_name_and_seed_only():
    from turbotrt.models.wan import random_tensor

    a = random_tensor("blocks.0.self_attn.q.weight", (4, 4), seed=1)
    assert torch.equal(a, random_tensor("blocks.0.self_attn.q.weight", (4, 4), seed=1))
    assert not torch.equal(a, random_tensor("blocks.0.self_attn.k.weight", (4, 4), seed=1))
    assert not torch.equal(a, random_tensor("blocks.0.self_attn.q.weight", (4, 4), seed=2))


def test_file_pages_release_only_file_backed_memory(tmp_path, tiny_sd):
    from turbotrt.models.checkpoint import FilePages

    path = save_state_dict(tiny_sd, tmp_path / "tiny.pth")
    sd = read_state_dict(path)
    pages = FilePages(path)
    key = "blocks.0.ffn.0.weight"
    before = sd[key].clone()
    assert pages.release(sd[key])  # mmap'd from the file: released
    assert torch.equal(sd[key], before)  # and re-read from the file when touched again
    anon = torch.randn(1000)
    copy = anon.clone()
    assert not pages.release(anon)  # anonymous memory is never released (it would read back as zeros)
    assert torch.equal(anon, copy)
