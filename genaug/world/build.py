"""Build the procedural world on disk: pretraining pool, long-tail benchmark, few-shot, oracle and novel sets.

Every image is rendered from its own random stream ``default_rng([seed, split_id, *key])``, so an
image depends only on the seed and its place in the world, never on worker scheduling or on
what was rendered before it. Results come back in submission order and are written by this
process alone, so the same config always produces byte-identical files, and a killed build
resumes where it stopped (the dataset writers skip ids already on disk).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..artefacts import DatasetWriter, METADATA, atomic_write_json, read_metadata_lines, slugify
from ..config import config_to_dict, option
from ..errors import DataError
from .render import (ALL_PATTERNS, ALL_SHAPES, BACKGROUNDS, BASE_PATTERNS, BASE_SHAPES, COLOURS, NOVEL_PATTERNS,
                     NOVEL_SHAPES, SceneOptions, SceneSpec, caption_pair, caption_scene, object_masks, render_scene,
                     sample_pair_scene, sample_scene, scene_attributes)

WORLD_FORMAT = "genaug-world"
WORLD_VERSION = 1
WORLD_JSON = "world.json"
# One id per random-stream family; distinct ids keep e.g. test renders apart from train renders.
SPLIT_IDS: dict[str, int] = {"pool": 1, "bench-train": 2, "bench-test": 3, "bench-val": 4, "fewshot": 5,
                             "oracle": 6, "novel": 7, "novel-pairs": 8, "fewshot-sample": 9, "longtail-order": 10}
# Settings that change how the world is built, not what it holds; left out of world.json so two
# builds of the same world in different folders are byte-identical.
BUILD_ONLY_FIELDS = ("output", "workers", "progress")
MANY_ABOVE, FEW_BELOW = 100, 20


@dataclass
class WorldConfig:
    """Settings of the procedural world (``genaug world``)."""

    output: str = option("worlds/default", "folder the world is written to (resumes an interrupted build)")
    seed: int = option(0, "world seed: the same seed and settings give byte-identical files")
    image_size: int = option(32, "image side in pixels (16-512)")
    supersample: int = option(4, "render at this many times the size, then box-downsample (anti-aliasing)")
    pool_size: int = option(50000, "captioned images in the pretraining/retrieval pool (base shapes/patterns only)")
    bench_shapes: list[str] = option(help="base shapes of the benchmark's class grid",
                                     factory=lambda: ["circle", "square", "diamond", "triangle", "cross"])
    bench_patterns: list[str] = option(help="base patterns of the benchmark's class grid",
                                       factory=lambda: ["plain", "striped", "dotted", "checkered"])
    novel_classes: list[str] = option(help="extra benchmark classes 'pattern shape' holding one novel shape or pattern",
                                      factory=lambda: ["dotted star", "plain heart", "zigzag circle", "wavy square"])
    train_max: int = option(500, "long-tail train images of the most frequent class")
    train_min: int = option(5, "long-tail train images of the rarest class")
    test_per_class: int = option(50, "balanced test images per benchmark class")
    val_per_class: int = option(20, "balanced validation images per benchmark class")
    fewshot_k: list[int] = option(help="shots per class of the few-shot splits", factory=lambda: [1, 2, 4, 8, 16])
    fewshot_trials: int = option(4, "independent few-shot samples per k")
    fewshot_candidates: int = option(64, "balanced candidates per class each few-shot trial samples from")
    oracle_per_class: int = option(300, "balanced images per class for training the oracle judge")
    novel_refs: int = option(5, "reference images per novel concept (personalization input)")
    novel_pair_images: int = option(5, "images per pair of novel concepts shown side by side")
    second_object_prob: float = option(0.35, "probability of a smaller plain second object")
    occlusion_prob: float = option(0.2, "probability that a patch partly hides the main object")
    nuisance_strength: float = option(1.0, "scale of lighting, blur and noise nuisances (0 turns them off)")
    workers: int = option(2, "rendering processes (0 renders in this process); output does not depend on it")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not str(self.output).strip():
            raise ValueError("output must be a folder path")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}")
        if not 1 <= self.supersample <= 8:
            raise ValueError(f"supersample must be in [1, 8], got {self.supersample}")
        for name in ("pool_size", "train_min", "test_per_class", "val_per_class", "fewshot_trials",
                     "oracle_per_class", "novel_refs", "novel_pair_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_max < self.train_min:
            raise ValueError(f"train_max ({self.train_max}) must be >= train_min ({self.train_min})")
        if not self.fewshot_k:
            raise ValueError("fewshot_k must list at least one k")
        if any(k < 1 for k in self.fewshot_k) or len(set(self.fewshot_k)) != len(self.fewshot_k):
            raise ValueError(f"fewshot_k must hold distinct positive integers, got {self.fewshot_k}")
        if self.fewshot_candidates < max(self.fewshot_k):
            raise ValueError(f"fewshot_candidates ({self.fewshot_candidates}) must be >= the largest k "
                             f"({max(self.fewshot_k)})")
        for name in ("second_object_prob", "occlusion_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.nuisance_strength <= 2.0:
            raise ValueError(f"nuisance_strength must be in [0, 2], got {self.nuisance_strength}")
        if not 0 <= self.workers <= 64:
            raise ValueError(f"workers must be in [0, 64], got {self.workers}")
        _check_vocabulary("bench_shapes", self.bench_shapes, BASE_SHAPES)
        _check_vocabulary("bench_patterns", self.bench_patterns, BASE_PATTERNS)
        names = [c.name for c in benchmark_classes(self)]  # parses novel_classes, raising ValueError
        if len(set(names)) != len(names):
            raise ValueError("benchmark classes must be distinct (a novel class repeats a grid class?)")
        if len(names) < 2:
            raise ValueError("the benchmark needs at least 2 classes")

    def scene_options(self) -> SceneOptions:
        return SceneOptions(image_size=self.image_size, supersample=self.supersample,
                            second_object_prob=self.second_object_prob, occlusion_prob=self.occlusion_prob,
                            nuisance_strength=self.nuisance_strength)


@dataclass
class WorldResult:
    """Where the world was written, how many images each part holds, and how long it took."""

    output: str
    world_json: str
    paths: dict[str, str]
    counts: dict[str, int]
    num_images: int
    rendered: int
    seconds: float


def _check_vocabulary(name: str, values: list[str], allowed: tuple[str, ...]) -> None:
    if not values:
        raise ValueError(f"{name} must not be empty")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{name}: {unknown[0]!r} is not one of {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} holds duplicates: {values}")


# --------------------------------------------------------------------------- world description
@dataclass(frozen=True)
class BenchClass:
    """A benchmark class: one (pattern, shape) combination; its name is the caption phrase."""

    pattern: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.pattern} {self.shape}"

    @property
    def novel_concept(self) -> str:
        if self.shape in NOVEL_SHAPES:
            return f"{self.shape} shape"
        if self.pattern in NOVEL_PATTERNS:
            return f"{self.pattern} pattern"
        return ""


@dataclass(frozen=True)
class NovelConcept:
    """A held-out shape or pattern, learnable only from its reference images."""

    word: str
    kind: str  # "shape" or "pattern"

    @property
    def name(self) -> str:
        return f"{self.word} {self.kind}"

    @property
    def slug(self) -> str:
        return slugify(self.name)

    def object_attributes(self) -> tuple[str | None, str | None]:
        """(shape, pattern) with the free one left as None, to be drawn from the base vocabulary."""
        return (self.word, None) if self.kind == "shape" else (None, self.word)


NOVEL_CONCEPTS: tuple[NovelConcept, ...] = tuple(
    [NovelConcept(s, "shape") for s in NOVEL_SHAPES] + [NovelConcept(p, "pattern") for p in NOVEL_PATTERNS])


def benchmark_classes(cfg: WorldConfig) -> list[BenchClass]:
    """The base (pattern x shape) grid, so classes differ by one attribute, then the novel classes."""
    classes = [BenchClass(p, s) for s in cfg.bench_shapes for p in cfg.bench_patterns]
    for text in cfg.novel_classes:
        words = text.split()
        if len(words) != 2:
            raise ValueError(f"novel class {text!r} must be 'pattern shape', e.g. 'dotted star'")
        pattern, shape = words
        if pattern not in ALL_PATTERNS or shape not in ALL_SHAPES:
            raise ValueError(f"novel class {text!r}: unknown pattern or shape "
                             f"(patterns: {', '.join(ALL_PATTERNS)}; shapes: {', '.join(ALL_SHAPES)})")
        novel_count = (shape in NOVEL_SHAPES) + (pattern in NOVEL_PATTERNS)
        if novel_count != 1:
            raise ValueError(f"novel class {text!r} must hold exactly one novel shape or pattern "
                             f"(novel shapes: {', '.join(NOVEL_SHAPES)}; novel patterns: {', '.join(NOVEL_PATTERNS)})")
        classes.append(BenchClass(pattern, shape))
    return classes


def longtail_counts(num_classes: int, most: int, fewest: int, seed: int) -> list[int]:
    """Train counts per class label: an exponential (CIFAR-LT style) profile from ``most`` down to
    ``fewest``, assigned to classes in a seed-dependent random order."""
    if num_classes == 1:
        by_rank = [most]
    else:
        by_rank = [int(round(most * (fewest / most) ** (r / (num_classes - 1)))) for r in range(num_classes)]
        by_rank[0], by_rank[-1] = most, fewest
    order = np.random.default_rng([seed, SPLIT_IDS["longtail-order"]]).permutation(num_classes)
    counts = [0] * num_classes
    for rank, label in enumerate(order):
        counts[int(label)] = by_rank[rank]
    return counts


def bucket_of(count: int) -> str:
    return "many" if count > MANY_ABOVE else "few" if count < FEW_BELOW else "medium"


def describe_world(cfg: WorldConfig) -> dict[str, Any]:
    """The content of world.json: vocabulary, benchmark classes, novel concepts, folders and counts."""
    classes = benchmark_classes(cfg)
    counts = longtail_counts(len(classes), cfg.train_max, cfg.train_min, cfg.seed)
    pairs = list(combinations(NOVEL_CONCEPTS, 2))
    fewshot = {f"k{k}-trial{t}": k * len(classes) for k in cfg.fewshot_k for t in range(cfg.fewshot_trials)}
    return {
        "format": WORLD_FORMAT,
        "version": WORLD_VERSION,
        "image_size": cfg.image_size,
        "shapes": {"base": list(BASE_SHAPES), "novel": list(NOVEL_SHAPES)},
        "patterns": {"base": list(BASE_PATTERNS), "novel": list(NOVEL_PATTERNS)},
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "backgrounds": list(BACKGROUNDS),
        "within_class_variation": ["colour", "size", "rotation", "position", "background", "second object",
                                   "lighting", "contrast", "blur", "pixel noise", "occlusion"],
        "benchmark": {
            "folder": "bench",
            "splits": {"train": sum(counts), "test": cfg.test_per_class * len(classes),
                       "val": cfg.val_per_class * len(classes)},
            "bucket_rule": f"many: > {MANY_ABOVE} train images, medium: {FEW_BELOW}-{MANY_ABOVE}, few: < {FEW_BELOW}",
            "classes": [{"label": i, "name": c.name, "shape": c.shape, "pattern": c.pattern,
                         "novel_concept": c.novel_concept, "train_count": counts[i], "bucket": bucket_of(counts[i])}
                        for i, c in enumerate(classes)],
        },
        "pool": {"folder": "pool", "size": cfg.pool_size, "label": "shape", "class_names": list(BASE_SHAPES)},
        "fewshot": {"folder": "fewshot", "splits": fewshot, "candidates_per_class": cfg.fewshot_candidates},
        "oracle": {"folder": "oracle", "size": cfg.oracle_per_class * len(classes)},
        "novel": {"folder": "novel",
                  "concepts": [{"concept": c.name, "word": c.word, "kind": c.kind, "class_word": c.kind,
                                "slug": c.slug, "images": cfg.novel_refs} for c in NOVEL_CONCEPTS]},
        "novel_pairs": {"folder": "novel-pairs", "pairs": [[a.name, b.name] for a, b in pairs],
                        "images_per_pair": cfg.novel_pair_images},
        "config": {k: v for k, v in config_to_dict(cfg).items() if k not in BUILD_ONLY_FIELDS},
    }


# --------------------------------------------------------------------------- rendering tasks
@dataclass(frozen=True)
class RenderTask:
    """One image to render: its random-stream key and what the key's scene must show."""

    key: tuple[int, ...]
    mode: str  # "pool", "class", "reference" or "pair"
    objects: tuple[tuple[str | None, str | None], ...] = ()  # (shape, pattern); None = drawn from the base set


