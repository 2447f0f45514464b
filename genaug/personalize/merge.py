"""``genaug merge-lora``: combine LoRA adapters into one file any diffusers user can load.

* ``linear`` — exact: the merged update of a layer is ``sum_i w_i * s_i * B_i A_i`` (``s_i`` =
  alpha/rank of adapter i). It is stored as one LoRA of rank ``sum_i r_i`` by stacking the ``A``
  matrices and the weighted ``B`` matrices (peft's "cat" combination), so loading the merged file
  is the same as loading every adapter with its weight.
* ``ziplora`` — ZipLoRA (Shah et al. 2023): learn one coefficient per column (input feature) of
  each adapter's update, ``dW_i diag(m_i)``, so the merged model reproduces each adapter's own
  predictions on its own prompts, while a penalty keeps the two updates' columns from pointing the
  same way (mean |cos| of column pairs), as in the reference implementation. Coefficients act
  through ``torch.nn.utils.parametrize`` on the LoRA down-projections (``B A diag(m) = B (A
  diag(m))``, no monkey-patching); the result is folded into a linear-format file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artefacts import read_adapter_config, write_adapter
from ..config import config_to_dict, option
from ..errors import ConfigError
from ..runs import RunRecord
from .adapters import read_lora
from .lora import LORA_WEIGHTS

DOWN, UP = ".lora.down.weight", ".lora.up.weight"


@dataclass
class MergeLoraConfig:
    """Merge LoRA adapters: an exact weighted sum (linear) or ZipLoRA's learned per-column merge."""

    adapters: list[str] = option(help="LoRA adapter folders (train-lora output)", factory=list)
    weights: list[float] = option(help="linear: one weight per adapter (default 1)", factory=list)
    method: str = option("linear", "linear or ziplora")
    output: str = option("adapters/merged", "merged adapter folder")
    model: str = option("embedded", "ziplora: the base model the adapters were trained on")
    prompts: list[str] = option(help="ziplora: one prompt per adapter (default: each adapter's instance prompt)",
                                factory=list)
    steps: int = option(100, "ziplora: optimizer steps")
    learning_rate: float = option(1e-2, "ziplora: learning rate of the merge coefficients")
    similarity_weight: float = option(0.01, "ziplora: weight of the column-similarity penalty")
    samples_per_adapter: int = option(8, "ziplora: noisy latents per adapter the merged model must fit")
    seed: int = option(0, "ziplora: seed of the latents, noise and timesteps")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if len(self.adapters) < 2:
            raise ValueError("merge at least two adapters")
        if self.weights and len(self.weights) != len(self.adapters):
            raise ValueError("give one weight per adapter (or none)")
        if self.method not in ("linear", "ziplora"):
            raise ValueError(f"method must be linear or ziplora, got {self.method!r}")
        if self.method == "ziplora" and len(self.adapters) != 2:
            raise ValueError("ziplora merges exactly two adapters (e.g. a subject and a style)")
        if self.prompts and len(self.prompts) != len(self.adapters):
            raise ValueError("give one prompt per adapter (or none)")
        if self.steps < 1 or self.samples_per_adapter < 1:
            raise ValueError("steps and samples_per_adapter must be >= 1")


@dataclass
class MergeLoraResult:
    output: Path
    weights: Path
    layers: int
    seconds: float
    history: list[float] = field(default_factory=list)


def _read_lora(folder: str) -> tuple[dict[str, torch.Tensor], float, dict]:
    """``(tensors, scale, adapter config)`` of a diffusers-format LoRA folder; the tensors carry alpha/rank."""
    config = read_adapter_config(folder)
    if config.get("type") != "lora" and not config.get("lora_weights"):
        raise ConfigError(f"not a LoRA adapter (type {config.get('type')!r})", where=folder,
                          fix="give folders written by train-lora (or train-ti --pivotal)")
    if (config.get("config") or {}).get("unet_targets", "attention") != "attention":
        raise ConfigError("merge-lora merges attention-only LoRAs; this one also adapts the UNet's convolutions "
                          "(unet_targets: all)", where=folder,
                          fix="use it beside the others at inference with per-adapter weights, or retrain it with "
                              "unet_targets: attention")
    if (config.get("config") or {}).get("use_dora"):
        raise ConfigError("merge-lora merges plain LoRAs; this one is DoRA (use_dora), whose learned magnitudes do "
                          "not add linearly", where=folder,
                          fix="use it beside the others at inference with per-adapter weights, or retrain it without "
                              "use_dora")
    tensors = read_lora(folder, config)
    if not any(k.endswith(DOWN) for k in tensors):
        raise ConfigError("no diffusers-format LoRA keys (*.lora.down.weight) in the adapter", where=folder)
    return tensors, 1.0, config


def linear_merge(loras: list[dict[str, torch.Tensor]], factors: list[float]) -> dict[str, torch.Tensor]:
    """Stack A's and weighted B's per layer: the merged update is sum_i factor_i * B_i A_i exactly."""
    layers = sorted({k[: -len(DOWN)] for lora in loras for k in lora if k.endswith(DOWN)})
    merged = {}
    for layer in layers:
        downs, ups = [], []
        for lora, factor in zip(loras, factors):
            if layer + DOWN in lora:
                downs.append(lora[layer + DOWN].float())
                ups.append(lora[layer + UP].float() * factor)
        merged[layer + DOWN] = torch.cat(downs, dim=0)
        merged[layer + UP] = torch.cat(ups, dim=1)
    return merged


