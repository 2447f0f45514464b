"""The embedded generator: a tiny latent diffusion model with SD 2.1-unCLIP's layout.

* a small ``AutoencoderKL`` (one downsampling: 32 px -> 16x16x4 latents), trained for
  reconstruction with a light KL term, then rewritten so that each latent channel is centred with
  unit variance (``latent_normalization``);
* a ``UNet2DConditionModel`` with text cross-attention (the frozen text tower of the embedded
  dual encoder, as SD uses CLIP's) and unCLIP-style image conditioning through its class
  embedding (``class_embed_type="projection"``: the noise-augmented CLIP image embedding
  concatenated with the noise level's sinusoidal embedding);
* conditioning dropout: the text is replaced by the empty prompt with ``p_drop_text`` and the
  image condition by zeros (the null condition ``StableUnCLIPImg2ImgPipeline`` uses for
  guidance) with ``p_drop_image``, so text-only, image-only and both work.

The result is saved as a stock ``StableUnCLIPImg2ImgPipeline`` folder. Latents, text and image
embeddings of the whole pool are computed once and cached in memory; the UNet then trains on
them alone, with an EMA copy that is what ships.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoints import list_checkpoints, load_training_state, save_training_state, step_generator
from ..config import option
from .clip import ATTENTION_CHOICES, autocast_precision, bf16_autocast, training_attention
from .data import ImageSplit, clip_normalize, to_unit


LATENT_NORMALIZATIONS = ("global", "channel")
PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_STORAGE_DTYPES = ("float32", "float16")


@dataclass
class GeneratorConfig:
    """Architecture and training schedule of the embedded diffusion model."""

    vae_channels: list[int] = option(help="AutoencoderKL block widths (len 2: one 2x downsampling)",
                                     factory=lambda: [32, 64])
    vae_steps: int = option(1500, "autoencoder training steps")
    vae_batch_size: int = option(64, "autoencoder batch size")
    vae_lr: float = option(1e-3, "autoencoder learning rate")
    vae_kl_weight: float = option(1e-6, "weight of the KL term (small: we want a faithful, smooth latent)")
    unet_channels: list[int] = option(help="UNet block widths", factory=lambda: [32, 64, 64])
    unet_attention_heads: int = option(4, "attention heads in the UNet's transformer blocks")
    pooled_text_embedding: bool = option(
        False, "also add the prompt's attention-pooled hidden states to the UNet's time embedding (diffusers' "
               "addition_embed_type='text', as in Imagen and DeepFloyd IF), so that every ResNet block sees the "
               "prompt, not only the cross-attention layers; the shipped generator has only cross-attention")
    unet_steps: int = option(12000, "UNet training steps")
    unet_batch_size: int = option(64, "UNet batch size")
    unet_lr: float = option(5e-4, "UNet peak learning rate (warmup, then cosine)")
    warmup_steps: int = option(500, "learning-rate warmup steps")
    ema_decay: float = option(0.999, "EMA decay of the shipped UNet weights")
    latent_normalization: str = option(
        "channel", "how the autoencoder's latents are scaled for the UNet: channel (each latent channel centred and "
                   "scaled to unit variance, baked into the VAE's quant convolutions so stock pipelines load it "
                   "unchanged) or global (SD's one scaling_factor, as the first shipped family was trained)")
    prediction_type: str = option("epsilon", "what the UNet predicts: epsilon or v_prediction (SD 2.x's)")
    zero_terminal_snr: bool = option(False, "rescale the betas so that the last timestep is pure noise (Lin et al. "
                                            "2024), with trailing timestep spacing at sampling; pair with "
                                            "v_prediction")
    snr_gamma: float | None = option(None, "Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma, "
                                           "5 recommended): caps the weight of low-noise timesteps so that the "
                                           "high-noise ones, where layout and shape are decided, get more of "
                                           "the gradient; None: plain MSE, as the shipped generator was trained")
    p_drop_text: float = option(0.15, "probability of training with the empty prompt")
    p_drop_image: float = option(0.5, "probability of training with the null image condition")
    max_image_noise_level: int = option(1000, "image-embedding noise augmentation levels are drawn below this")
    checkpoint_every: int = option(1000, "save a resumable checkpoint every N UNet steps")
    bf16: bool = option(True, "train the autoencoder and the UNet under bfloat16 autocast where the CPU or GPU "
                              "computes bf16 natively (weights, EMA and losses stay float32); ignored elsewhere")
    attention: str = option("auto", "UNet attention kernel while training: eager (diffusers' AttnProcessor), "
                                     "sdpa (AttnProcessor2_0), or auto (eager on the CPU, where PyTorch's SDPA "
                                     "backward is slow and slower still under bf16; sdpa elsewhere); the saved "
                                     "UNet loads with diffusers' default")
    unet_storage_dtype: str = option(
        "float32", "dtype the UNet's weights are stored in: float32, or float16 for half the bytes on disk (diffusers "
                   "loads them as float32 unless asked otherwise); a UNet wider than the shipped one fits issue 3's "
                   "40 MB only in float16")
    seed: int = option(0, "seed of every random draw")

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if len(self.vae_channels) < 1 or len(self.unet_channels) < 2:
            raise ValueError("vae_channels needs >= 1 width and unet_channels >= 2")
        for name in ("p_drop_text", "p_drop_image"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability")
        if not 0 < self.ema_decay < 1:
            raise ValueError("ema_decay must be in (0, 1)")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be positive (or null for plain MSE), got {self.snr_gamma}")
        if self.latent_normalization not in LATENT_NORMALIZATIONS:
            raise ValueError(f"latent_normalization must be one of {', '.join(LATENT_NORMALIZATIONS)}, "
                             f"got {self.latent_normalization!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.unet_storage_dtype not in UNET_STORAGE_DTYPES:
            raise ValueError(f"unet_storage_dtype must be one of {', '.join(UNET_STORAGE_DTYPES)}, "
                             f"got {self.unet_storage_dtype!r}")


# ---------------------------------------------------------------------------- autoencoder
def build_vae(cfg: GeneratorConfig, image_size: int):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=min(16, cfg.vae_channels[0]), sample_size=image_size,
        mid_block_add_attention=False,  # self-attention over 16x16 latents costs more than it gives here
    )


def train_vae(cfg: GeneratorConfig, pool: ImageSplit, progress: bool = True, device: str | torch.device = "cpu"):
    """Reconstruction (L1 + L2) with a light KL; returns the VAE (on ``device``) with its latent scaling set."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg, pool.images.shape[-1]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    pct_start = 0.05
    if math.isclose(pct_start * cfg.vae_steps, 1.0):  # OneCycleLR divides by pct_start * steps - 1 (20 steps)
        pct_start = 0.06
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps,
                                                pct_start=pct_start)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="pretrain:vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        g = step_generator(cfg.seed + 17, step)
        idx = torch.randint(0, len(pool), (cfg.vae_batch_size,), generator=g)
        x = to_unit(pool.images[idx]).to(device)
        with bf16_autocast(cfg.bf16, device):
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)
            rec = vae.decode(z).sample.float()
        dist = type(dist)(dist.parameters.float())  # the KL in float32 (its logvar is clamped, exp'd)
        kl = dist.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    sample = pool.images[: min(4096, len(pool))]
    if cfg.latent_normalization == "channel":
        normalize_latent_channels(vae, sample)
    else:
        latents = encode_latents(vae, sample, scaling=1.0)
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def normalize_latent_channels(vae, images_uint8: torch.Tensor) -> None:
    """Centre each latent channel and scale it to unit variance, inside the VAE's 1x1 quant convolutions.

    SD's single ``scaling_factor`` leaves each channel's mean in place (here up to -1.1 with std 0.5):
    the UNet must then produce those offsets from pure noise at the high-noise steps, where global colour
    is decided, and small errors there tint every image. SD3 and FLUX keep a ``shift_factor`` for this,
    which the SD/unCLIP pipelines do not read; rewriting ``quant_conv`` (mean and log-variance) and
    ``post_quant_conv`` instead gives the same autoencoder with normalized latents, loadable by any
    pipeline, with ``scaling_factor`` 1.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("normalize_latent_channels needs an AutoencoderKL with quant_conv and post_quant_conv")
    latents = encode_latents(vae, images_uint8, scaling=1.0)
    mean = latents.mean(dim=(0, 2, 3)).to(vae.quant_conv.weight)
    std = latents.std(dim=(0, 2, 3)).clamp_min(1e-6).to(vae.quant_conv.weight)
    c = mean.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= std[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * std.log()  # log-variance of the scaled posterior
    p.bias += p.weight[:, :, 0, 0] @ mean  # before the weight is rescaled: W (std z + mean) + b
    p.weight *= std[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)


@torch.no_grad()
def encode_latents(vae, images_uint8: torch.Tensor, scaling: float | None = None, batch: int = 512) -> torch.Tensor:
    """Posterior means (scaled), batch by batch, on the CPU: what the UNet trains on."""
    scaling = vae.config.scaling_factor if scaling is None else scaling
    device = next(vae.parameters()).device
    out = [(vae.encode(to_unit(images_uint8[i : i + batch]).to(device)).latent_dist.mean * scaling).cpu()
           for i in range(0, len(images_uint8), batch)]
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae, images_uint8: torch.Tensor) -> float:
    x = to_unit(images_uint8).to(next(vae.parameters()).device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# ---------------------------------------------------------------------------- conditioning
@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str], batch: int = 1024) -> torch.Tensor:
    """Last hidden states of the frozen text tower, padded to the tokenizer's length (as at sampling)."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i : i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(text_encoder.device))[0].half().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_image_embeds(image_encoder, images_uint8: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    device = image_encoder.device
    return torch.cat([image_encoder(clip_normalize(images_uint8[i : i + batch]).to(device)).image_embeds.cpu()
                      for i in range(0, len(images_uint8), batch)])