@dataclass
class RenderedItem:
    image: np.ndarray
    caption: str
    attributes: dict[str, Any]


def _fill(rng: np.random.Generator, shape: str | None, pattern: str | None) -> tuple[str, str]:
    return (shape or str(rng.choice(BASE_SHAPES)), pattern or str(rng.choice(BASE_PATTERNS)))


def _task_scene(task: RenderTask, seed: int, options: SceneOptions) -> tuple[SceneSpec, np.random.Generator]:
    """The task's scene, and its random stream positioned where the caption draws from it."""
    rng = np.random.default_rng([seed, *task.key])
    if task.mode == "pair":
        left, right = (_fill(rng, s, p) for s, p in task.objects)
        return sample_pair_scene(rng, options, left, right), rng
    shape, pattern = _fill(rng, *(task.objects[0] if task.objects else (None, None)))
    reference = task.mode == "reference"
    # References show the concept clearly: alone, unoccluded, with milder nuisances.
    spec = sample_scene(rng, options, shape, pattern, allow_second=not reference,
                        allow_occlusion=not reference, mild=reference)
    return spec, rng


def render_task(task: RenderTask, seed: int, options: SceneOptions) -> RenderedItem:
    """Render one task from its own random stream (a pure function of seed, key and options)."""
    spec, rng = _task_scene(task, seed, options)
    caption = caption_pair(spec, rng) if task.mode == "pair" else caption_scene(spec, rng)
    return RenderedItem(render_scene(spec, options.supersample), caption, scene_attributes(spec))


