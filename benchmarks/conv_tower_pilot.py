"""Pilot: the embedded dual encoder with a convolutional image tower in place of CLIP's ViT (issue 3).

The shipped dual encoder's ViT tower reads the pool's object shape at 0.29 by linear probe after its
CPU budget, and zero-shot top-1 on the drawable classes stays at 0.22 (target 0.80). Trained
*supervised* on shape, the same ViT reaches 0.35 in 4,000 steps where the classifiers' small CNN
reaches 0.81 in 2,000 (`shape_probe.py`). This pilot asks what the whole dual encoder would score with
that CNN as its image tower, everything else as `genaug pretrain` trains it: the shipped config's
`clip` section (4,000 steps of batch 128, NegCLIP hard negatives, the attribute heads, the schedule),
the same stock `CLIPTextModel` text tower, pool, tokenizer, held-out images and seed.

The CNN tower (`genaug_cnn_small`, pooled features and a linear projection) is grafted onto the
`CLIPModel` that `train_dual_encoder` builds, by replacing its `get_image_features`; the ViT tower
stays in the model untrained. The result does not load as a stock `CLIPModel` (nor as the
`image_encoder` of diffusers' unCLIP pipelines), so it is a measurement, not a shippable family.
`--tower vit` trains the shipped architecture through the same script; `--tower shipped` scores the
shipped dual encoder (`genaug/embedded/clip`) without training, as the control.

    python benchmarks/conv_tower_pilot.py --tower cnn --out runs/pilot-conv-tower
    python benchmarks/conv_tower_pilot.py --tower shipped --out runs/pilot-shipped-tower

Prints and writes (`<out>/figures.json`), for the same 1,000 held-out pool images: text-to-image
recall@1/10; zero-shot top-1 on the bench test split as `genaug pretrain` reports it (drawable classes;
all classes) and over the pool's shape and pattern names alone; linear probes of the image embeddings
for shape, pattern, colour and background (`dual_encoder_probe.py`'s, fitted on the first 8,000 pool
images); the text tower's word cosines (1 = merged). About 41 minutes on 2 CPU cores with the CNN tower
(0.6 s a step against the ViT's 0.25: the CNN runs in float32, 15x slower under the CPU's bf16);
`--steps` shortens the recipe.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import torch

from dual_encoder_probe import ATTRIBUTES, linear_probe, word_cosines  # benchmarks/ is on sys.path here
from genaug.config import config_from_dict, read_config_file


def build_conv_tower(projection_dim: int) -> torch.nn.Sequential:
    """The classifiers' small CNN (pooled features) and a bias-free linear projection, freshly initialized."""
    import importlib

    import timm

    importlib.import_module("genaug.evaluate.backbones")  # registers genaug_cnn_small with timm
    cnn = timm.create_model("genaug_cnn_small", num_classes=0)
    return torch.nn.Sequential(cnn, torch.nn.Linear(cnn.num_features, projection_dim, bias=False))


