"""``genaug filter``: score a synthetic dataset, drop what fails, weight what stays.

Three independent checks, each recorded per image in the output's metadata:
* CLIP score — cosine between the image and its prompt (or class name) in a CLIP encoder's space;
  images below ``min_clip_score`` are dropped (Diffusion Curriculum filters at 0.3 on real CLIP);
* classifier confidence — a classifier trained on the real data (a ``train-classifier`` run)
  gives the softmax probability of the intended class, at temperature ``temperature``
  (DIAGen's rule): weight 1 when it is at least 0.5, else 2 x confidence, then all weights
  are rescaled to mean 1; images below ``min_confidence`` are dropped;
* near-duplicates of an excluded split (by default the real data's test split) are dropped, by
  the same embedding and thumbnail checks retrieval uses.
The kept images are written to a new dataset with their original metadata plus the scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artefacts import DatasetWriter, list_splits, read_dataset
from ..config import option
from ..runs import RunRecord


@dataclass
class FilterConfig:
    """Score a synthetic dataset (CLIP score, classifier confidence, test near-duplicates); keep and weight."""

    input: str = option("datasets/synth", "synthetic (or retrieved) dataset to filter")
    output: str = option("datasets/synth-filtered", "filtered dataset folder (resumed if it exists)")
    clip_model: str | None = option("embedded:clip", "CLIP encoder for the CLIP score (none: skip the score)")
    min_clip_score: float = option(-1.0, "drop images whose CLIP score is below this (-1 keeps all)")
    classifier: str | None = option(None, "train-classifier run folder for confidence weights (DIAGen)")
    temperature: float = option(1.0, "softmax temperature of the classifier (temperature scaling)")
    min_confidence: float = option(0.0, "drop images whose classifier confidence is below this")
    exclude_data: str | None = option(None, "dataset whose images must not be near-copied (default: the real "
                                            "data's test split, read from the input's provenance)")
    exclude_split: str = option("test", "split of exclude_data")
    dedup_cosine: float = option(0.99, "embedding cosine at which an image counts as a near-duplicate")
    dedup_pixel: float = option(8.0, "thumbnail mean absolute difference at which it does (-1: off)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError("temperature must be positive")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError("min_confidence must be in [0, 1]")


@dataclass
class FilterResult:
    output: Path
    kept: int
    dropped: dict[str, int]
    seconds: float


def confidence_weights(confidence: np.ndarray) -> np.ndarray:
    """DIAGen's rule: 1 where confidence >= 0.5, else 2 x confidence; rescaled to mean 1."""
    weights = np.where(confidence >= 0.5, 1.0, 2.0 * confidence)
    mean = weights.mean() if len(weights) else 1.0
    return weights / mean if mean > 0 else weights


def filter_dataset(cfg: FilterConfig) -> FilterResult:
    from ..retrieve.encoder import ClipEncoder
    from ..retrieve.retrieve import Exclusion, thumbnail

    t0 = time.time()
    ds = read_dataset(cfg.input)
    images = [ds.image(i) for i in range(len(ds))]
    encoder = ClipEncoder(cfg.clip_model, cfg.device) if cfg.clip_model else None
    n = len(ds)
    clip_scores = np.full(n, np.nan)
    image_feats = None
    if encoder is not None:
        image_feats = encoder.encode_images(images)
        texts = [str(r.get("prompt") or f"a photo of a {ds.class_names[int(r['label'])]}") for r in ds.records]
        clip_scores = (image_feats * encoder.encode_texts(texts)).sum(axis=1)
    confidence = np.full(n, np.nan)
    if cfg.classifier:
        from ..evaluate.classifier import load_classifier

        model, class_names, size, mean, std = load_classifier(cfg.classifier)
        lookup = {name: i for i, name in enumerate(class_names)}
        pixels = torch.from_numpy(np.stack([np.asarray(im.resize((size, size))) for im in images]))
        x = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            probs = torch.cat([(model(x[i:i + 256]) / cfg.temperature).softmax(dim=1) for i in range(0, n, 256)])
        targets = [lookup.get(ds.class_names[int(r["label"])], -1) for r in ds.records]
        confidence = np.asarray([float(probs[i, t]) if t >= 0 else 0.0 for i, t in enumerate(targets)])

    # Near-duplicates of the excluded split.
    location = cfg.exclude_data
    real = ds.info.get("real_data")
    if location is None and real and Path(real).is_dir() and cfg.exclude_split in list_splits(real):
        location = real
    near_duplicate = np.zeros(n, dtype=bool)
    if location is not None:
        excluded = read_dataset(location, cfg.exclude_split)
        excluded_images = [excluded.image(i) for i in range(len(excluded))]
        thumbs = np.stack([thumbnail(im) for im in excluded_images])
        exclusion = Exclusion(encoder.encode_images(excluded_images) if encoder else np.zeros((0, 1)), thumbs,
                              cfg.dedup_cosine, cfg.dedup_pixel)
        for i, im in enumerate(images):
            near_duplicate[i] = exclusion.is_near_copy(image_feats[i] if image_feats is not None else None,
                                                       lambda im=im: im)

    keep = ~near_duplicate
    dropped = {"near_duplicate": int(near_duplicate.sum())}
    if encoder is not None:
        low = clip_scores < cfg.min_clip_score
        dropped["clip_score"] = int((low & keep).sum())
        keep &= ~low
    if cfg.classifier:
        low = confidence < cfg.min_confidence
        dropped["confidence"] = int((low & keep).sum())
        keep &= ~low
    weights = np.ones(n)
    if cfg.classifier:
        weights[keep] = confidence_weights(confidence[keep])

    out = Path(cfg.output)
    record = RunRecord.start(out / "run", "filter", cfg)
    info = {**ds.info, "filtered_from": cfg.input}
    with DatasetWriter(out, ds.class_names, split="train", info=info) as writer:
        for i in tqdm(np.flatnonzero(keep).tolist(), desc="filter:write", unit="img", dynamic_ncols=True):
            r = ds.records[i]
            if str(r["id"]) in writer.done_ids:
                continue
            meta = {k: v for k, v in r.items() if k not in ("file_name", "id", "label", "class_name")}
            meta.update(sample_weight=round(float(weights[i]) * float(r.get("sample_weight", 1.0)), 6))
            if encoder is not None:
                meta["clip_score"] = round(float(clip_scores[i]), 6)
            if cfg.classifier:
                meta["classifier_confidence"] = round(float(confidence[i]), 6)
            writer.add(str(r["id"]), images[i], int(r["label"]), **meta)
    result = FilterResult(out, int(keep.sum()), dropped, round(time.time() - t0, 3))
    record.finish({"kept": result.kept, "dropped": dropped, "input_images": n})
    return result