def world_object_masks(world_dir: str | Path, dataset: str, item_ids: list[str]) -> dict[str, list[np.ndarray]]:
    """Per-object visible masks (``object_masks``) of items of a built world, re-derived from its seed.

    ``dataset`` is a plan name: ``bench/train``, ``novel/<slug>``, ``novel-pairs``, ``pool``, ...
    The main object (the labelled one) comes first; pair images list both concepts, left then right.
    """
    world_dir = Path(world_dir)
    world_json = world_dir / WORLD_JSON
    if not world_json.exists():
        raise DataError("not a genaug world (no world.json)", where=str(world_dir),
                        fix="pass the folder `genaug world --output` wrote")
    world = json.loads(world_json.read_text())
    cfg = WorldConfig(**{**world["config"], "output": str(world_dir)})
    plans = {plan.name: plan for plan in plan_world(cfg, world)}
    if dataset not in plans:
        raise DataError(f"no dataset {dataset!r} in this world", where=str(world_dir),
                        fix=f"use one of {', '.join(plans)}")
    entries = {e.item_id: e for e in plans[dataset].entries}
    missing = [i for i in item_ids if i not in entries]
    if missing:
        raise DataError(f"{len(missing)} item ids not in {dataset} (first: {missing[0]!r})", where=str(world_dir),
                        fix="use the ids of that dataset's metadata.jsonl")
    options = cfg.scene_options()
    return {i: object_masks(_task_scene(entries[i].task, cfg.seed, options)[0], options.supersample)
            for i in item_ids}


