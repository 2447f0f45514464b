"""``genaug fewshot``: the k-shot protocol — train-classifier on every (k, trial) split, mean and 95% CI per k.

The splits are folders named by ``split_pattern`` (the embedded world writes
``fewshot/k{k}-trial{trial}``); extra data per split (synthetic or retrieved images made from
that split) by ``extra_patterns``, e.g. ``datasets/text-k{k}-t{trial}``. Every run keeps its own
folder under ``output``, so a rerun skips finished runs and resumes a killed one; ``fewshot.json``
and ``fewshot.md`` hold the table.

The long-tail protocol is one ``train-classifier`` run on the long-tailed split: its
``final.json`` already holds overall, balanced and many/medium/few accuracies.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artefacts import atomic_write_json, atomic_write_text
from ..config import config_from_dict, option
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
    for k, trial, run_cfg in runs:
        final_path = Path(run_cfg.output) / "final.json"
        if final_path.is_file() and json.loads(final_path.read_text()).get("config") == \
                json.loads(json.dumps(dataclasses.asdict(run_cfg))):
            accuracy = json.loads(final_path.read_text())["accuracy"]
        else:
            accuracy = train_classifier(run_cfg).test_accuracy
        accuracies[k].append(accuracy)
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
