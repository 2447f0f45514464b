"""``genaug retrieve``: per-class nearest neighbours from an indexed pool, written as a dataset.

The baseline of "Image retrieval outperforms diffusion models on data augmentation": instead of
generating images of a class, fetch the closest ones from the generator's own pretraining pool.
Queries are the class name under prompt templates (text -> image, one prompt-ensembled vector per
class), each real training image (image -> image), or both. Every pool image is used at most
once, and none that is (nearly) a duplicate of an excluded split's image — by default the real
data's test split — so retrieval cannot leak test images into training. The output has the
synthesis format: a genaug dataset whose metadata records the query, score and pool row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..artefacts import DatasetWriter, discard_partial_writes, list_splits, read_dataset, slugify
from ..budget import check_budget, images_per_class_budget
from ..config import option
from ..errors import DataError
from ..generate.prompts import DEFAULT_TEMPLATES, fill
from ..runs import RunRecord

QUERY_MODES = ("text", "image", "both")


@dataclass
class RetrieveConfig:
    """Retrieve per-class training images from an indexed pool (the retrieval baseline)."""

    index: str = option("indexes/pool", "index folder written by `genaug index build`")
    output: str = option("datasets/retrieved", "output dataset folder (resumed if it exists)")
    real_data: str | None = option(None, "real dataset (genaug or imagefolder): classes, image queries, budget")
    split: str = option("train", "split of real_data used for image queries and per-class counts")
    class_names: list[str] = option(help="class names, when no real dataset is given", factory=list)
    images_per_class: int = option(0, "budget: this many images for every class")
    per_real: int = option(0, "budget: M images per real training image")
    balance_to: int = option(0, "budget: top every class up to N images counting the real ones (long-tail)")
    query: str = option("text", "text (class-name prompts), image (each real image) or both")
    prompt_templates: list[str] = option(help="prompt templates for text queries, '{}' is the class name",
                                         factory=lambda: list(DEFAULT_TEMPLATES))
    exclude_data: str | None = option(None, "dataset whose images (and near-duplicates) must never be retrieved "
                                            "(default: real_data's test split when it has one)")
    exclude_split: str = option("test", "split of exclude_data")
    dedup_cosine: float = option(0.99, "a pool image this close (embedding cosine) to an excluded image is skipped "
                                       "(an encoder that maps unlike images close together needs a higher value; "
                                       "1 leaves near-duplicates to the pixel hash)")
    dedup_pixel: float = option(8.0, "a pool image whose 16x16 thumbnail differs from an excluded image's by at "
                                     "most this mean absolute difference (0-255 levels) is skipped (-1: off)")
    oversample: int = option(4, "candidates searched per wanted image (grown as needed)")
    model: str | None = option(None, "query encoder (default: the one the index was built with)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        self.images_per_class = check_budget(self.images_per_class, self.per_real, self.balance_to,
                                             bool(self.real_data))
        if not self.real_data and not self.class_names:
            raise ValueError("give real_data or class_names")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {', '.join(QUERY_MODES)}, got {self.query!r}")
        if self.query in ("image", "both") and not self.real_data:
            raise ValueError(f"query {self.query!r} needs real_data (its images are the queries)")
        if not self.prompt_templates:
            raise ValueError("prompt_templates must not be empty")
        for template in self.prompt_templates:
            fill(template, "x")
        if not -1.0 <= self.dedup_cosine <= 1.0:
            raise ValueError(f"dedup_cosine must be in [-1, 1], got {self.dedup_cosine}")
        if self.dedup_pixel < 0 and self.dedup_pixel != -1:
            raise ValueError(f"dedup_pixel must be >= 0, or -1 to turn the pixel check off; got {self.dedup_pixel}")
        if self.oversample < 1:
            raise ValueError("oversample must be at least 1")


@dataclass
class RetrieveResult:
    output: Path
    query: str
    planned: int
    written: int
    skipped_existing: int
    shortfall: dict[str, int]
    rejected_near_duplicates: int
    seconds: float


def thumbnail(image: Image.Image, side: int = 16) -> np.ndarray:
    """A 16x16 RGB box-filtered thumbnail as a flat float32 vector: blind to noise, re-encoding and rescaling.

    (Perceptual hashes such as dHash collide on flat, simple images like the embedded world's.)
    """
    return np.asarray(image.convert("RGB").resize((side, side), Image.BOX), dtype=np.float32).reshape(-1)


def nearest_pixel_distance(thumb: np.ndarray, thumbs: np.ndarray) -> float:
    """Smallest mean absolute difference (0-255 levels) between ``thumb`` and the rows of ``thumbs``."""
    if len(thumbs) == 0:
        return float("inf")
    return float(np.abs(thumbs - thumb).mean(axis=1).min())


class Exclusion:
    """Excluded images (e.g. the test split): their embeddings and 16x16 thumbnails."""

    def __init__(self, embeddings: np.ndarray, thumbs: np.ndarray, cosine: float, pixel: float):
        self.embeddings, self.thumbs, self.cosine, self.pixel = embeddings, thumbs, cosine, pixel
        self._verdicts: dict[int, bool] = {}

    @property
    def rejected(self) -> int:
        return sum(self._verdicts.values())

    def is_near_copy(self, embedding: np.ndarray | None, image_loader) -> bool:
        """Embedding cosine at or above the threshold, or (loading the image only then) a close thumbnail."""
        if embedding is not None and len(self.embeddings) and float((self.embeddings @ embedding).max()) >= self.cosine:
            return True
        return self.pixel >= 0 and len(self.thumbs) > 0 and \
            nearest_pixel_distance(thumbnail(image_loader()), self.thumbs) <= self.pixel

    def rejects(self, row: int, index) -> bool:
        """Whether pool ``row`` is an excluded image or a near-duplicate of one (cached per row)."""
        if row not in self._verdicts:
            self._verdicts[row] = self.is_near_copy(index.image_embeddings[row], lambda: index.pool.image(row))
        return self._verdicts[row]


def _exclusion(cfg: RetrieveConfig, encoder) -> tuple[Exclusion, str | None]:
    location, split = cfg.exclude_data, cfg.exclude_split
    if location is None and cfg.real_data and cfg.exclude_split in list_splits(cfg.real_data):
        location = cfg.real_data
    if location is None:
        return Exclusion(np.zeros((0, encoder.dim), np.float32), np.zeros((0, 768), np.float32), 2.0, -1), None
    ds = read_dataset(location, split)
    images = [ds.image(i) for i in range(len(ds))]
    embeddings = encoder.encode_images(images)
    thumbs = np.stack([thumbnail(im) for im in images]) if images else np.zeros((0, 768), np.float32)
    return Exclusion(embeddings, thumbs, cfg.dedup_cosine, cfg.dedup_pixel), f"{location}:{split}"


def _ranked_candidates(index, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    scores, rows = index.search(queries, k)
    return [[(int(r), float(s)) for r, s in zip(row_ids, row_scores) if r >= 0]
            for row_ids, row_scores in zip(rows, scores)]


def retrieve(cfg: RetrieveConfig) -> RetrieveResult:
    """Plan each class's picks (deterministic), then write the ones the output does not hold yet."""
    from .encoder import ClipEncoder
    from .index import PoolIndex

    t0 = time.time()
    index = PoolIndex(cfg.index)
    real = read_dataset(cfg.real_data, cfg.split) if cfg.real_data else None
    class_names = real.class_names if real is not None else list(cfg.class_names)
    counts = real.class_counts().tolist() if real is not None else [0] * len(class_names)
    budget = images_per_class_budget(counts, images_per_class=cfg.images_per_class, per_real=cfg.per_real,
                                     balance_to=cfg.balance_to)
    encoder = ClipEncoder(cfg.model or index.info["model"], cfg.device)
    if encoder.dim != index.image_embeddings.shape[1]:
        raise DataError(f"the query encoder's embeddings have {encoder.dim} dimensions, the index "
                        f"{index.image_embeddings.shape[1]}", where=cfg.index,
                        fix="query with the model the index was built with (leave --model unset)")
    exclusion, excluded = _exclusion(cfg, encoder)

    taken: set[int] = set()
    plan: list[dict[str, Any]] = []
    shortfall: dict[str, int] = {}
    for label, (name, wanted) in enumerate(tqdm(list(zip(class_names, budget)), desc="retrieve:plan",
                                                 unit="class", dynamic_ncols=True)):
        if wanted <= 0:
            continue
        streams: list[tuple[str, str, np.ndarray]] = []  # (query type, query text or id, vector)
        if cfg.query in ("text", "both"):
            streams.append(("text", f"{name} ({len(cfg.prompt_templates)} templates)",
                            encoder.text_query(name, cfg.prompt_templates)))
        if cfg.query in ("image", "both"):
            members = [i for i, r in enumerate(real.records) if int(r["label"]) == label]
            if members:
                vectors = encoder.encode_images([real.image(i) for i in members])
                streams += [("image", str(real.records[i].get("id", real.records[i]["file_name"])), v)
                            for i, v in zip(members, vectors)]
        if not streams:
            shortfall[name] = wanted
            continue
        picks = _pick_for_class(index, streams, wanted, cfg.oversample, taken, exclusion)
        for j, (row, score, query_type, query) in enumerate(picks):
            taken.add(row)
            plan.append({"id": f"{label:04d}-{slugify(name, 32)}-{j:06d}", "label": label, "row": row,
                         "score": score, "query_type": query_type, "query": query})
        if len(picks) < wanted:
            shortfall[name] = wanted - len(picks)

    out = Path(cfg.output)
    info = {"method": "retrieval", "index": cfg.index, "model": encoder.name, "real_data": cfg.real_data,
            "query": cfg.query, "excluded": excluded}
    with DatasetWriter(out, class_names, split="train", info=info, threads=2) as writer:
        discard_partial_writes(out / "run")
        record = RunRecord.start(out / "run", "retrieve", cfg)  # once the folder is ours
        todo = [p for p in plan if p["id"] not in writer.done_ids]
        for item in tqdm(todo, desc="retrieve:write", unit="img", dynamic_ncols=True):
            meta = index.metadata[item["row"]]
            source = item["query"] if item["query_type"] == "image" else None
            writer.add(item["id"], index.pool.image(item["row"]), item["label"], method="retrieval",
                       query_type=item["query_type"], query=item["query"], score=round(item["score"], 6),
                       pool_row=item["row"], pool_id=meta["id"], pool_ref=meta["ref"],
                       caption=meta["caption"], source=source, sample_weight=1.0, model=encoder.name)
    seconds = round(time.time() - t0, 3)
    result = RetrieveResult(out, cfg.query, len(plan), len(todo), len(plan) - len(todo), shortfall,
                            exclusion.rejected, seconds)
    record.finish({"planned": result.planned, "written": result.written, "shortfall": shortfall,
                   "rejected_near_duplicates": exclusion.rejected, "seconds": seconds})
    return result


def _pick_for_class(index, streams, wanted: int, oversample: int, taken: set[int],
                    exclusion: Exclusion) -> list[tuple[int, float, str, str]]:
    """Round-robin over the query streams, each walking its ranked list; widen the search until done.

    Round-robin makes every real image contribute (DA-Fusion's "M per real image") instead of the
    few queries with the highest scores taking the whole budget.
    """
    per_stream = max(1, -(-wanted // len(streams)))
    k = per_stream * oversample
    while True:
        ranked = _ranked_candidates(index, np.stack([v for _, _, v in streams]), k)
        picks: list[tuple[int, float, str, str]] = []
        chosen: set[int] = set()
        cursors = [0] * len(streams)
        exhausted = False
        while len(picks) < wanted:
            progressed = False
            for s, (query_type, query, _) in enumerate(streams):
                if len(picks) >= wanted:
                    break
                candidates = ranked[s]
                while cursors[s] < len(candidates):
                    row, score = candidates[cursors[s]]
                    cursors[s] += 1
                    if row in taken or row in chosen or row in index.unreadable or exclusion.rejects(row, index):
                        continue
                    picks.append((row, score, query_type, query))
                    chosen.add(row)
                    progressed = True
                    break
            if not progressed:
                exhausted = True
                break
        if len(picks) >= wanted or not exhausted or k >= len(index):
            return picks
        k = min(len(index), k * 2)