def write_masks(folder: str | Path, masks: dict[str, np.ndarray]) -> Path:
    """Write ``{id: coverage in [0, 1]}`` as a dataset of white-on-black mask images, in the dict's order
    (the form ``train-lora --instance-mask-data`` and ``train-multiconcept --mask-data`` read); resumable."""
    with DatasetWriter(Path(folder), ["mask"]) as writer:
        for item_id, mask in masks.items():
            if item_id not in writer.done_ids:
                pixels = (np.clip(mask, 0.0, 1.0) * 255).round().astype(np.uint8)
                writer.add(item_id, Image.fromarray(pixels).convert("RGB"), 0)
    return Path(folder)


def _render_batch(tasks: list[RenderTask], seed: int, options: SceneOptions) -> list[RenderedItem]:
    return [render_task(t, seed, options) for t in tasks]


@contextlib.contextmanager
def render_stream(tasks: list[RenderTask], seed: int, options: SceneOptions, workers: int,
                  batch_size: int = 128, batches_ahead: int = 6) -> Iterator[Iterator[RenderedItem]]:
    """Yield an iterator over ``tasks`` rendered in order by ``workers`` processes; at most
    ``batches_ahead`` batches are in flight, so memory stays bounded when writing is the slower side.
    The pool is started on entry (before any progress bar thread) and shut down on exit."""
    if workers == 0 or len(tasks) <= batch_size:
        yield (render_task(task, seed, options) for task in tasks)
        return
    # fork (as torch's DataLoader does): spawn/forkserver re-import the caller's main module, which
    # breaks for stdin scripts and for scripts without a __main__ guard.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers) as pool:
        yield _ordered_results(pool, tasks, seed, options, batch_size, batches_ahead)