def merge_lora(cfg: MergeLoraConfig) -> MergeLoraResult:
    t0 = time.time()
    read = [_read_lora(folder) for folder in cfg.adapters]
    loras = [r[0] for r in read]
    weights = cfg.weights or [1.0] * len(loras)
    factors = [w * r[1] for w, r in zip(weights, read)]
    out = Path(cfg.output)
    record = RunRecord.start(out / "run", "merge-lora", cfg)
    history: list[float] = []
    if cfg.method == "ziplora":
        factors, column_scales, history = learn_ziplora(cfg, loras, factors, read)
        loras = [{k: (v * column_scales[i][k[: -len(DOWN)]][None, :]
                      if k.endswith(DOWN) and k[: -len(DOWN)] in column_scales[i] else v)
                  for k, v in lora.items()} for i, lora in enumerate(loras)]
    merged = linear_merge(loras, factors)
    ranks = sorted({int(v.shape[0]) for k, v in merged.items() if k.endswith(DOWN)})
    config = {"type": "lora", "format": "diffusers", "method": cfg.method, "merged_from": cfg.adapters,
              "weights": weights, "rank": ranks[-1], "alpha": None, "base_model": read[0][2].get("base_model"),
              **{k: read[0][2][k] for k in ("base_family", "text_hidden_size", "cross_attention_dim")
                 if k in read[0][2]},
              "note": "scales are folded into the up-projections: load with scale 1",
              "config": config_to_dict(cfg)}
    path = write_adapter(out, LORA_WEIGHTS, merged, config)
    result = MergeLoraResult(out, path, len(merged) // 2, round(time.time() - t0, 3), history)
    record.finish({"layers": result.layers, "final_loss": history[-1] if history else None})
    return result


class _ColumnScale(torch.nn.Module):
    """Parametrization ``A -> A diag(m)`` of a LoRA down-projection: one learnable scale per input column."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale[None, :]


def learn_ziplora(cfg: MergeLoraConfig, loras, factors, read):
    """Learn per-column coefficients of two LoRAs (ZipLoRA); returns (factors, column scales, loss history)."""
    from torch.nn.utils import parametrize

    from ..models.loading import load_pipeline

    pipe = load_pipeline(cfg.model, device=cfg.device, dtype="float32")
    unet = pipe.unet
    unet.requires_grad_(False)
    device = unet.device
    names = ["subject", "style"]
    for name, lora in zip(names, loras):
        pipe.load_lora_weights(dict(lora), adapter_name=name)
    prompts = cfg.prompts or [r[2].get("instance_prompt") or "a photo" for r in read]
    class_dim = unet.config.projection_class_embeddings_input_dim if unet.config.class_embed_type else None
    g = torch.Generator().manual_seed(cfg.seed)
    size = unet.config.sample_size
    n = cfg.samples_per_adapter
    latents = torch.randn(2, n, unet.config.in_channels, size, size, generator=g)
    timesteps = torch.randint(100, 900, (2, n), generator=g)
    with torch.no_grad():
        text = [pipe.encode_prompt([p] * n, device, 1, False)[0] for p in prompts]
        labels = torch.zeros(n, class_dim, device=device) if class_dim else None
        targets = []
        for i, name in enumerate(names):  # each adapter alone, at its own weight: what the merge must keep
            pipe.set_adapters([name], adapter_weights=[factors[i]])
            targets.append(unet(latents[i].to(device), timesteps[i].to(device), text[i], class_labels=labels).sample)
    pipe.set_adapters(names, adapter_weights=factors)
    # One coefficient vector per (adapter, layer), acting on that adapter's up-projection.
    scales: list[dict[str, torch.nn.Parameter]] = [{}, {}]
    ups: dict[str, list] = {}
    for module_name, module in unet.named_modules():
        if hasattr(module, "lora_A") and all(name in module.lora_A for name in names):
            for i, name in enumerate(names):
                down = module.lora_A[name]
                scale = torch.nn.Parameter(torch.ones(down.weight.shape[1], device=device))
                parametrize.register_parametrization(down, "weight", _ColumnScale(scale))
                scales[i][module_name] = scale
            ups[module_name] = [module.lora_B[name] for name in names] + [module.lora_A[name] for name in names]
    if not ups:
        raise ConfigError("the two adapters share no LoRA layer", fix="merge adapters trained on the same base model")
    params = [p for s in scales for p in s.values()]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
    history = []
    for _ in tqdm(range(cfg.steps), desc="merge-lora:ziplora", unit="step", dynamic_ncols=True):
        loss = 0.0
        for i in range(2):
            pred = unet(latents[i].to(device), timesteps[i].to(device), text[i], class_labels=labels).sample
            loss = loss + F.mse_loss(pred, targets[i])
        penalty = 0.0
        for module_name, (up1, up2, down1, down2) in ups.items():
            delta1 = up1.weight @ down1.weight  # (out, in), coefficients applied
            delta2 = up2.weight @ down2.weight
            penalty = penalty + F.cosine_similarity(delta1, delta2, dim=0).abs().mean()  # between columns
        total = loss + cfg.similarity_weight * penalty
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append(round(float(total.detach()), 6))
    # Map the learned scales back onto the saved file's layer names ("unet.<module>").
    column_scales = [{f"unet.{name}": scale.detach().cpu() for name, scale in s.items()} for s in scales]
    return factors, column_scales, history
