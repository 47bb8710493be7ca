"""Train the tiny presets on the toy videos: the VAE as an autoencoder, then the DiT as a 4-step model.

    python -m turbotrt.toy.train [--seed 0] [--vae-steps N] [--dit-steps N] [--stage all|vae|decoder|dit]

Single-threaded and deterministic from the seed; prints progress, writes the weights (in the real
checkpoints' key layouts) to turbotrt/toy/weights/ and the wall time and loss curves to
benchmarks/results/toy_training.json.

1. VAE (`wan-vae-tiny`, encoder and causal decoder): reconstruction loss on 9-frame, 64-pixel-wide
   windows of the videos (9 frames = 3 latent frames, so the decoder's caches see both the first-frame
   path and real history; the network is convolutional, so the full 128x64 clip decodes alike).
   Foreground pixels weigh more (the shape covers ~3% of a frame). Then the per-channel statistics of
   its latents are folded into conv1 (encoder out) and conv2 (decoder in), so the normalised latents
   the DiT sees have zero mean and unit variance per channel, as Wan's do for the real VAE. Last,
   the decoder alone (encoder frozen, so the latents stay put) on whole 17-frame clips.
2. umT5 (`umt5-tiny`) starts at its seeded random weights and stays frozen for the first DiT run
   (the 48 captions' embeddings are distinct: the log prints the closest pair); `--stage dit --resume
   --train-t5` then continues the DiT with umT5 trained too (the shipped weights had 1000 + 500 + 500
   steps). Colour is what the model learns last: blue/green and red/yellow latents are the closest
   pairs, and after 1500 steps blue still came out green and yellow red; after 2000, some yellows do.
3. DiT (`wan-tiny`, SLA attention as the preset configures it): trained directly as a few-step
   denoiser at exactly the rCM sampler's 4 steps (`turbotrt.core.rcm`): at step i the input is
   x = (1 - t_i) x0 + t_i eps (the first step: t_0 eps, as the sampler starts), the network sees the
   sampler's bf16-rounded timestep, and the loss is the x0 error of the sampler's own jump,
   |x - t_i v - x0|^2. So the runtime's SDE sampler (jump to x - t v, re-noise) gets the clean
   estimates it was trained to produce.

   Without a teacher, each step's x0 estimate is the mean over what the caption leaves open. When
   the shape may start anywhere, that mean is an empty frame, every step re-noises an empty frame and
   the samples end as faint stray blobs (tried: 3% of the grid passed). rCM avoids this by distilling
   a teacher's ODE, which maps each noise to one specific video. Here the DiT's videos are drawn with
   `dit_spread` 0.1 instead: one track per caption, a few pixels of jitter, so the mean is one sharp
   video. The VAE still trains on shapes anywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from turbotrt.core.configs import AttentionConfig, get_config
from turbotrt.core.rcm import net_timesteps, rcm_times
from turbotrt.toy.dataset import BACKGROUND, CAPTIONS, ToyConfig, ToyVideos, to_model_range
from turbotrt.toy.model import DIT_FILE, PRESET, T5_FILE, TOKENIZER_FILE, VAE_FILE, WEIGHTS_DIR

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "toy_training.json"


@dataclass
class TrainConfig:
    seed: int = 0
    videos: int = 768  # rendered once; the VAE trains on windows of them, the DiT on their latents
    vae_steps: int = 500
    vae_batch: int = 3
    vae_frames: int = 9
    vae_width: int = 64
    vae_lr: float = 2e-3
    # Then the decoder alone on whole 17-frame clips: its stacked causal convs see further back than
    # 3 latent frames, and without this the colour drifts on the last ones. The encoder is frozen, so
    # the latents (and a DiT trained on them) stay valid.
    decoder_steps: int = 200
    decoder_batch: int = 2
    decoder_lr: float = 5e-4
    decoder_latent_noise: float = 0.3  # the DiT's latents are off by more than the encoder's
    fg_weight: float = 10.0  # extra loss weight of foreground pixels
    latent_noise: float = 0.1  # decoder input noise (relative to the latents' std): robust to DiT errors
    dit_videos: int = 384
    dit_spread: float = 0.1  # see the module docstring: one track per caption, a few pixels of jitter
    dit_steps: int = 1000
    dit_batch: int = 16
    dit_lr: float = 4e-4
    ema: float = 0.995
    train_t5: bool = False  # the first DiT run keeps umT5 frozen; a --resume run may train it too
    warmup: int = 50
    log_every: int = 25


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class Curve:
    """Running-mean loss every `every` steps, with elapsed seconds, for the JSON record and the log."""

    def __init__(self, name: str, total: int, every: int, log: Callable[[str], None]):
        self.name, self.total, self.every, self.log = name, total, every, log
        self.points, self._acc, self._n, self.start = [], 0.0, 0, time.perf_counter()

    def add(self, step: int, loss: float) -> None:
        self._acc += loss
        self._n += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            mean, elapsed = self._acc / self._n, time.perf_counter() - self.start
            self.points.append(dict(step=step + 1, loss=round(mean, 6), seconds=round(elapsed, 1)))
            self.log(f"[{self.name}] step {step + 1}/{self.total} loss {mean:.5f} ({elapsed:.0f} s)")
            self._acc, self._n = 0.0, 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


# --- data ---------------------------------------------------------------------------------------


def render_pool(cfg: TrainConfig, dit: bool = False) -> tuple[np.ndarray, list[str]]:
    """The VAE's videos (shapes anywhere), or the DiT's (each caption's track, a little jitter)."""
    if dit:
        return ToyVideos(cfg.seed + 1, ToyConfig(spread=cfg.dit_spread)).batch(0, cfg.dit_videos)
    return ToyVideos(cfg.seed).batch(0, cfg.videos)


def _vae_batch(videos: np.ndarray, cfg: TrainConfig, rng: np.random.Generator, frames: int, batch: int) -> torch.Tensor:
    """Random windows (frames x width) of random videos, cropped around the shape: [B, 3, F, 64, W]."""
    bg = np.array(BACKGROUND, dtype=np.int16)
    out = []
    for i in rng.integers(len(videos), size=batch):
        t0 = int(rng.integers(videos.shape[1] - frames + 1))
        clip = videos[i, t0 : t0 + frames]
        fg = np.abs(clip.astype(np.int16) - bg).sum(-1) > 30
        cx = float(np.nonzero(fg.any(axis=(0, 1)))[0].mean()) if fg.any() else videos.shape[3] / 2
        x0 = int(np.clip(cx - cfg.vae_width / 2 + rng.integers(-16, 17), 0, videos.shape[3] - cfg.vae_width))
        out.append(clip[:, :, x0 : x0 + cfg.vae_width])
    return torch.from_numpy(to_model_range(np.stack(out)))


# --- VAE ----------------------------------------------------------------------------------------


def train_vae(cfg: TrainConfig, videos: np.ndarray, log: Callable[[str], None], vae=None):
    """The whole VAE from its seeded random init on short windows; or, given a `vae`, its decoder
    (conv2 + decoder) alone on whole clips."""
    from turbotrt.models.vae import build_vae, random_vae_state_dict

    if vae is None:
        name, frames, batch, steps, lr, seed = "vae", cfg.vae_frames, cfg.vae_batch, cfg.vae_steps, cfg.vae_lr, 1
        vae_name = get_config(PRESET).vae
        vae = build_vae(vae_name, "cpu")
        vae.load_state_dict(random_vae_state_dict(vae_name, cfg.seed))
        vae.train().requires_grad_(True)
        params = list(vae.parameters())
    else:
        name, frames, batch, steps, lr, seed = "vae-decoder", videos.shape[1], cfg.decoder_batch, cfg.decoder_steps, \
            cfg.decoder_lr, 3
        vae.train().requires_grad_(False)
        params = list(vae.conv2.parameters()) + list(vae.decoder.parameters())
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng([cfg.seed, seed])
    g = torch.Generator().manual_seed(cfg.seed + seed)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1, 1) / 127.5 - 1
    curve = Curve(name, steps, cfg.log_every, log)
    noise = cfg.latent_noise if name == "vae" else cfg.decoder_latent_noise
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, min(cfg.warmup, steps // 4))
        x = _vae_batch(videos, cfg, rng, frames, batch)
        z, _ = vae.encode_first(x)
        z = z + noise * z.detach().std() * torch.randn(z.shape, generator=g)
        y, _ = vae.decode_first(z)
        weight = 1 + cfg.fg_weight * ((x - bg).abs().sum(1, keepdim=True) > 0.2).float()
        loss = (weight * ((y - x).pow(2) + (y - x).abs())).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.add(step, loss.item())
    return vae.eval().requires_grad_(False), curve


@torch.no_grad()
def encode_pool(vae, videos: np.ndarray, batch: int = 16) -> torch.Tensor:
    """Normalised latent means of every video, whole clips: [N, 16, 5, 8, 16]."""
    out = []
    for s in range(0, len(videos), batch):
        out.append(vae.encode_first(torch.from_numpy(to_model_range(videos[s : s + batch])))[0])
    return torch.cat(out)


@torch.no_grad()
def fold_latent_stats(vae, latents: torch.Tensor) -> torch.Tensor:
    """Fold per-channel whitening of the normalised latents into conv1 and conv2; returns the new latents.

    The model's fixed normalisation is z_n = (raw - M) / S (Wan's constants). With the toy latents'
    per-channel mean m and std s, the encoder's raw output becomes raw' = M + (raw - M - S m) / s, so
    z_n' = (z_n - m) / s; the decoder gets raw = M + s (raw' - M) + S m back before conv2. Exact: both
    are affine per channel and conv1/conv2 are 1x1x1.
    """
    from turbotrt.models.vae import LATENT_MEAN, LATENT_STD

    M = torch.tensor(LATENT_MEAN, dtype=torch.float64)
    S = torch.tensor(LATENT_STD, dtype=torch.float64)
    m = latents.double().mean(dim=(0, 2, 3, 4))
    s = latents.double().std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    z = vae.config.z_dim
    # Encoder: the first z channels of conv1 are the mean; raw' = raw / s + (M - (M + S m) / s).
    w1, b1 = vae.conv1.weight.double(), vae.conv1.bias.double()
    w1[:z] /= s.view(-1, 1, 1, 1, 1)
    b1[:z] = b1[:z] / s + (M - (M + S * m) / s)
    # Decoder: conv2(raw) with raw = s raw' + (M + S m - s M).
    w2, b2 = vae.conv2.weight.double(), vae.conv2.bias.double()
    shift = M + S * m - s * M
    b2 = b2 + w2[:, :, 0, 0, 0] @ shift
    w2 = w2 * s.view(1, -1, 1, 1, 1)
    vae.conv1.weight.copy_(w1)
    vae.conv1.bias.copy_(b1)
    vae.conv2.weight.copy_(w2)
    vae.conv2.bias.copy_(b2)
    return ((latents.double() - m.view(1, -1, 1, 1, 1)) / s.view(1, -1, 1, 1, 1)).float()


# --- text ---------------------------------------------------------------------------------------


def toy_text_encoder(seed: int = 0):
    from turbotrt.models.t5 import build_t5, random_t5_state_dict

    name = get_config(PRESET).text_encoder
    t5 = build_t5(name, "cpu")
    t5.load_state_dict(random_t5_state_dict(name, seed))
    return t5.eval().requires_grad_(False)


def caption_tokens(tokenizer_path: Path, captions=CAPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the captions, as the runtime tokenizes prompts."""
    from turbotrt.core.tokenizer import Tokenizer

    ids, mask = Tokenizer(tokenizer_path, text_len=get_config(PRESET).text_len)(list(captions))
    return torch.from_numpy(ids), torch.from_numpy(mask)


# --- DiT ----------------------------------------------------------------------------------------


def sampler_schedule(sigma_max: float, steps: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The rCM sampler's times t_0..t_{steps-1} and the bf16 timesteps its network sees."""
    times = rcm_times(steps, sigma_max)
    return times[:-1], net_timesteps(times)


def new_dit(seed: int):
    from turbotrt.models.wan import WanModel, init_random_

    config = get_config(PRESET)
    model = init_random_(WanModel(config, AttentionConfig.for_model(config, "sla")), seed)
    with torch.no_grad():  # start as the identity jump (v = 0): early steps cannot blow up
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
    return model


def train_dit(cfg: TrainConfig, latents: torch.Tensor, caption_idx: torch.Tensor, t5, text: tuple,
              log: Callable[[str], None], model=None):
    """The DiT (new, or `model` to continue) on the latents; with cfg.train_t5 the umT5 learns too.

    text: (ids, mask) of every caption. Returns the EMA DiT, the EMA umT5, the loss curve and the
    final x0 error per sampler step.
    """
    config = get_config(PRESET)
    model = (model or new_dit(cfg.seed)).train().requires_grad_(True)
    t5.requires_grad_(cfg.train_t5).train(cfg.train_t5)
    nets = [model, t5] if cfg.train_t5 else [model]
    emas = [copy.deepcopy(n).eval().requires_grad_(False) for n in nets]
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.0)
    # umT5's outputs past a prompt's length are zeros and its valid positions never attend to the
    # padding, so running it on the longest caption's length and zero-padding is the same, 15x cheaper.
    ids, mask = text
    length = int(mask.sum(dim=1).max())
    ids, mask = ids[:, :length], mask[:, :length]

    def encode(c):
        return F.pad(t5(ids[c], mask[c]), (0, 0, 0, config.text_len - length))

    with torch.no_grad():
        frozen_context = None if cfg.train_t5 else encode(torch.arange(len(ids)))
    times, net_t = sampler_schedule(config.sigma_max)
    times_t = torch.tensor(times, dtype=torch.float32)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    curve = Curve("dit", cfg.dit_steps, cfg.log_every, log)
    per_step = [[] for _ in times]
    for step in range(cfg.dit_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.dit_steps, cfg.dit_lr, cfg.warmup)
        idx = torch.randint(len(latents), (cfg.dit_batch,), generator=g)
        x0 = latents[idx]
        k = torch.randint(len(times), (cfg.dit_batch,), generator=g)
        t = times_t[k].view(-1, 1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        # The sampler's first input is t_0 * eps exactly; later inputs are the forward process.
        x = torch.where(k.view(-1, 1, 1, 1, 1) == 0, t * eps, (1 - t) * x0 + t * eps)
        c = caption_idx[idx]
        context = encode(c) if cfg.train_t5 else frozen_context[c]
        v = model(x, torch.from_numpy(net_t[k.numpy()]), context)
        err = (x - t * v - x0).pow(2).mean(dim=(1, 2, 3, 4))
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for ema, net in zip(emas, nets):
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - cfg.ema)
        for i in range(len(times)):
            per_step[i].extend(err[k == i].tolist())
        curve.add(step, loss.item())
        if (step + 1) % (cfg.log_every * 4) == 0:
            log("[dit]   x0 error by sampler step: " + ", ".join(
                f"t={times[i]:.3f}: {np.mean(e[-200:]):.4f}" for i, e in enumerate(per_step) if e))
    final = {f"{times[i]:.4f}": float(np.mean(e[-200:])) for i, e in enumerate(per_step) if e}
    return emas[0], (emas[1] if cfg.train_t5 else t5.eval()), curve, final


# --- weights ------------------------------------------------------------------------------------


def save_weights(out: Path, dit=None, vae=None, t5=None) -> None:
    """Each network in its real checkpoint's layout and dtype: DiT bf16 (SLA's proj_l fp32, as
    TurboDiffusion stores it), VAE and umT5 fp32."""
    from turbotrt.models.checkpoint import save_state_dict

    if dit is not None:
        sd = {k: (v if "proj_l" in k else v.to(torch.bfloat16)) for k, v in dit.state_dict().items()}
        save_state_dict(sd, out / DIT_FILE)
    if vae is not None:
        save_state_dict(vae.state_dict(), out / VAE_FILE)
    if t5 is not None:
        save_state_dict(t5.state_dict(), out / T5_FILE)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, bool):
            p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--stage", choices=("all", "vae", "decoder", "dit"), default="all",
                   help="vae, decoder, dit: one stage, on the earlier stages' weights already in --out")
    p.add_argument("--resume", action="store_true", help="dit: continue the DiT and umT5 already in --out")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    log = lambda s: print(s, flush=True)  # noqa: E731
    start = time.perf_counter()
    record = dict(config=asdict(cfg), preset=PRESET, torch=torch.__version__, python=platform.python_version(),
                  threads=torch.get_num_threads(), stages={})

    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / TOKENIZER_FILE).is_file():  # the tiny presets' tokenizer (seed 0), kept with the weights
        import shutil
        import tempfile

        from turbotrt.core.tokenizer import make_tiny_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(make_tiny_tokenizer(tmp, seed=0), args.out / TOKENIZER_FILE)
    if args.stage != "dit":
        log(f"rendering {cfg.videos} toy videos (seed {cfg.seed})")
        videos, _ = render_pool(cfg)
    if args.stage in ("all", "vae"):
        vae, curve = train_vae(cfg, videos, log)
        fold_latent_stats(vae, encode_pool(vae, videos))
        save_weights(args.out, vae=vae)
        record["stages"]["vae"] = dict(seconds=round(curve.seconds, 1), curve=curve.points,
                                       final_loss=curve.points[-1]["loss"])
    else:
        from turbotrt.models.vae import load_vae

        vae = load_vae(args.out / VAE_FILE)
        with torch.no_grad():  # own copies: the loaded tensors are views of a read-only file mapping
            for t in list(vae.parameters()) + list(vae.buffers()):
                t.data = t.data.clone()
    if args.stage in ("all", "decoder"):
        vae, curve = train_vae(cfg, videos, log, vae=vae)
        vae.eval().requires_grad_(False)
        recon = latents_reconstruction(vae, videos[:16])
        log(f"[vae-decoder] whole-clip reconstruction MSE (pixels in [-1, 1]) on 16 videos: {recon:.5f}")
        save_weights(args.out, vae=vae)
        record["stages"]["vae_decoder"] = dict(seconds=round(curve.seconds, 1), curve=curve.points,
                                               final_loss=curve.points[-1]["loss"], reconstruction_mse=recon)
    if args.stage in ("all", "dit"):
        log(f"rendering {cfg.dit_videos} toy videos for the DiT (seed {cfg.seed + 1}, spread {cfg.dit_spread})")
        videos, captions = render_pool(cfg, dit=True)
        latents = encode_pool(vae, videos)
        model = None
        if args.resume:  # continue the DiT (and umT5) already in --out
            from turbotrt.models.checkpoint import load_wan
            from turbotrt.models.t5 import load_t5

            model = load_wan(args.out / DIT_FILE, attention=AttentionConfig.for_model(get_config(PRESET), "sla"))
            t5 = load_t5(args.out / T5_FILE)
            with torch.no_grad():  # own fp32 copies: the loaded tensors are views of a read-only mapping
                for net in (model, t5):
                    for tensor in list(net.parameters()) + list(net.buffers()):
                        tensor.data = tensor.data.float().clone()
        else:
            t5 = toy_text_encoder(cfg.seed)
        text = caption_tokens(args.out / TOKENIZER_FILE)
        with torch.no_grad():
            flat = t5(*text).flatten(1)
        dist = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
        i, j = divmod(int(dist.argmin()), len(flat))
        log(f"[umt5] {'trained' if cfg.train_t5 else 'frozen'}; closest captions {CAPTIONS[i]!r} / {CAPTIONS[j]!r}: "
            f"distance {dist[i, j]:.2f} (mean embedding norm {flat.norm(dim=1).mean():.2f})")
        caption_idx = torch.tensor([CAPTIONS.index(c) for c in captions])
        log(f"latents {tuple(latents.shape)}: mean {latents.mean():.3f}, std {latents.std():.3f}")
        dit, t5, curve, final = train_dit(cfg, latents, caption_idx, t5, text, log, model)
        save_weights(args.out, dit=dit, t5=t5)
        record["stages"]["dit_resumed" if args.resume else "dit"] = dict(
            seconds=round(curve.seconds, 1), steps=cfg.dit_steps, train_t5=cfg.train_t5, curve=curve.points,
            final_loss=curve.points[-1]["loss"], final_x0_error_by_time=final,
            closest_captions_at_start=[CAPTIONS[i], CAPTIONS[j]], closest_caption_distance_at_start=float(dist[i, j]))
    seconds = round(time.perf_counter() - start, 1)
    if args.results.is_file():  # stages trained by other runs keep their record
        record["stages"] = {**json.loads(args.results.read_text()).get("stages", {}), **record["stages"]}
    record["training_seconds"] = round(sum(st["seconds"] for st in record["stages"].values()), 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    log(f"done in {seconds:.0f} s: weights in {args.out}, record in {args.results}")


@torch.no_grad()
def latents_reconstruction(vae, videos: np.ndarray) -> float:
    """MSE of streamed encode -> decode of whole clips (the way bundles decode), pixels in [-1, 1]."""
    x = torch.from_numpy(to_model_range(videos))
    return float(F.mse_loss(vae.decode(vae.encode(x)).clamp(-1, 1), x))


if __name__ == "__main__":
    main()