def _ordered_results(pool: Any, tasks: list[RenderTask], seed: int, options: SceneOptions, batch_size: int,
                     batches_ahead: int) -> Iterator[RenderedItem]:
    batches = (tasks[i:i + batch_size] for i in range(0, len(tasks), batch_size))
    work = partial(_render_batch, seed=seed, options=options)
    pending: deque = deque(pool.apply_async(work, (b,)) for b in _take(batches, batches_ahead))
    while pending:
        results = pending.popleft().get()
        for batch in _take(batches, 1):
            pending.append(pool.apply_async(work, (batch,)))
        yield from results


def _take(iterator: Iterator[list[RenderTask]], n: int) -> list[list[RenderTask]]:
    out = []
    for _ in range(n):
        item = next(iterator, None)
        if item is None:
            break
        out.append(item)
    return out


# --------------------------------------------------------------------------- dataset plans
@dataclass
class Entry:
    item_id: str
    task: RenderTask
    label: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetPlan:
    """One dataset split to write: where, with which classes, and its items in order."""

    name: str
    root: Path
    split: str
    class_names: list[str]
    info: dict[str, Any]
    entries: list[Entry]


def plan_world(cfg: WorldConfig, world: dict[str, Any]) -> list[DatasetPlan]:
    """Every dataset of the world with every item, in the order they are written."""
    out = Path(cfg.output)
    classes = benchmark_classes(cfg)
    class_names = [c.name for c in classes]
    counts = [c["train_count"] for c in world["benchmark"]["classes"]]
    plans: list[DatasetPlan] = []

    pool_entries = [Entry(f"pool-{i:06d}", RenderTask((SPLIT_IDS["pool"], i), "pool"), -1)
                    for i in range(cfg.pool_size)]
    plans.append(DatasetPlan("pool", out / "pool", "train", list(BASE_SHAPES),
                             {"world": WORLD_FORMAT, "seed": cfg.seed, "label": "shape of the main object",
                              "novel_free": True}, pool_entries))

    def class_entries(split_key: str, prefix: str, per_class: list[int]) -> list[Entry]:
        entries = []
        for label, bench_class in enumerate(classes):
            for j in range(per_class[label]):
                task = RenderTask((SPLIT_IDS[split_key], label, j), "class",
                                  ((bench_class.shape, bench_class.pattern),))
                entries.append(Entry(f"{prefix}-{label:03d}-{j:04d}", task, label,
                                     {"novel_concept": bench_class.novel_concept}))
        return entries

    bench_info = {
        "world": WORLD_FORMAT, "seed": cfg.seed,
        "classes": world["benchmark"]["classes"],
        "train_counts": {c.name: n for c, n in zip(classes, counts)},
        "buckets": {c.name: bucket_of(n) for c, n in zip(classes, counts)},
        "bucket_rule": world["benchmark"]["bucket_rule"],
    }
    for split, key, per_class in (("train", "bench-train", counts),
                                  ("test", "bench-test", [cfg.test_per_class] * len(classes)),
                                  ("val", "bench-val", [cfg.val_per_class] * len(classes))):
        plans.append(DatasetPlan(f"bench/{split}", out / "bench", split, class_names, bench_info,
                                 class_entries(key, split, per_class)))

    # Few-shot trials sample from a balanced candidate set of their own (candidate j of class c is
    # always the same render), never from the long-tail train split.
    candidates = class_entries("fewshot", "cand", [cfg.fewshot_candidates] * len(classes))
    by_class = [candidates[c * cfg.fewshot_candidates:(c + 1) * cfg.fewshot_candidates] for c in range(len(classes))]
    for k in cfg.fewshot_k:
        for trial in range(cfg.fewshot_trials):
            rng = np.random.default_rng([cfg.seed, SPLIT_IDS["fewshot-sample"], k, trial])
            chosen = [by_class[c][int(j)] for c in range(len(classes))
                      for j in np.sort(rng.choice(cfg.fewshot_candidates, size=k, replace=False))]
            name = f"k{k}-trial{trial}"
            plans.append(DatasetPlan(f"fewshot/{name}", out / "fewshot" / name, "train", class_names,
                                     {"world": WORLD_FORMAT, "seed": cfg.seed, "k": k, "trial": trial,
                                      "candidates_per_class": cfg.fewshot_candidates}, chosen))

    plans.append(DatasetPlan("oracle", out / "oracle", "train", class_names,
                             {"world": WORLD_FORMAT, "seed": cfg.seed, "purpose": "training the oracle judge"},
                             class_entries("oracle", "oracle", [cfg.oracle_per_class] * len(classes))))

    for ci, concept in enumerate(NOVEL_CONCEPTS):
        entries = [Entry(f"ref-{j:03d}", RenderTask((SPLIT_IDS["novel"], ci, j), "reference",
                                                    (concept.object_attributes(),)), 0,
                         {"concept": concept.name, "concept_word": concept.word, "class_word": concept.kind})
                   for j in range(cfg.novel_refs)]
        plans.append(DatasetPlan(f"novel/{concept.slug}", out / "novel" / concept.slug, "train", [concept.name],
                                 {"world": WORLD_FORMAT, "seed": cfg.seed, "concept": concept.name,
                                  "concept_word": concept.word, "class_word": concept.kind}, entries))

    pairs = list(combinations(NOVEL_CONCEPTS, 2))
    pair_entries = []
    for pi, (a, b) in enumerate(pairs):
        for j in range(cfg.novel_pair_images):
            # Alternate sides so neither concept is always on the left.
            left, right = (a, b) if j % 2 == 0 else (b, a)
            task = RenderTask((SPLIT_IDS["novel-pairs"], pi, j), "pair",
                              (left.object_attributes(), right.object_attributes()))
            pair_entries.append(Entry(f"pair-{pi:03d}-{j:03d}", task, pi, {"concepts": [left.name, right.name]}))
    plans.append(DatasetPlan("novel-pairs", out / "novel-pairs", "train", [f"{a.name} + {b.name}" for a, b in pairs],
                             {"world": WORLD_FORMAT, "seed": cfg.seed}, pair_entries))
    return plans


