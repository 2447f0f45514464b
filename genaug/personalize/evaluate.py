"""``genaug eval-personalization``: how well an adapter draws its concept, and in new contexts.

For each prompt, ``images_per_prompt`` samples are drawn from the base model with the adapters
loaded (LoRA and/or textual inversion, each with a weight), then scored:
* CLIP-I — mean cosine between the samples' and the reference images' CLIP image embeddings;
* CLIP-T — mean cosine between each sample and its prompt, with the adapter's placeholder words
  replaced by ``class_word`` (the embedded or real CLIP does not know the new tokens);
* feature similarity — DINO-style: mean cosine of backbone features (penultimate layer of the
  oracle, or of any timm-format classifier run) between samples and references;
* oracle accuracy — on the embedded world, the share of samples the oracle labels as
  ``oracle_class`` (the concept's class).
The same prompts are drawn from the base model alone (``--compare-base``) for the baseline.
``--adapter-start F`` delays the adapters (FastComposer's delayed subject conditioning): the first F of
the denoising steps run the base model on the prompt with ``class_word`` in place of the placeholder.
Multi-concept images are scored per concept by giving one ``--concept`` block per concept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artefacts import read_adapter_config, read_dataset, write_report
from ..config import option
from ..errors import ConfigError
from ..runs import RunRecord
from .adapters import TI_WEIGHTS, check_base_model, load_lora, load_textual_inversion, weights_file


@dataclass
class EvalPersonalizationConfig:
    """Score adapters on their concept: CLIP-I, CLIP-T, feature similarity, oracle accuracy."""

    model: str = option("embedded", "base model (diffusers folder, cached hub id, or embedded)")
    adapters: list[str] = option(help="adapter folders (LoRA and/or textual inversion) to load", factory=list)
    adapter_weights: list[float] = option(help="one weight per adapter (LoRA scale; default 1)", factory=list)
    references: str = option("", "reference images of the concept (dataset or flat folder)")
    prompts: list[str] = option(help="prompts naming the concept with its placeholder, e.g. 'a photo of <sks>'",
                                factory=list)
    placeholder: str = option("", "the concept's words in the prompts (replaced by class_word for CLIP-T)")
    class_word: str = option("object", "what the placeholder stands for, for CLIP-T and the base-model baseline")
    oracle_class: str | None = option(None, "oracle class of the concept (embedded world): adds oracle accuracy")
    clip_model: str = option("embedded:clip", "CLIP encoder for CLIP-I/CLIP-T")
    oracle: str = option("embedded:oracle", "oracle (also the feature backbone for the DINO-style similarity)")
    images_per_prompt: int = option(8, "samples per prompt")
    num_inference_steps: int = option(25, "denoising steps")
    guidance_scale: float = option(4.0, "classifier-free guidance scale")
    adapter_start: float = option(0.0, "fraction of the denoising steps drawn by the base model, on the prompt with "
                                       "class_word in place of the placeholder, before the adapters join "
                                       "(FastComposer's delayed subject conditioning: the scene is laid out as the "
                                       "base model lays it out; 0: adapters from the first step)")
    compare_base: bool = option(True, "also score the base model alone on the prompts (placeholder -> class_word)")
    output: str = option("reports/personalization", "report folder (report.json, report.md, sample grids)")
    seed: int = option(0, "seed of the samples (the same for adapter and base)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("give at least one prompt")
        if self.adapter_weights and len(self.adapter_weights) != len(self.adapters):
            raise ValueError("give one adapter weight per adapter (or none)")
        if self.images_per_prompt < 1 or self.num_inference_steps < 1:
            raise ValueError("images_per_prompt and num_inference_steps must be >= 1")
        if not 0.0 <= self.adapter_start < 1.0:
            raise ValueError(f"adapter_start must be in [0, 1), got {self.adapter_start}")
        if self.adapter_start and not self.placeholder:
            raise ValueError("adapter_start needs placeholder (the early steps read the prompt without it)")


@dataclass
class EvalPersonalizationResult:
    output: Path
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)


def load_adapters(pipe, adapters: list[str], weights: list[float]) -> list[str]:
    """Load LoRA and textual-inversion adapter folders into ``pipe``; returns the LoRA adapter names."""
    names, scales = [], []
    for i, folder in enumerate(adapters):
        config = read_adapter_config(folder)
        kind = config.get("type")
        if kind not in ("lora", "textual_inversion"):
            raise ConfigError(f"unknown adapter type {kind!r}", where=str(folder),
                              fix="give a folder written by train-lora, train-ti or merge-lora")
        check_base_model(config, pipe, folder)
        if config.get("method") == "disendiff":
            from .multiconcept import load_multiconcept

            load_multiconcept(pipe, folder, load_lora=False)  # its LoRA (if any) loads below, with a weight
        elif kind == "textual_inversion":
            load_textual_inversion(pipe, weights_file(folder, TI_WEIGHTS))
        if kind == "lora" or config.get("lora_weights"):
            names.append(f"adapter{i}")
            scales.append(weights[i] if weights else 1.0)
            load_lora(pipe, folder, config, names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    return names


def sample_prompts(pipe, prompts: list[str], n: int, cfg: EvalPersonalizationConfig,
                   early_prompts: list[str] | None = None) -> torch.Tensor:
    """uint8 samples (len(prompts) * n, 3, H, W), seeded per (prompt, index). With ``early_prompts`` the first
    ``cfg.adapter_start`` of the steps run the base model on those prompts (the adapters join later)."""
    from ..generate.sampler import Conditioning, DelayedAdapters, Sampler
    from ..models.loading import default_resolution

    sampler = Sampler(pipe)
    size = default_resolution(pipe)
    early_steps = round(cfg.adapter_start * cfg.num_inference_steps) if early_prompts else 0
    out = []
    for p, prompt in enumerate(prompts):
        generators = [torch.Generator().manual_seed(cfg.seed * 100_003 + p * 1009 + i) for i in range(n)]
        pos, neg = sampler.encode_text([prompt] * n)
        cond = Conditioning(pos, neg, sampler.class_labels(None, 0, generators, n))
        delayed = None
        if early_steps:
            # The base model's text encoder too: a text-encoder LoRA is off for the early prompt.
            has_lora = bool(getattr(pipe, "get_active_adapters", lambda: [])())
            if has_lora:
                pipe.disable_lora()
            try:
                early_pos, early_neg = sampler.encode_text([early_prompts[p]] * n)
            finally:
                if has_lora:
                    pipe.enable_lora()
            delayed = DelayedAdapters(early_steps, Conditioning(early_pos, early_neg, cond.class_labels))
        images = sampler.sample(cond, generators, size=size, num_steps=cfg.num_inference_steps,
                                guidance_scale=cfg.guidance_scale, delayed=delayed)
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2))
    return torch.cat(out)


def score_samples(samples: torch.Tensor, prompts_for_clip: list[str], n: int, references: torch.Tensor,
                  clip_model, tokenizer, oracle, oracle_label: int | None) -> dict[str, float | None]:
    from ..evaluate.metrics import clip_image_features, clip_text_features

    image_feats = clip_image_features(clip_model, samples)
    ref_feats = clip_image_features(clip_model, references)
    text_feats = clip_text_features(clip_model, tokenizer, [p for p in prompts_for_clip for _ in range(n)])
    clip_i = float((image_feats @ ref_feats.T).mean())
    per_sample_t = (image_feats * text_feats).sum(dim=1)
    clip_t = float(per_sample_t.mean())
    # Per prompt too: DreamBooth-style prompt fidelity is read on the new-context prompts alone.
    per_prompt_t = dict(zip(prompts_for_clip, per_sample_t.view(len(prompts_for_clip), n).mean(dim=1).tolist()))
    feats = torch.nn.functional.normalize(oracle.features(samples), dim=-1)
    ref = torch.nn.functional.normalize(oracle.features(references), dim=-1)
    similarity = float((feats @ ref.T).mean())
    accuracy = None
    if oracle_label is not None:
        predicted, _ = oracle.predict(samples)
        accuracy = float((predicted == oracle_label).float().mean())
    return {"clip_i": round(clip_i, 4), "clip_t": round(clip_t, 4), "feature_similarity": round(similarity, 4),
            "oracle_accuracy": None if accuracy is None else round(accuracy, 4),
            "per_prompt_clip_t": {p: round(v, 4) for p, v in per_prompt_t.items()}}


def evaluate_personalization(cfg: EvalPersonalizationConfig) -> EvalPersonalizationResult:
    from PIL import Image

    from ..artefacts import atomic_write_bytes, encode_png
    from ..models.embedded import resolve_model
    from ..models.loading import load_pipeline
    from ..pretrain.clip import load_dual_encoder
    from ..pretrain.oracle import load_oracle

    t0 = time.time()
    refs_ds = read_dataset(cfg.references)
    references = torch.from_numpy(np.stack([np.asarray(refs_ds.image(i)) for i in range(len(refs_ds))]))
    references = references.permute(0, 3, 1, 2).contiguous()
    clip_model, tokenizer = load_dual_encoder(resolve_model(cfg.clip_model))
    oracle = load_oracle(resolve_model(cfg.oracle))
    oracle_label = None
    if cfg.oracle_class is not None:
        if cfg.oracle_class not in oracle.class_names:
            raise ConfigError(f"the oracle has no class {cfg.oracle_class!r}", where="oracle_class",
                              fix=f"use one of {oracle.class_names[:6]}...")
        oracle_label = oracle.class_names.index(cfg.oracle_class)
    plain = [p.replace(cfg.placeholder, cfg.class_word) if cfg.placeholder else p for p in cfg.prompts]
    out = Path(cfg.output)
    record = RunRecord.start(out / "run", "eval-personalization", cfg)
    scores: dict[str, Any] = {}
    runs = [("adapted", cfg.adapters, cfg.prompts)] + ([("base", [], plain)] if cfg.compare_base else [])
    for name, adapters, prompts in runs:
        pipe = load_pipeline(cfg.model, device=cfg.device, dtype="float32")
        load_adapters(pipe, adapters, cfg.adapter_weights)
        early = plain if name == "adapted" and cfg.adapter_start else None
        samples = sample_prompts(pipe, prompts, cfg.images_per_prompt, cfg, early)
        scores[name] = score_samples(samples, plain, cfg.images_per_prompt, references, clip_model, tokenizer,
                                     oracle, oracle_label)
        scores[name]["per_prompt_oracle_accuracy"] = None
        if oracle_label is not None:
            predicted, _ = oracle.predict(samples)
            per = (predicted == oracle_label).float().view(len(prompts), -1).mean(dim=1).tolist()
            scores[name]["per_prompt_oracle_accuracy"] = {p: round(v, 4) for p, v in zip(prompts, per)}
        n, _, h, w = samples.shape
        grid = Image.new("RGB", (w * cfg.images_per_prompt, h * len(prompts)))
        for i in range(n):
            grid.paste(Image.fromarray(samples[i].permute(1, 2, 0).numpy()),
                       ((i % cfg.images_per_prompt) * w, (i // cfg.images_per_prompt) * h))
        atomic_write_bytes(out / f"samples-{name}.png", encode_png(grid))
    lines = ["| model | CLIP-I | CLIP-T | feature sim. | oracle acc. |", "|---|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['clip_i']} | {s['clip_t']} | {s['feature_similarity']} | {s['oracle_accuracy']} |")
    # Per prompt, since a mean over prompts can hide a concept that is drawn alone but lost in new contexts.
    run_prompts = {name: prompts for name, _, prompts in runs}
    columns = [f"CLIP-T {name}" for name in scores]
    if oracle_label is not None:
        columns += [f"oracle acc. {name}" for name in scores]
    lines += ["", "Per prompt (CLIP-T reads the prompt with the class word in place of the placeholder):", "",
              "| prompt | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for i, prompt in enumerate(plain):
        cells = [str(s["per_prompt_clip_t"][prompt]) for s in scores.values()]
        if oracle_label is not None:
            cells += [str(s["per_prompt_oracle_accuracy"][run_prompts[name][i]]) for name, s in scores.items()]
        lines.append(f"| {cfg.prompts[i]} | " + " | ".join(cells) + " |")
    write_report(out, {"scores": scores, "prompts": cfg.prompts, "adapters": cfg.adapters,
                       "oracle_class": cfg.oracle_class, "seconds": round(time.time() - t0, 2)},
                 "# Personalization evaluation\n\n" + "\n".join(lines) + "\n\nSamples: `samples-adapted.png`, "
                 "`samples-base.png` (one row per prompt).\n")
    record.finish({"scores": scores})
    return EvalPersonalizationResult(out, scores)