def build_unet(cfg: GeneratorConfig, latent_size: int, text_dim: int, image_embed_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    # Attention (self + text cross-attention) at every resolution but the highest: on CPU,
    # self-attention over all 16x16 positions would cost more than the rest of the UNet together.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=1, down_block_types=down, up_block_types=up, cross_attention_dim=text_dim,
        attention_head_dim=cfg.unet_attention_heads, norm_num_groups=min(32, cfg.unet_channels[0]),
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * image_embed_dim,
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=cfg.unet_attention_heads)
           if cfg.pooled_text_embedding else {}),
    )


def store_unet(unet, folder: Path, dtype: str) -> None:
    """Write ``unet`` to ``folder`` as diffusers does, its weights in ``dtype`` (the model itself is not changed)."""
    if dtype not in UNET_STORAGE_DTYPES:
        raise ValueError(f"unet storage dtype must be one of {', '.join(UNET_STORAGE_DTYPES)}, got {dtype!r}")
    # .half(), not diffusers' .to(dtype), which warns on every cast of a model without float32-only modules.
    stored = unet if dtype == "float32" else copy.deepcopy(unet).half()
    stored.save_pretrained(folder, safe_serialization=True)


def noise_schedulers(cfg: GeneratorConfig | None = None):
    """Training (DDPM), sampling (DDIM) and image-embedding noising schedulers, SD's betas by default."""
    from diffusers import DDIMScheduler, DDPMScheduler

    prediction = cfg.prediction_type if cfg is not None else "epsilon"
    zero_snr = bool(cfg is not None and cfg.zero_terminal_snr)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, prediction_type=prediction, rescale_betas_zero_snr=zero_snr)
    train = DDPMScheduler(**betas)
    # Lin et al.: with zero terminal SNR, sampling must start at the last timestep (trailing spacing).
    spacing = dict(timestep_spacing="trailing") if zero_snr else dict(steps_offset=1)
    sample = DDIMScheduler(**betas, set_alpha_to_one=False, **spacing)
    image_noising = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)
    return train, sample, image_noising