def graft_conv_tower(model, projection_dim: int, seed: int):
    """Give a ``CLIPModel`` the classifiers' small CNN as its image tower (in place; returns the model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        model.conv_tower = build_conv_tower(projection_dim)
    model.vision_model.requires_grad_(False)
    model.visual_projection.requires_grad_(False)

    def get_image_features(self, pixel_values=None, **_):
        # float32 even under the recipe's bf16 autocast: on the CPU this CNN runs 15x slower in bf16.
        with torch.autocast(pixel_values.device.type, enabled=False):
            return types.SimpleNamespace(pooler_output=self.conv_tower(pixel_values.float()))

    model.get_image_features = types.MethodType(get_image_features, model)
    return model


class ConvImageEncoder(torch.nn.Module):
    """A trained conv tower as the generator's ``image_encoder``: ``(pixel_values) -> .image_embeds``.

    The slice of ``CLIPVisionModelWithProjection``'s interface that ``train_generator`` and genaug's sampler
    use (``.image_embeds``, ``.device``, ``.dtype``). It is not a transformers model, so a pipeline holding it
    cannot be saved whole.
    """

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.tower = tower

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor, **_) -> types.SimpleNamespace:
        return types.SimpleNamespace(image_embeds=self.tower(pixel_values.float()))


def load_conv_image_encoder(folder: str | Path) -> ConvImageEncoder:
    """The CNN tower (and its projection) of a dual encoder this pilot trained (``<out>/clip``), in eval mode."""
    from safetensors.torch import load_file

    tensors = load_file(Path(folder) / "model.safetensors")
    prefix = "conv_tower."
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{folder}: no conv_tower.* weights: not a dual encoder trained with --tower cnn")
    tower = build_conv_tower(projection_dim=weights["1.weight"].shape[0])
    tower.load_state_dict(weights, strict=True)
    return ConvImageEncoder(tower).eval().requires_grad_(False)


def score(model, tokenizer, world: Path, pool, n_train: int) -> dict:
    """The pilot's figures for a trained dual encoder (see the module docstring)."""
    from genaug.evaluate.metrics import clip_image_features, clip_text_features, recall_at_k, zero_shot_accuracy
    from genaug.pretrain.data import load_split
    from genaug.pretrain.figures import PROMPT, _novel_classes

    model.eval()
    held = pool.subset(range(n_train, len(pool)))
    text_feats = clip_text_features(model, tokenizer, held.captions)
    image_feats = clip_image_features(model, held.images)
    figures = {f"recall@{k}": round(recall_at_k(text_feats, image_feats, k), 4) for k in (1, 10)}
    test = load_split(world / "bench", "test", progress=False)
    novel = set(_novel_classes(world, test.class_names))
    drawable = torch.isin(test.labels, torch.tensor([i for i, n in enumerate(test.class_names) if n not in novel]))
    figures["zero_shot_top1_drawable_classes"] = round(zero_shot_accuracy(
        model, tokenizer, test.images[drawable], test.labels[drawable], test.class_names, [PROMPT]), 4)
    figures["zero_shot_top1_all_classes"] = round(zero_shot_accuracy(
        model, tokenizer, test.images, test.labels, test.class_names, [PROMPT]), 4)
    probe_train = list(range(8000))
    train_feats = clip_image_features(model, pool.images[probe_train])
    for key in ATTRIBUTES:
        names = sorted({str(r[key]) for r in pool.records})
        labels = torch.tensor([names.index(str(r[key])) for r in pool.records])
        held_labels = labels[n_train:len(pool)]
        figures[f"probe_{key}"] = round(linear_probe(train_feats, labels[probe_train], image_feats, held_labels,
                                                     len(names)), 4)
        figures[f"{key}_chance"] = round(1 / len(names), 3)
        if key in ("shape", "pattern"):  # the attribute read alone, zero-shot from its own names
            figures[f"zero_shot_{key}_pool"] = round(zero_shot_accuracy(model, tokenizer, held.images, held_labels,
                                                                        names, [PROMPT]), 4)
    figures["text_word_cosines"] = word_cosines(model, tokenizer)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--config", default="configs/pretrain_embedded.yaml", help="its clip section is the recipe")
    parser.add_argument("--tower", choices=("cnn", "vit", "shipped"), default="cnn")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's dual-encoder steps")
    parser.add_argument("--evaluate-only", action="store_true", help="score the dual encoder already in <out>/clip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/pilot-conv-tower")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import genaug.pretrain.clip as clip_module
    from genaug.models.embedded import EMBEDDED_ROOT
    from genaug.models.tokenizer import build_clip_tokenizer
    from genaug.pretrain.data import load_split
    from genaug.pretrain.run import PretrainConfig, _tokenizer_corpus

    world, out = Path(args.world), Path(args.out)
    recipe = read_config_file(args.config)
    recipe["world"], recipe["output"] = str(world), str(out)
    cfg = config_from_dict(PretrainConfig, recipe, args.config)
    clip_cfg = cfg.clip_config()
    if args.steps:
        clip_cfg.steps = args.steps
    if args.tower == "cnn":
        stock_build = clip_module.build_dual_encoder

        def build_with_conv_tower(config, vocab_size, **kwargs):
            return graft_conv_tower(stock_build(config, vocab_size, **kwargs), config.projection_dim, config.seed)

        clip_module.build_dual_encoder = build_with_conv_tower

    pool = load_split(world / "pool", "train", progress=False)
    n_train = len(pool) - cfg.holdout
    figures: dict = {"tower": args.tower}
    if args.tower == "shipped":
        model, tokenizer = clip_module.load_dual_encoder(EMBEDDED_ROOT / "clip")
    else:
        tokenizer = build_clip_tokenizer(out / "tokenizer", model_max_length=clip_cfg.max_text_length,
                                         corpus=_tokenizer_corpus(world, pool.captions))
        if not args.evaluate_only:
            started = time.time()
            clip_module.train_dual_encoder(clip_cfg, pool.subset(range(n_train)), tokenizer, out / "clip",
                                           eval_split=pool.subset(range(n_train, len(pool))))
            figures.update(steps=clip_cfg.steps, train_seconds=round(time.time() - started, 1))
        model = clip_module.build_dual_encoder(clip_cfg, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(out / "clip" / "model.safetensors"), strict=True)
    figures.update(score(model, tokenizer, world, pool, n_train))
    out.mkdir(parents=True, exist_ok=True)
    name = "figures.json" if not args.evaluate_only else "figures-evaluated.json"
    (out / name).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
