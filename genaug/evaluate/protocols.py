"""``genaug fewshot``: the k-shot protocol — train-classifier on every (k, trial) split, mean and 95% CI per k.

The splits are folders named by ``split_pattern`` (the embedded world writes
``fewshot/k{k}-trial{trial}``); extra data per split (synthetic or retrieved images made from
that split) by ``extra_patterns``, e.g. ``datasets/text-k{k}-t{trial}``. Every run keeps its own
folder under ``output``, so a rerun skips finished runs and resumes a killed one; ``fewshot.json``
and ``fewshot.md`` hold the table.

``genaug kshot`` draws such splits from any dataset (DA-Fusion's protocol on user data): for each
(k, trial), k images per class sampled without replacement with a seed of (seed, k, trial).

The long-tail protocol is one ``train-classifier`` run on the long-tailed split: its
``final.json`` already holds overall, balanced and many/medium/few accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artefacts import DatasetWriter, atomic_write_json, atomic_write_text, read_dataset
from ..config import config_from_dict, explicit_settings, option
from ..errors import DataError
from ..runs import RunRecord
from .classifier import ClassifierConfig, ci95, train_classifier


@dataclass
class FewShotConfig:
    """Run the k-shot protocol: one classifier per (k, trial), mean and 95% CI of test accuracy per k."""

    world: str = option("worlds/default", "folder the split and extra-data patterns are relative to")
    split_pattern: str = option("fewshot/k{k}-trial{trial}", "k-shot training sets, relative to world")
    test_data: str = option("bench", "test dataset, relative to world (its test_split is scored)")
    test_split: str = option("test", "split of test_data")
    ks: list[int] = option(help="shots per class", factory=lambda: [1, 2, 4, 8, 16])
    trials: int = option(4, "trials (seeds of the k-shot draw) per k")
    extra_patterns: list[str] = option(help="extra datasets per split, with {k} and {trial} (absolute, or "
                                            "relative to the working directory)", factory=list)
    output: str = option("runs/fewshot", "protocol folder: one run per (k, trial), fewshot.json, fewshot.md")
    classifier: dict = option(help="ClassifierConfig overrides for every run (epochs, arch, mix, ...)",
                              factory=dict)
    seed: int = option(0, "classifier seed (the same for every run; the trials differ in their data)")

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("ks must list shot counts >= 1")
        if self.trials < 1:
            raise ValueError("trials must be at least 1")
        for pattern in [self.split_pattern, *self.extra_patterns]:
            try:
                pattern.format(k=1, trial=0)
            except (KeyError, IndexError):
                raise ValueError(f"pattern {pattern!r} may only use {{k}} and {{trial}}") from None
        reserved = {"real_data", "extra_data", "test_data", "test_split", "output", "seed"}
        if reserved & set(self.classifier):
            raise ValueError(f"classifier overrides cannot set {sorted(reserved & set(self.classifier))}: the "
                             "protocol sets them per run")

    def delegated_settings(self) -> dict[str, Any]:
        """The classifier settings every run asks for, as cache keys compare them: a change in what
        genaug's classifier does by default (``ClassifierConfig.LEGACY_SETTINGS``) then reaches the
        recipe stages that train through this protocol."""
        probe = config_from_dict(ClassifierConfig, self.classifier, source="fewshot classifier")
        return {"classifier": explicit_settings(probe)}


@dataclass
class FewShotResult:
    output: Path
    table: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_fewshot(cfg: FewShotConfig) -> FewShotResult:
    world, out = Path(cfg.world), Path(cfg.output)
    runs: list[tuple[int, int, ClassifierConfig]] = []
    for k in cfg.ks:
        for trial in range(cfg.trials):
            split = world / cfg.split_pattern.format(k=k, trial=trial)
            extras = [pattern.format(k=k, trial=trial) for pattern in cfg.extra_patterns]
            for path in [split, *map(Path, extras)]:
                if not path.is_dir():
                    raise DataError("a few-shot split or extra dataset is missing", where=str(path),
                                    fix="build the world (`genaug world`) / make the extra data first")
            run_cfg = config_from_dict(ClassifierConfig, {
                **cfg.classifier, "real_data": str(split), "extra_data": extras,
                "test_data": str(world / cfg.test_data), "test_split": cfg.test_split,
                "output": str(out / f"k{k}-trial{trial}"), "seed": cfg.seed}, source="fewshot classifier")
            runs.append((k, trial, run_cfg))
    record = RunRecord.start(out / "run", "fewshot", cfg)
    accuracies: dict[int, list[float]] = {k: [] for k in cfg.ks}
    for k, trial, run_cfg in runs:  # a run already finished with the same settings is reported, not retrained
        accuracies[k].append(train_classifier(run_cfg).test_accuracy)
    table = {}
    for k, values in accuracies.items():
        mean, half = ci95(values)
        table[str(k)] = {"mean": round(mean, 5), "ci95": round(half, 5), "trials": values}
    atomic_write_json(out / "fewshot.json", {"table": table, "extra_patterns": cfg.extra_patterns,
                                            "split_pattern": cfg.split_pattern})
    lines = ["| k | accuracy (mean ± 95% CI) | trials |", "|---|---|---|"]
    lines += [f"| {k} | {row['mean']:.3f} ± {row['ci95']:.3f} | {len(row['trials'])} |" for k, row in table.items()]
    atomic_write_text(out / "fewshot.md", "\n".join(lines) + "\n")
    record.finish({"table": table})
    return FewShotResult(out, table)


@dataclass
class KShotConfig:
    """Draw k-shot training splits (k images per class, several trials) from a dataset."""

    data: str = option("", "dataset to sample from (genaug dataset or imagefolder)", positional=True)
    split: str = option("train", "split of data to sample from")
    output: str = option("datasets/fewshot", "folder for the splits: OUTPUT/k{k}-trial{trial}")
    ks: list[int] = option(help="shots per class", factory=lambda: [1, 2, 4, 8, 16])
    trials: int = option(4, "independent draws per k")
    seed: int = option(0, "seed of the draws (each (k, trial) draws from its own stream)")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("give the dataset to sample from")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must hold distinct shot counts >= 1, got {self.ks}")
        if self.trials < 1:
            raise ValueError("trials must be at least 1")


@dataclass
class KShotResult:
    output: Path
    splits: dict[str, int] = field(default_factory=dict)


def make_kshot_splits(cfg: KShotConfig) -> KShotResult:
    """One genaug dataset per (k, trial); every image keeps its source file and id in the metadata."""
    ds = read_dataset(cfg.data, cfg.split)
    members = [np.flatnonzero(ds.labels == c) for c in range(len(ds.class_names))]
    short = [(ds.class_names[c], len(m)) for c, m in enumerate(members) if len(m) < max(cfg.ks)]
    if short:
        raise DataError(f"class {short[0][0]!r} has {short[0][1]} images, fewer than k={max(cfg.ks)}",
                        where=cfg.data, fix="lower --ks or add images to that class")
    out = Path(cfg.output)
    record = RunRecord.start(out / "run", "kshot", cfg)
    splits = {}
    for k in cfg.ks:
        for trial in range(cfg.trials):
            rng = np.random.default_rng([cfg.seed, k, trial])
            chosen = [(c, int(i)) for c, m in enumerate(members) for i in np.sort(rng.choice(m, k, replace=False))]
            name = f"k{k}-trial{trial}"
            with DatasetWriter(out / name, ds.class_names, split="train",
                               info={"source": cfg.data, "k": k, "trial": trial, "seed": cfg.seed}) as writer:
                for c, i in chosen:
                    item_id = f"{c:04d}-{i:07d}"
                    if item_id not in writer.done_ids:
                        writer.add(item_id, ds.image(i), c, source=str(ds.records[i].get("id", i)),
                                   source_file=str(ds.records[i]["file_name"]))
            splits[name] = len(chosen)
    record.finish({"splits": splits})
    return KShotResult(out, splits)