def image_condition(image_embeds: torch.Tensor, noise_levels: torch.Tensor, normalizer, image_noising,
                    noise: torch.Tensor) -> torch.Tensor:
    """Per-item version of ``StableUnCLIPImg2ImgPipeline.noise_image_embeddings``."""
    from diffusers.models.embeddings import get_timestep_embedding

    x = normalizer.scale(image_embeds)
    x = image_noising.add_noise(x, noise, noise_levels)
    x = normalizer.unscale(x)
    level = get_timestep_embedding(noise_levels, embedding_dim=x.shape[-1], flip_sin_to_cos=True,
                                   downscale_freq_shift=0)
    return torch.cat([x, level.to(x.dtype)], dim=1)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """MSE to the scheduler's target (noise or velocity), optionally Min-SNR-gamma weighted as in diffusers'
    training scripts."""
    if snr_gamma is None:
        return F.mse_loss(pred, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    capped = torch.clamp(snr, max=snr_gamma)
    # min(SNR, gamma) / SNR for an epsilon target, / (SNR + 1) for velocity (finite at zero terminal SNR).
    weights = capped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else capped / snr
    per_item = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return (per_item * weights).mean()


@dataclass
class GeneratorTrainResult:
    pipeline: object
    vae_psnr: float
    unet_parameters: int
    vae_parameters: int
    vae_seconds: float
    unet_seconds: float
    final_loss: float
    precision: str = "float32"  # what autocast computed in (bf16 only where native: depends on the machine)
    attention: str = "sdpa"  # the UNet's attention kernel while training


def train_generator(cfg: GeneratorConfig, pool: ImageSplit, text_encoder, image_encoder, tokenizer,
                    feature_extractor, work_dir: str | Path, progress: bool = True,
                    device: str | torch.device = "cpu", vae=None, keep_checkpoints: int = 2) -> GeneratorTrainResult:
    """Train the autoencoder, then the UNet on cached latents/embeddings; assemble the unCLIP pipeline.

    A trained ``vae`` is reused instead of training one (``vae_seconds`` then counts only moving it).
    The newest ``keep_checkpoints`` UNet checkpoints (weights, optimizer, EMA) stay in ``work_dir``.
    Every random draw is made on the CPU from per-step seeded generators, so a run on ``device``
    sees the same batches as one on the CPU; the returned pipeline is on the CPU.
    """
    device = torch.device(device)
    from diffusers import StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    work_dir = Path(work_dir)
    text_encoder.eval().requires_grad_(False).to(device)
    image_encoder.eval().requires_grad_(False).to(device)

    # 1. Autoencoder.
    t0 = time.time()
    vae = train_vae(cfg, pool, progress, device) if vae is None else vae.to(device)  # given: reuse it
    vae.requires_grad_(False)
    vae_seconds = time.time() - t0
    psnr = reconstruction_psnr(vae, pool.images[-256:])

    # 2. Cache what the UNet sees.
    latents = encode_latents(vae, pool.images)
    text_states = encode_captions(text_encoder, tokenizer, pool.captions)
    empty_text = encode_captions(text_encoder, tokenizer, [""])[0]
    image_embeds = encode_image_embeds(image_encoder, pool.images)
    embed_dim = image_embeds.shape[-1]
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
    with torch.no_grad():
        normalizer.mean.copy_(image_embeds.mean(0, keepdim=True))
        normalizer.std.copy_(image_embeds.std(0, keepdim=True))
    train_sched, sample_sched, image_noising = noise_schedulers(cfg)

    # 3. UNet + EMA.
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, latents.shape[-1], text_states.shape[-1], embed_dim).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)  # keeps diffusers' default processors: it is what ships
    attention = training_attention(cfg.attention, device)
    if attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    params = dict(unet.named_parameters())
    ema_params = dict(ema.named_parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.unet_lr * (step + 1) / cfg.warmup_steps
        progress_ = (step - cfg.warmup_steps) / max(1, cfg.unet_steps - cfg.warmup_steps)
        return cfg.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))

    ckpt_dir = work_dir / "unet-checkpoints"
    start = 0
    if list_checkpoints(ckpt_dir):
        start = load_training_state(list_checkpoints(ckpt_dir)[-1], params, opt,
                                    extra_tensors={f"ema/{k}": v for k, v in ema_params.items()})
    unet.train()
    t1 = time.time()
    loss_ema = float("nan")
    bar = tqdm(range(start, cfg.unet_steps), desc="pretrain:unet", disable=not progress, dynamic_ncols=True,
               initial=start, total=cfg.unet_steps)
    for step in bar:
        g = step_generator(cfg.seed, step)
        b = cfg.unet_batch_size
        idx = torch.randint(0, len(latents), (b,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (b,), generator=g)
        xt = train_sched.add_noise(x0, noise, t)
        text = text_states[idx].float()
        drop_text = torch.rand(b, generator=g) < cfg.p_drop_text
        text[drop_text] = empty_text.float()
        levels = torch.randint(0, cfg.max_image_noise_level, (b,), generator=g)
        levels[torch.rand(b, generator=g) < 0.5] = 0  # half the time clean embeddings: the default at sampling
        labels = image_condition(image_embeds[idx], levels, normalizer, image_noising,
                                 torch.randn(image_embeds[idx].shape, generator=g))
        drop_image = torch.rand(b, generator=g) < cfg.p_drop_image
        labels[drop_image] = 0.0
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with bf16_autocast(cfg.bf16, device):
            pred = unet(xt.to(device), t.to(device), encoder_hidden_states=text.to(device),
                        class_labels=labels.to(device)).sample
        target = noise if cfg.prediction_type == "epsilon" else train_sched.get_velocity(x0, noise, t)
        loss = diffusion_loss(pred.float(), target.to(device), t.to(device), train_sched, cfg.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for k, p in params.items():
                ema_params[k].lerp_(p.detach(), 1 - decay)
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr_at(step):.1e}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet_steps:
            save_training_state(ckpt_dir, step + 1, params, opt,
                                extra_tensors={f"ema/{k}": v for k, v in ema_params.items()}, keep=keep_checkpoints)
    unet_seconds = time.time() - t1
    ema.eval().to("cpu")
    vae.to("cpu")
    text_encoder.to("cpu")
    image_encoder.to("cpu")

    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=feature_extractor, image_encoder=image_encoder, image_normalizer=normalizer,
        image_noising_scheduler=image_noising, tokenizer=tokenizer, text_encoder=text_encoder, unet=ema,
        scheduler=sample_sched, vae=vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return GeneratorTrainResult(pipe, round(psnr, 2), sum(p.numel() for p in ema.parameters()),
                                sum(p.numel() for p in vae.parameters()), round(vae_seconds, 1),
                                round(unet_seconds, 1), loss_ema, autocast_precision(cfg.bf16, device), attention)