# --------------------------------------------------------------------------- build
def _check_existing(out: Path, world: dict[str, Any]) -> None:
    """Refuse to resume into a folder that holds a different world."""
    path = out / WORLD_JSON
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError("world.json is corrupt", where=str(path), fix="delete the folder and rebuild") from None
    if existing != json.loads(json.dumps(world)):
        raise DataError("this folder holds a world built with other settings", where=str(out),
                        fix="use another --output, or delete the folder to rebuild it")


def _done_ids(plan: DatasetPlan) -> set[str]:
    rows = read_metadata_lines(plan.root / plan.split / METADATA, tolerate_partial_tail=True)
    return {str(r.get("id")) for r in rows}


def build_world(cfg: WorldConfig) -> WorldResult:
    """Render and write the whole world under ``cfg.output``; resumes a partial build."""
    started = time.perf_counter()
    out = Path(cfg.output)
    world = describe_world(cfg)
    _check_existing(out, world)
    out.mkdir(parents=True, exist_ok=True)
    # Written first: it depends only on the config, and lets a resumed build check it is the same world.
    atomic_write_json(out / WORLD_JSON, world)

    plans = plan_world(cfg, world)
    pending = [[e for e in plan.entries if e.item_id not in done] for plan, done in
               ((p, _done_ids(p)) for p in plans)]
    tasks = [e.task for entries in pending for e in entries]
    with render_stream(tasks, cfg.seed, cfg.scene_options(), cfg.workers) as stream, \
            tqdm(total=len(tasks), desc="genaug world", unit="img", disable=not cfg.progress,
                 mininterval=0.5, smoothing=0.05) as bar:
        for plan, entries in zip(plans, pending):
            _write_dataset(plan, entries, stream, bar)

    counts = {plan.name: len(plan.entries) for plan in plans}
    paths = {"pool": "pool", "bench": "bench", "fewshot": "fewshot", "oracle": "oracle", "novel": "novel",
             "novel_pairs": "novel-pairs"}
    return WorldResult(output=str(out), world_json=str(out / WORLD_JSON),
                       paths={k: str(out / v) for k, v in paths.items()}, counts=counts,
                       num_images=sum(counts.values()), rendered=len(tasks),
                       seconds=round(time.perf_counter() - started, 2))


def _write_dataset(plan: DatasetPlan, entries: list[Entry], rendered: Iterator[RenderedItem], bar: tqdm) -> None:
    bar.set_postfix_str(plan.name, refresh=False)
    with DatasetWriter(plan.root, plan.class_names, split=plan.split, info=plan.info, threads=4) as writer:
        for entry in entries:
            item = next(rendered)
            label = BASE_SHAPES.index(item.attributes["shape"]) if entry.label < 0 else entry.label
            writer.add(entry.item_id, Image.fromarray(item.image), label, caption=item.caption,
                       **item.attributes, **entry.metadata)
            bar.update(1)


__all__ = ["WorldConfig", "WorldResult", "build_world", "benchmark_classes", "describe_world", "longtail_counts",
           "bucket_of", "world_object_masks", "write_masks", "NOVEL_CONCEPTS"]
