"""The embedded family's figures: what each model can and cannot do, measured on the world.

* dual encoder: zero-shot top-1 on the benchmark's test split (class-name prompts), text->image
  recall@10 on held-out pool images;
* generator: the oracle's accuracy on images drawn from class-name prompts (drawable classes and
  novel ones, the latter near chance: the room personalization must fill), class retention of
  image-embedding-conditioned samples, FID/KID against real test images in the dual encoder's
  image-embedding space, next to a real-vs-real reference;
* oracle: its own test accuracy, the ceiling for the above.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..artefacts import atomic_write_bytes, atomic_write_text, encode_png, slugify
from .data import ImageSplit, load_split

PROMPT = "a photo of a {}"


def _generate(sampler, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, size: int,
              image_embeds: torch.Tensor | None = None, batch: int = 64) -> torch.Tensor:
    from ..generate.sampler import Conditioning

    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        pos, neg = sampler.encode_text(prompts[i : i + batch])
        emb = None if image_embeds is None else image_embeds[i : i + batch]
        labels = sampler.class_labels(emb, 0, gens, len(gens))
        images = sampler.sample(Conditioning(pos, neg, labels), gens, size=size, num_steps=steps,
                                guidance_scale=guidance)
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2))
    return torch.cat(out)


def _grid(images: torch.Tensor, rows: int) -> Image.Image:
    n, _, h, w = images.shape
    cols = (n + rows - 1) // rows
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i in range(n):
        grid.paste(Image.fromarray(images[i].permute(1, 2, 0).numpy()), ((i % cols) * w, (i // cols) * h))
    return grid


def evaluate_family(cfg, world: Path, out: Path, pool: ImageSplit | None = None) -> dict[str, Any]:
    from ..evaluate.metrics import (clip_image_features, clip_t, clip_text_features, frechet_distance,
                                    kernel_inception_distance, recall_at_k, zero_shot_accuracy)
    from ..generate.sampler import Sampler
    from ..models.loading import load_pipeline
    from .clip import load_dual_encoder
    from .oracle import load_oracle

    figures: dict[str, Any] = {}
    test = load_split(world / "bench", "test", progress=False)
    novel = set(_novel_classes(world, test.class_names))
    base_ids = [i for i, n in enumerate(test.class_names) if n not in novel]
    novel_ids = [i for i, n in enumerate(test.class_names) if n in novel]
    figures["classes"] = {"all": test.class_names, "novel": sorted(novel)}

    # Dual encoder.
    clip_model, tokenizer = load_dual_encoder(out / "clip")
    templates = [PROMPT]
    zs_all = zero_shot_accuracy(clip_model, tokenizer, test.images, test.labels, test.class_names, templates)
    base_mask = torch.isin(test.labels, torch.tensor(base_ids))
    zs_base = zero_shot_accuracy(clip_model, tokenizer, test.images[base_mask], test.labels[base_mask],
                                 test.class_names, templates)
    figures["dual_encoder"] = {"zero_shot_top1_all_classes": round(zs_all, 4),
                               "zero_shot_top1_drawable_classes": round(zs_base, 4)}
    if pool is not None and cfg.holdout:
        held = pool.subset(range(len(pool) - cfg.holdout, len(pool)))
        text_f = clip_text_features(clip_model, tokenizer, held.captions)
        image_f = clip_image_features(clip_model, held.images)
        figures["dual_encoder"].update({
            "text_to_image_recall_at_10": round(recall_at_k(text_f, image_f, 10), 4),
            "text_to_image_recall_at_1": round(recall_at_k(text_f, image_f, 1), 4),
            "recall_candidates": len(held)})

    # Oracle.
    oracle = load_oracle(out / "oracle")
    pred, _ = oracle.predict(test.images)
    figures["oracle"] = {"test_top1": round(float((pred == test.labels).float().mean()), 4)}

    # Generator: text prompts per class.
    pipe = load_pipeline(str(out / "generator"), device="cpu", dtype="float32")
    sampler = Sampler(pipe)
    size = test.images.shape[-1]
    n = cfg.eval_images_per_class
    prompts, labels, seeds = [], [], []
    for c, name in enumerate(test.class_names):
        for j in range(n):
            prompts.append(PROMPT.format(name))
            labels.append(c)
            seeds.append(cfg.seed * 100_000 + c * 1000 + j)
    generated = _generate(sampler, prompts, seeds, steps=cfg.eval_steps, guidance=cfg.eval_guidance_scale, size=size)
    labels_t = torch.tensor(labels)
    gen_pred, _ = oracle.predict(generated)
    correct = (gen_pred == labels_t).float()
    per_class = {name: round(float(correct[labels_t == c].mean()), 3) for c, name in enumerate(test.class_names)}
    is_base = torch.isin(labels_t, torch.tensor(base_ids))
    gen_fig: dict[str, Any] = {
        "text_oracle_accuracy_drawable": round(float(correct[is_base].mean()), 4),
        "text_oracle_accuracy_novel": round(float(correct[~is_base].mean()), 4) if novel_ids else None,
        "chance": round(1 / len(test.class_names), 4),
        "text_oracle_accuracy_per_class": per_class,
        "images_per_class": n, "guidance_scale": cfg.eval_guidance_scale, "steps": cfg.eval_steps,
    }
    # CLIP-T of drawable-class generations, and FID/KID vs real test images (dual encoder features).
    gen_f = clip_image_features(clip_model, generated[is_base])
    prompt_f = clip_text_features(clip_model, tokenizer, [p for p, b in zip(prompts, is_base.tolist()) if b])
    gen_fig["clip_t_drawable"] = round(clip_t(gen_f, prompt_f), 4)
    real_base = test.images[base_mask]
    real_f = clip_image_features(clip_model, real_base)
    val = load_split(world / "bench", "val", progress=False)
    val_base = val.images[torch.isin(val.labels, torch.tensor(base_ids))]
    val_f = clip_image_features(clip_model, val_base)
    subset = min(len(gen_f), len(real_f), len(val_f), 500)
    gen_fig["fid_vs_test"] = round(frechet_distance(gen_f.numpy(), real_f.numpy()), 3)
    gen_fig["kid_vs_test"] = [round(v, 5) for v in kernel_inception_distance(gen_f.numpy(), real_f.numpy(),
                                                                            subset_size=subset)]
    gen_fig["fid_real_val_vs_test"] = round(frechet_distance(val_f.numpy(), real_f.numpy()), 3)
    gen_fig["kid_real_val_vs_test"] = [round(v, 5) for v in kernel_inception_distance(val_f.numpy(), real_f.numpy(),
                                                                                     subset_size=subset)]
    gen_fig["feature_space"] = "embedded dual encoder image embeddings"

    # Image-embedding conditioning: does a sample keep its source image's class?
    per = max(1, min(10, n))
    src_idx = torch.cat([torch.nonzero(test.labels == c).flatten()[:per] for c in base_ids])
    src = test.images[src_idx]
    embeds = sampler.image_embeddings(_clip_pixels(src))
    cond_images = _generate(sampler, [""] * len(src), [cfg.seed * 7 + i for i in range(len(src))],
                            steps=cfg.eval_steps, guidance=cfg.eval_guidance_scale, size=size, image_embeds=embeds)
    cond_pred, _ = oracle.predict(cond_images)
    gen_fig["image_conditioned_class_retention"] = round(float((cond_pred == test.labels[src_idx]).float().mean()), 4)
    figures["generator"] = gen_fig

    # Sample grids: one per class, and one overview.
    samples = out / "samples"
    rows = []
    for c, name in enumerate(test.class_names):
        imgs = generated[labels_t == c][:8]
        rows.append(imgs)
        atomic_write_bytes(samples / f"{c:02d}-{slugify(name)}.png", encode_png(_grid(imgs, 1)))
    atomic_write_bytes(samples / "all-classes.png", encode_png(_grid(torch.cat(rows), len(rows))))
    atomic_write_bytes(samples / "image-conditioned.png",
                       encode_png(_grid(torch.cat([src[:16], cond_images[:16]]), 2)))
    figures["training_seconds"] = _training_seconds(out)
    figures["sizes_mb"] = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 2)
                           for p in (out / "clip", out / "generator", out / "oracle")}
    return figures


def _clip_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    from .data import clip_normalize

    return clip_normalize(images_uint8)


def _novel_classes(world: Path, class_names: list[str]) -> list[str]:
    """Benchmark classes built on a shape or pattern the pool never shows (world.json says which)."""
    info = json.loads((world / "world.json").read_text()) if (world / "world.json").is_file() else {}
    novel = {c["name"] for c in info.get("benchmark", {}).get("classes", []) if c.get("novel_concept")}
    return [n for n in class_names if n in novel]


def _training_seconds(out: Path) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for name, file, keys in [("clip", out / "clip" / "genaug_dual_encoder.json", ("result", "seconds")),
                             ("oracle", out / "oracle" / "config.json", ("seconds",))]:
        if file.is_file():
            value: Any = json.loads(file.read_text())
            for k in keys:
                value = value.get(k, {}) if isinstance(value, dict) else {}
            if isinstance(value, (int, float)):
                seconds[name] = float(value)
    gen = out / "generator" / "genaug_generator.json"
    if gen.is_file():
        info = json.loads(gen.read_text())
        seconds["generator_vae"] = info.get("vae_seconds")
        seconds["generator_unet"] = info.get("unet_seconds")
    return seconds


def _recorded_string(record: Path, *keys: str) -> str:
    """A string from a model's JSON record, or "not recorded": e.g. the precision it trained at (recorded since
    2026-12-02: `bf16` autocast runs only where the hardware computes bf16 natively, so it depends on the machine)."""
    value: Any = json.loads(record.read_text()) if record.is_file() else {}
    for key in keys:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return value if isinstance(value, str) else "not recorded"


def write_model_cards(cfg, out: Path, figures: dict[str, Any]) -> None:
    """A card per model plus one for the family: config, data, seed, time, figures, samples."""
    import yaml

    from ..config import config_to_dict

    d, g, o = figures.get("dual_encoder", {}), figures.get("generator", {}), figures.get("oracle", {})
    clip_precision = _recorded_string(out / "clip" / "genaug_dual_encoder.json", "result", "precision")
    oracle_precision = _recorded_string(out / "oracle" / "config.json", "precision")
    generator_precision = _recorded_string(out / "generator" / "genaug_generator.json", "precision")
    normalization = _recorded_string(out / "generator" / "genaug_generator.json", "config", "latent_normalization")
    unet_storage = _recorded_string(out / "generator" / "genaug_generator.json", "config", "unet_storage_dtype")
    latent_space = ("each channel centred, unit variance (in the VAE's quant convolutions); scaling_factor 1"
                    if normalization == "channel" else "SD's single scaling_factor")
    secs = figures.get("training_seconds", {})
    device = figures.get("device", "cpu")
    common = (f"Trained by genaug on the procedural world in `{cfg.world}` (made by `genaug world`), seed "
              f"{cfg.seed}, on {device}. Reproduce: `genaug world --output {cfg.world}` then "
              "`genaug pretrain --config run/config.yaml --output <folder>` (the resolved config this family "
              "was trained with; the repository's `configs/pretrain_embedded.yaml` holds the same settings).\n")
    cards = {
        out / "clip" / "MODEL_CARD.md": (
            "# genaug embedded dual encoder (CLIP-style)\n\n" + common +
            "\ntransformers `CLIPModel` (ViT image tower, text transformer) with a CLIP BPE tokenizer pruned to "
            "the world's vocabulary, trained contrastively on the pool's captions (last "
            f"{cfg.holdout} pool images held out).\n\n"
            f"| figure | value |\n|---|---|\n"
            f"| zero-shot top-1, test split, all classes | {d.get('zero_shot_top1_all_classes')} |\n"
            f"| zero-shot top-1, drawable classes only | {d.get('zero_shot_top1_drawable_classes')} |\n"
            f"| text→image recall@10 ({d.get('recall_candidates')} held-out pool images) | "
            f"{d.get('text_to_image_recall_at_10')} |\n"
            f"| training seconds | {secs.get('clip')} |\n"
            f"| training precision | {clip_precision} |\n"),
        out / "generator" / "MODEL_CARD.md": (
            "# genaug embedded generator (SD 2.1-unCLIP layout)\n\n" + common +
            "\nA stock diffusers `StableUnCLIPImg2ImgPipeline` folder: `AutoencoderKL` (32 px → 16×16×4), "
            "`UNet2DConditionModel` with text cross-attention (frozen embedded text tower) and unCLIP image-"
            "embedding conditioning, trained with conditioning dropout; the null image condition is zeros. "
            "genaug's sampler draws text-only, image-only and text+image samples.\n\n"
            f"| figure | value |\n|---|---|\n"
            f"| oracle accuracy, text prompts, drawable classes | {g.get('text_oracle_accuracy_drawable')} |\n"
            f"| oracle accuracy, text prompts, novel classes (chance {g.get('chance')}) | "
            f"{g.get('text_oracle_accuracy_novel')} |\n"
            f"| image-conditioned samples keeping the source class | {g.get('image_conditioned_class_retention')} |\n"
            f"| CLIP-T (drawable classes) | {g.get('clip_t_drawable')} |\n"
            f"| FID / KID vs real test images | {g.get('fid_vs_test')} / {g.get('kid_vs_test')} |\n"
            f"| FID / KID real val vs real test (reference) | {g.get('fid_real_val_vs_test')} / "
            f"{g.get('kid_real_val_vs_test')} |\n"
            f"| guidance, steps | {g.get('guidance_scale')}, {g.get('steps')} |\n"
            f"| training seconds (VAE, UNet) | {secs.get('generator_vae')}, {secs.get('generator_unet')} |\n"
            f"| training precision | {generator_precision} |\n"
            f"| latents | {latent_space} |\n"
            f"| UNet weights stored as | {unet_storage or 'float32'} (loaded as the pipeline's dtype) |\n\n"
            "Per-class samples: `../samples/`.\n"),
        out / "oracle" / "MODEL_CARD.md": (
            "# genaug embedded oracle classifier\n\n" + common +
            "\nTrained on the world's large balanced `oracle/` sample; used only to judge generated images.\n\n"
            f"| figure | value |\n|---|---|\n| test top-1 | {o.get('test_top1')} |\n"
            f"| training seconds | {secs.get('oracle')} |\n"
            f"| training precision | {oracle_precision} |\n"),
    }
    for path, text in cards.items():
        atomic_write_text(path, text)
    family = ("# genaug embedded model family\n\n" + common + "\n" +
              "\n".join(f"- `{p.parent.name}/`: see `{p.parent.name}/MODEL_CARD.md`" for p in cards) +
              "\n\n## Figures\n\n```json\n" + json.dumps(figures, indent=2) + "\n```\n\n## Config\n\n```yaml\n" +
              yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```\n")
    atomic_write_text(out / "MODEL_CARD.md", family)
