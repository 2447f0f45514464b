"""``genaug train-multiconcept``: several concepts from ONE image with attention calibration (DisenDiff).

After Monalissaa/DisenDiff (CVPR 2024; ``src/model.py::p_losses``), a Custom-Diffusion fork:
* modifier tokens (``<new1>``, ``<new2>``, ...) each placed before its class word in the prompt
  ("a <new1> shape beside a <new2> shape"); their embeddings and the cross-attention K/V
  projections train (Custom Diffusion's ``crossattn-kv``; or a LoRA on them with ``--kv lora``);
* cross-attention maps are captured by a diffusers attention processor (:class:`StoringAttnProcessor`)
  at the chosen resolution, averaged over heads and layers, min-max normalized and smoothed
  (3x3 Gaussian, sigma 0.5); the class words' maps are squared (DisenDiff's ``self_filter``:
  strengthen the peak);
* losses besides the diffusion loss, weighted by ``attention_loss_weight`` (DisenDiff's IoU_alpha):
  ``bind``: 1 - IoU(class map (detached), modifier map) per concept — the modifier looks where
  its class word looks; ``separate``: IoU(class map i, class map j) for each pair — different
  concepts' maps do not overlap. Each term has a flag for ablations;
* optional concept masks (``--mask-data``: one binary mask per concept, Break-A-Scene style):
  the diffusion loss is restricted to the union of the masks.
Each concept alone is also drawable: with probability ``single_prompt_prob`` a step uses the
prompt of one concept only (DisenDiff's ``random_change_subject_prompt``).

Output: ``learned_embeds.safetensors`` (``{token: (1, dim)}`` per modifier, loadable with
``load_textual_inversion``) and ``multiconcept_kv.safetensors`` (the trained K/V weights, by module
name) or ``pytorch_lora_weights.safetensors`` with ``--kv lora``; ``adapter_config.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artefacts import atomic_write_bytes, slugify, write_adapter
from ..checkpoints import require_finite, step_generator
from ..config import config_to_dict, option
from ..errors import ConfigError, DataError, ModelError
from ..models.loading import default_resolution, resolve_device
from ..runs import RunRecord
from .adapters import base_model_info
from .lora import _encode_latents, _load_images, latent_masks, load_base_for_personalization, load_masks, masked_mse
from .textual_inversion import TI_WEIGHTS, TrainableRows, add_placeholder_tokens

KV_WEIGHTS = "multiconcept_kv.safetensors"


# --------------------------------------------------------------------------- attention capture
class CrossAttentionStore:
    """Cross-attention probabilities captured during one forward pass, by query resolution."""

    def __init__(self, resolutions: set[int] | None = None):
        self.resolutions = resolutions
        self.maps: dict[int, list[torch.Tensor]] = {}
        self.enabled = True

    def reset(self) -> None:
        self.maps = {}

    def add(self, probs: torch.Tensor, heads: int) -> None:
        """``probs``: (batch * heads, queries, keys) -> stored as (batch, side, side, keys), mean over heads."""
        side = int(math.isqrt(probs.shape[1]))
        if not self.enabled or side * side != probs.shape[1]:
            return
        if self.resolutions is not None and side not in self.resolutions:
            return
        probs = probs.view(-1, heads, side, side, probs.shape[-1]).mean(dim=1)
        self.maps.setdefault(side, []).append(probs)


class StoringAttnProcessor:
    """diffusers' classic ``AttnProcessor`` computation, handing cross-attention probabilities to a store."""

    def __init__(self, store: CrossAttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        if is_cross:
            self.store.add(attention_probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_attention_store(unet, resolutions: set[int] | None = None) -> CrossAttentionStore:
    """Give every attention layer a :class:`StoringAttnProcessor` sharing one store."""
    store = CrossAttentionStore(resolutions)
    unet.set_attn_processor(StoringAttnProcessor(store))
    return store


# --------------------------------------------------------------------------- calibration losses
def gaussian_smooth(mask: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """3x3 Gaussian smoothing with reflect padding (DisenDiff's GaussianSmoothing, kernel 3)."""
    coords = torch.tensor([-1.0, 0.0, 1.0])
    kernel_1d = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (kernel_1d[:, None] * kernel_1d[None, :])
    kernel = (kernel / kernel.sum()).to(mask)
    padded = F.pad(mask[None, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel[None, None])[0, 0]


def normalized_map(maps: list[torch.Tensor], smooth: bool, square: bool = False) -> torch.Tensor:
    """Mean over layers, min-max to [0, 1], optional smoothing, optional squaring (strengthen)."""
    mean = torch.stack(maps).mean(dim=0)
    mean = (mean - mean.min()) / (mean.max() - mean.min() + 1e-8)
    if smooth:
        mean = gaussian_smooth(mean)
    return mean * mean if square else mean


def soft_iou(a: torch.Tensor, b: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    intersection = (a * b).sum()
    union = (a + b).sum() - intersection
    return (intersection + smooth) / (union + smooth)


@dataclass
class CalibrationTerms:
    bind: torch.Tensor
    separate: torch.Tensor


def calibration_losses(store: CrossAttentionStore, ids: torch.Tensor, modifier_ids: list[int], resolution: int,
                       smooth: bool = True, strengthen: bool = True) -> CalibrationTerms | None:
    """DisenDiff's attention terms for the batch items whose prompt holds every modifier token."""
    maps = store.maps.get(resolution)
    if not maps:
        return None
    bind, separate, count = 0.0, 0.0, 0
    for b in range(ids.shape[0]):
        positions = []
        for token in modifier_ids:
            where = (ids[b] == token).nonzero().flatten()
            if len(where) == 0:
                break
            positions.append(int(where[0]))
        if len(positions) != len(modifier_ids):
            continue
        count += 1
        class_maps = []
        for p in positions:
            modifier = normalized_map([m[b, :, :, p] for m in maps], smooth)
            cls = normalized_map([m[b, :, :, p + 1] for m in maps], smooth, square=strengthen)
            bind = bind + 1 - soft_iou(cls.detach(), modifier)
            class_maps.append(cls)
        pairs = [(i, j) for i in range(len(class_maps)) for j in range(i + 1, len(class_maps))]
        separate = separate + sum(soft_iou(class_maps[i], class_maps[j]) for i, j in pairs) / max(1, len(pairs))
    if count == 0:
        return None
    return CalibrationTerms(bind / count, separate / count)


# --------------------------------------------------------------------------- training
@dataclass
class MultiConceptConfig:
    """Learn several concepts from one image: modifier tokens + cross-attention K/V + attention calibration."""

    model: str = option("embedded", "base model: a diffusers folder, a cached hub id, or embedded")
    instance_data: str = option("", "the image(s) holding every concept (dataset or flat folder)")
    instance_class: str | None = option(None, "use only this class of instance_data (by class name)")
    class_words: list[str] = option(help="one class word per concept, in prompt order (e.g. shape,shape)",
                                    factory=list)
    modifier_tokens: list[str] = option(help="one new token per concept (default <new1>, <new2>, ...)",
                                        factory=list)
    initializer_token: str = option("object", "single-token word whose embedding starts every modifier")
    prompt_template: str = option("a photo of {0} beside {1}", "training prompt; {i} is '<newI> <class word i>'")
    single_template: str = option("a photo of {}", "prompt of one concept alone ('<newI> <class word i>')")
    single_prompt_prob: float = option(0.3, "probability a step trains on one concept's prompt only")
    mask_data: str | None = option(None, "optional masks, one image per concept (white = concept), same order")
    kv: str = option("full", "train the cross-attention K/V fully (Custom Diffusion) or as a LoRA: full or lora")
    rank: int = option(4, "LoRA rank when kv=lora")
    bind_loss: bool = option(True, "bind each modifier's attention map to its class word's")
    separate_loss: bool = option(True, "suppress the overlap between different concepts' class maps")
    strengthen: bool = option(True, "square the class maps before the losses (DisenDiff's self_filter)")
    smooth: bool = option(True, "3x3 Gaussian smoothing of the maps")
    attention_loss_weight: float = option(0.01, "weight of the attention terms (DisenDiff's IoU_alpha)")
    attention_resolution: int = option(0, "side of the cross-attention maps used (0: the largest the UNet has)")
    learning_rate: float = option(1e-4, "AdamW learning rate of K/V (or LoRA)")
    token_learning_rate: float = option(5e-3, "AdamW learning rate of the modifier embeddings")
    max_train_steps: int = option(300, "optimizer steps")
    train_batch_size: int = option(4, "samples per step (random flips of the one image)")
    resolution: int | None = option(None, "training resolution (default: the model's native size)")
    output: str = option("adapters/multiconcept", "adapter folder")
    seed: int = option(0, "seed of every random draw")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if len(self.class_words) < 2:
            raise ValueError("give at least two class words (one per concept)")
        if self.modifier_tokens and len(self.modifier_tokens) != len(self.class_words):
            raise ValueError("give one modifier token per class word")
        if not self.modifier_tokens:
            self.modifier_tokens = [f"<new{i + 1}>" for i in range(len(self.class_words))]
        try:
            self.prompt_template.format(*["x"] * len(self.class_words))
        except (IndexError, KeyError):
            raise ValueError(f"prompt_template needs slots {{0}}..{{{len(self.class_words) - 1}}}") from None
        if "{}" not in self.single_template:
            raise ValueError("single_template needs a '{}'")
        if self.kv not in ("full", "lora"):
            raise ValueError("kv must be full or lora")
        if not 0.0 <= self.single_prompt_prob <= 1.0 or self.attention_loss_weight < 0:
            raise ValueError("single_prompt_prob must be in [0, 1] and attention_loss_weight >= 0")
        if self.max_train_steps < 1 or self.train_batch_size < 1 or self.rank < 1:
            raise ValueError("max_train_steps, train_batch_size and rank must be >= 1")


@dataclass
class MultiConceptResult:
    output: Path
    tokens: list[str]
    prompt: str
    steps: int
    final_loss: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _cross_kv_modules(unet) -> dict[str, torch.nn.Module]:
    """The K and V projections of every cross-attention layer (attn2), by module name."""
    return {f"{name}.{proj}": getattr(module, proj) for name, module in unet.named_modules()
            if name.endswith("attn2") and hasattr(module, "to_k") for proj in ("to_k", "to_v")}


def train_multiconcept(cfg: MultiConceptConfig) -> MultiConceptResult:
    from diffusers import DDPMScheduler

    device = resolve_device(cfg.device)
    pipe, family = load_base_for_personalization(cfg.model, cfg.instance_data, "train-multiconcept", str(device))
    size = cfg.resolution or default_resolution(pipe)
    pixels = _load_images(cfg.instance_data, cfg.instance_class, size, "instance_data")
    pixels = torch.cat([pixels, pixels.flip(-1)])
    mask = None
    if cfg.mask_data:
        masks = load_masks(cfg.mask_data, size, "mask_data")
        if len(masks) != len(cfg.class_words):
            raise DataError(f"{len(masks)} masks for {len(cfg.class_words)} concepts", where=cfg.mask_data,
                            fix="give one mask image per concept, in class-word order")
        union = masks.amax(dim=0, keepdim=True)
        mask = torch.cat([union, union.flip(-1)])
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    modifier_ids = []
    for token in cfg.modifier_tokens:
        modifier_ids += add_placeholder_tokens(tokenizer, text_encoder, token, cfg.initializer_token, 1)
    for word in cfg.class_words:
        if len(tokenizer.encode(word, add_special_tokens=False)) != 1:
            raise ConfigError(f"class word {word!r} is not a single token", where="class_words",
                              fix="the attention terms read the token right after each modifier: use one-token words")
    phrases = [f"{tok} {word}" for tok, word in zip(cfg.modifier_tokens, cfg.class_words)]
    full_prompt = cfg.prompt_template.format(*phrases)
    singles = [cfg.single_template.format(p) for p in phrases]
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    rows = TrainableRows(text_encoder, modifier_ids)
    embeddings = rows.weight
    kv = _cross_kv_modules(unet)
    if cfg.kv == "full":
        kv_params = [p for m in kv.values() for p in m.parameters()]
        for p in kv_params:
            p.requires_grad_(True)
    else:
        from peft import LoraConfig

        torch.manual_seed(cfg.seed)
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                    target_modules=["attn2.to_k", "attn2.to_v"]))
        kv_params = [p for n, p in unet.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [embeddings], "lr": cfg.token_learning_rate, "weight_decay": 0.0},
                                   {"params": kv_params, "lr": cfg.learning_rate}])
    original_processors = dict(unet.attn_processors)
    store = install_attention_store(unet)
    latent_mean, latent_std = _encode_latents(vae, pixels)
    latent_mask = latent_masks(mask, latent_mean.shape[-2:]) if mask is not None else None
    resolution = cfg.attention_resolution
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    class_dim = unet.config.projection_class_embeddings_input_dim if family == "unclip" else None
    scaling = vae.config.scaling_factor
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    record = RunRecord.start(out / "run", "train-multiconcept", cfg)
    history: list[dict[str, float]] = []
    t0 = time.time()
    loss_value = float("nan")
    unet.train()
    for step in tqdm(range(cfg.max_train_steps), desc="train-multiconcept", unit="step", dynamic_ncols=True):
        g = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(latent_mean), (cfg.train_batch_size,), generator=g)
        latents = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        single = torch.rand(len(latents), generator=g) < cfg.single_prompt_prob
        which = torch.randint(0, len(singles), (len(latents),), generator=g)
        prompts = [singles[int(w)] if s else full_prompt for s, w in zip(single.tolist(), which.tolist())]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(device)
        labels = torch.zeros(len(latents), class_dim, device=device) if class_dim else None
        store.reset()
        pred = unet(noisy, timesteps.to(device), text_encoder(ids.to(device))[0], class_labels=labels).sample
        target = (noise if noise_scheduler.config.prediction_type == "epsilon"
                  else noise_scheduler.get_velocity(latents, noise, timesteps)).to(device)
        if latent_mask is not None:
            diffusion = masked_mse(pred.float(), target.float(), latent_mask[idx % len(latent_mask)].to(device))
        else:
            diffusion = F.mse_loss(pred.float(), target.float())
        if resolution == 0:
            resolution = max(store.maps) if store.maps else 0
        terms = calibration_losses(store, ids, modifier_ids, resolution, cfg.smooth, cfg.strengthen)
        loss = diffusion
        entry = {"step": step + 1, "diffusion": round(float(diffusion.detach()), 6)}
        if terms is not None:
            attention = (terms.bind if cfg.bind_loss else 0.0) + (terms.separate if cfg.separate_loss else 0.0)
            loss = loss + cfg.attention_loss_weight * attention
            entry.update(bind=round(float(terms.bind.detach()), 6), separate=round(float(terms.separate.detach()), 6))
        optimizer.zero_grad(set_to_none=True)
        require_finite(loss, step, cfg.output)
        loss.backward()
        optimizer.step()
        rows.restore()
        loss_value = float(loss.detach())
        history.append(entry)
    unet.set_attn_processor(original_processors)
    tokens = cfg.modifier_tokens
    learned = {tok: embeddings.detach()[i][None].cpu() for tok, i in zip(tokens, modifier_ids)}
    config = {"type": "textual_inversion", "format": "diffusers", "method": "disendiff", "base_model": cfg.model,
              **base_model_info(pipe),
              "tokens": tokens, "class_words": cfg.class_words, "prompt": full_prompt, "single_prompts": singles,
              "kv": cfg.kv, "attention_resolution": resolution, "steps": cfg.max_train_steps, "final_loss": loss_value,
              "losses": {"bind": cfg.bind_loss, "separate": cfg.separate_loss, "strengthen": cfg.strengthen},
              "config": config_to_dict(cfg)}
    if cfg.kv == "full":
        from safetensors.torch import save

        state = {f"{name}.weight": module.weight.detach().cpu().contiguous() for name, module in kv.items()}
        atomic_write_bytes(out / KV_WEIGHTS, save(state))
        config["kv_weights"] = KV_WEIGHTS
    else:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from .lora import LORA_WEIGHTS, save_diffusers_lora

        save_diffusers_lora(pipe, out, convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), None)
        config["lora_weights"] = LORA_WEIGHTS
    # One TI file per folder: diffusers' load_textual_inversion takes {token: tensor} with one token, so
    # each modifier also gets its own file, and the folder's main file holds the first.
    write_adapter(out, TI_WEIGHTS, {tokens[0]: learned[tokens[0]]}, config)
    for tok in tokens:
        atomic_write_bytes(out / f"learned_embeds-{slugify(tok)}.safetensors", _save({tok: learned[tok]}))
    seconds = round(time.time() - t0, 3)
    record.finish({"final_loss": loss_value, "history_tail": history[-5:]})
    return MultiConceptResult(out, tokens, full_prompt, cfg.max_train_steps, loss_value, seconds, history)


