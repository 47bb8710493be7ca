"""umT5 encoder and tokenizer: structure, checkpoints, padding semantics, tokenization.

Tolerances: checkpoint round trips and padding zeros are exact (torch.equal / == 0); prompt outputs
against a different padding length, and the fp32 model against an independent float64 reference,
agree to atol 1e-5 / 1e-4 (fp32 sums over different lengths are not bit-identical).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from turbotrt.models.checkpoint import CheckpointError
from turbotrt.models.t5 import (
    T5Encoder,
    build_t5,
    fp16_clamp,
    get_t5_config,
    load_t5,
    relative_position_bucket,
    relative_positions,
)
from turbotrt.core.tokenizer import Tokenizer, clean_text

TINY = get_t5_config("umt5-tiny")


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    words = ["a", "cat", "dog", "runs", "over", "the", "green", "hill", "under", "blue", "sky", "slowly",
             "camera", "pans", "left", "night", "city", "lights", "river", "flows", "bird", "flies"]
    syllables = [c + v for c in "bdgklmnprstvz" for v in "aeiou"]  # made-up words widen the vocabulary
    words += ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines))
    # T5's special ids: <pad>=0, </s>=1, <unk>=2, no BOS.
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return d / "spiece.model"


@pytest.fixture(scope="module")
def tok(sp_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ftfy may be absent
        return Tokenizer(sp_model, text_len=512)


def tiny_model(dtype=torch.float32, seed=0) -> T5Encoder:
    torch.manual_seed(seed)
    m = build_t5(TINY, "cpu")
    with torch.no_grad():  # non-trivial norm and position weights, so swapped roles would show
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for b in m.blocks:
            b.pos_embedding.embedding.weight.normal_(0, 1)
    return m.to(dtype)


def ids_and_mask(lengths, total, vocab=TINY.vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Configs and structure


def test_get_t5_config_error_lists_presets():
    assert get_t5_config("umt5-xxl").num_layers == 24
    with pytest.raises(ValueError, match="umt5-xxl.*umt5-tiny"):
        get_t5_config("umt5-xl")


def test_full_preset_on_meta_has_5_7b_params():
    m = build_t5("umt5-xxl", "meta")
    n = sum(p.numel() for p in m.parameters())
    # embedding + 24 x (4 attn projections + 3 ffn matrices + 2 norms + 32x64 bucket table) + final norm
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64
    assert n == 256384 * 4096 + 24 * per_layer + 4096 == 5_680_910_336
    assert all(p.is_meta for p in m.parameters())


def test_state_dict_keys_are_wan_layout():
    keys = set(build_t5(TINY, "meta").state_dict())
    per_block = {"norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
                 "pos_embedding.embedding.weight"}
    want = {"token_embedding.weight", "norm.weight"} | {f"blocks.{i}.{k}" for i in range(2) for k in per_block}
    assert keys == want


def test_relative_position_buckets_hand_table():
    # key - query -> bucket, 32 buckets, max distance 128 (keys after the query use buckets 16..31).
    table = {0: 0, 1: 17, -1: 1, 7: 23, -7: 7, 8: 24, -8: 8, 11: 24, 12: 25, -12: 9, 15: 25, 16: 26,
             -16: 10, 22: 26, 23: 27, 31: 27, 32: 28, -45: 12, 46: 29, -63: 13, 64: 30, -90: 14, 91: 31,
             -91: 15, 127: 31, 128: 31, -511: 15, 511: 31}
    rel = torch.tensor(list(table))
    assert relative_position_bucket(rel, 32, 128).tolist() == list(table.values())
    # The [Lq, Lk] table is key index minus query index.
    r = relative_positions(3, 4)
    assert r.tolist() == [[0, 1, 2, 3], [-1, 0, 1, 2], [-2, -1, 0, 1]]


def test_fp16_clamp_mirrors_upstream_guard():
    bound = float(torch.tensor(65504 - 1000, dtype=torch.float16))  # 64504 rounds to 64512 in fp16
    x = torch.tensor([1.0, 65000.0, float("inf"), -float("inf")], dtype=torch.float16)
    assert fp16_clamp(x).tolist() == [1.0, bound, bound, -bound]
    y = torch.tensor([1.0, 65000.0], dtype=torch.float16)  # no inf: untouched, as upstream
    assert torch.equal(fp16_clamp(y), y)
    z = torch.tensor([float("inf")], dtype=torch.bfloat16)
    assert torch.equal(fp16_clamp(z), z)


# ---------------------------------------------------------------------------------------------
# Numerics


def ref_bucket(r: int) -> int:
    # T5 bidirectional bucket in double precision: 16 per direction, 8 exact, log-spaced to 128.
    a = abs(r)
    return (16 if r > 0 else 0) + (a if a < 8 else min(15, 8 + int(math.log(a / 8) / math.log(16) * 8)))


def reference_forward(m: T5Encoder, ids, mask):
    """Independent float64 restatement of Wan's encoder: trim to the prompt, run, zero-pad."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    h, d = TINY.num_heads, TINY.head_dim

    def norm(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    out = torch.zeros(*ids.shape, TINY.dim, dtype=torch.float64)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        x = sd["token_embedding.weight"][ids[i, :n]]
        pos = torch.arange(n)
        rel = pos[None, :] - pos[:, None]
        for j in range(TINY.num_layers):
            p = f"blocks.{j}."
            bucket = torch.tensor([[ref_bucket(r) for r in row] for row in rel.tolist()])
            bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)
            y = norm(x, sd[p + "norm1.weight"])
            q, k, v = ((y @ sd[p + f"attn.{c}.weight"].T).view(n, h, d).transpose(0, 1) for c in "qkv")
            att = torch.softmax(q @ k.transpose(1, 2) + bias, -1) @ v
            x = x + att.transpose(0, 1).reshape(n, -1) @ sd[p + "attn.o.weight"].T
            y = norm(x, sd[p + "norm2.weight"])
            g = F.gelu(y @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
            x = x + ((y @ sd[p + "ffn.fc1.weight"].T) * g) @ sd[p + "ffn.fc2.weight"].T
        out[i, :n] = norm(x, sd["norm.weight"])
    return out


def test_encoder_matches_float64_reference():
    m = tiny_model()
    ids, mask = ids_and_mask([5, 20], 24)
    with torch.no_grad():
        y = m(ids, mask)
    ref = reference_forward(m, ids, mask)
    assert y.shape == (2, 24, TINY.dim) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_padding_is_zero_and_prompt_outputs_ignore_padding_length():
    m = tiny_model()
    lengths = [5, 9]
    ids, mask = ids_and_mask(lengths, TINY.text_len)
    with torch.no_grad():
        long = m(ids, mask)
        short = m(ids[:, :16], mask[:, :16])
        bare = m(ids[:1, :5], mask[:1, :5])  # no padding at all
    for i, n in enumerate(lengths):
        assert (long[i, n:] == 0).all() and (short[i, n:] == 0).all()
        assert long[i, :n].abs().min() > 0
        torch.testing.assert_close(long[i, :n], short[i, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long[0, :5], bare[0], atol=1e-5, rtol=1e-5)


def test_bf16_forward_is_finite_and_keeps_dtype():
    m = tiny_model(torch.bfloat16)
    ids, mask = ids_and_mask([7], 32)
    with torch.no_grad():
        y = m(ids, mask)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and (y[0, 7:] == 0).all()


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    m = tiny_model(torch.bfloat16)
    path = tmp_path / f"t5{suffix}"
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    loaded = load_t5(path)  # preset detected from shapes
    assert loaded.cfg.name == "umt5-tiny"
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ids, mask = ids_and_mask([4, 11], 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), m(ids, mask))


def test_mismatched_checkpoint_names_keys(tmp_path):
    sd = tiny_model().state_dict()
    del sd["blocks.1.ffn.fc2.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["blocks.0.attn.q.weight"] = torch.zeros(32, 64)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path / "bad.pth", "umt5-tiny")
    msg = str(e.value)
    assert "blocks.1.ffn.fc2.weight" in msg and "blocks.0.extra.weight" in msg and "blocks.0.attn.q.weight" in msg


def test_unknown_shapes_and_foreign_layout_are_rejected(tmp_path):
    sd = tiny_model().state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}  # one layer: no preset has it
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="no umT5 preset"):
        load_t5(tmp_path / "short.pth")
    torch.save({"shared.weight": torch.zeros(4, 4)}, tmp_path / "hf.pth")
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_t5(tmp_path / "hf.pth")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_pads_truncates_and_appends_eos(tok, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids, mask = tok(["the cat runs", "", "dog " * 600])
    assert ids.shape == mask.shape == (3, 512) and ids.dtype == mask.dtype == np.int64
    want = sp.encode("the cat runs") + [1]
    assert ids[0, : len(want)].tolist() == want and (ids[0, len(want):] == 0).all()
    assert mask[0].tolist() == [1] * len(want) + [0] * (512 - len(want))
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # empty prompt: just EOS
    long = sp.encode("dog " * 600)
    assert len(long) > 512
    assert ids[2, :511].tolist() == long[:511] and ids[2, 511] == 1 and mask[2].all()


def test_tokenizer_cleans_text_like_wan(tok):
    assert clean_text("  the\tcat \n\n runs\u3000over ") == "the cat runs over"
    assert clean_text("cat &amp;amp; dog") == "cat & dog"  # unescaped twice
    a, _ = tok("  the   cat\nruns ")
    b, _ = tok("the cat runs")
    assert np.array_equal(a, b)
    assert tok.encode("x") is not None and tok("the cat")[0].shape == (1, 512)


def test_tokenizer_errors(tmp_path, sp_model):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        Tokenizer(tmp_path)  # empty directory
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        (tmp_path / "tokenizer.json").write_text("{}")
        with pytest.raises(ImportError, match="tokenizers"):
            Tokenizer(tmp_path / "tokenizer.json")


def test_tokenizer_output_feeds_encoder(tok):
    m = tiny_model()
    ids, mask = tok(["the green hill", "a bird flies over the river at night"])
    with torch.no_grad():
        y = m(torch.from_numpy(ids), torch.from_numpy(mask))
    n = mask.sum(1)
    assert (y[0, n[0]:] == 0).all() and (y[1, n[1]:] == 0).all() and (y[1, : n[1]] != 0).any(-1).all()


def test_tokenizer_module_does_not_import_torch():
    code = "import sys, turbotrt.core.tokenizer; sys.exit(int('torch' in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root, env=env)
    assert r.returncode == 0, f"importing turbotrt.core.tokenizer pulled in torch\n{r.stderr}"