def _save(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def load_multiconcept(pipe, folder: str | Path, load_lora: bool = True) -> list[str]:
    """Load a train-multiconcept adapter into a diffusers pipeline: modifier tokens and K/V (or LoRA)."""
    from ..artefacts import read_adapter_config, read_weights, safe_child
    from .adapters import check_base_model, load_textual_inversion, weights_file
    from .adapters import load_lora as load_lora_into

    folder = Path(folder)
    config = read_adapter_config(folder)
    if config.get("method") != "disendiff":
        raise ConfigError("not a train-multiconcept adapter", where=str(folder))
    check_base_model(config, pipe, folder)
    tokens = config.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConfigError("adapter_config.json: 'tokens' must be a list of strings", where=str(folder))
    for tok in tokens:
        load_textual_inversion(pipe, weights_file(folder, f"learned_embeds-{slugify(tok)}.safetensors"), token=tok)
    if config.get("kv_weights"):
        weights = read_weights(safe_child(folder, str(config["kv_weights"])))
        modules = _cross_kv_modules(pipe.unet)
        with torch.no_grad():
            for name, module in modules.items():
                key = f"{name}.weight"
                if key not in weights or weights[key].shape != module.weight.shape:
                    raise ModelError(f"adapter does not fit this base model ({key} missing or of another shape)",
                                     where=str(folder), fix="use it with the base model it was trained on")
                module.weight.copy_(weights[key].to(module.weight))
    if config.get("lora_weights") and load_lora:
        load_lora_into(pipe, folder, config, "default_0")
    return config["tokens"]
