"""``genaug report``: every method side by side — accuracy tables with intervals, plots, samples, metrics.

Inputs are the artefacts the other stages wrote, each named by its method:
* ``--longtail real=runs/lt-real +augcond=runs/lt-augcond`` — train-classifier run folders
  (``final.json``): overall, balanced and many/medium/few accuracy; several runs of one method
  (``name=a,b,c``: seeds) are averaged with a 95% interval;
* ``--fewshot real=runs/fs-real ...`` — fewshot protocol folders (``fewshot.json``): accuracy
  per k with its 95% interval;
* ``--datasets text=datasets/text ...`` — synthetic or retrieved datasets: a sample grid per
  method and class, and generation metrics against ``real_test``: CLIP-T (image vs its prompt),
  CLIP-I (image vs the mean embedding of the real test images of its class), FID/KID in the CLIP
  encoder's feature space, and the oracle's accuracy on the intended class.
Writes ``report.json``, ``report.md`` with the plots beside it, and ``report.html``: one
self-contained page (plots and grids inlined as data URIs, no external resources).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artefacts import atomic_write_bytes, atomic_write_text, read_dataset, read_json_object, slugify
from ..config import option
from ..errors import ConfigError
from ..runs import RunRecord
from .classifier import ci95


@dataclass
class ReportConfig:
    """Compare methods side by side: long-tail and few-shot accuracy, plots, samples, generation metrics."""

    longtail: list[str] = option(help="name=run[,run...] train-classifier run folders per method", factory=list)
    fewshot: list[str] = option(help="name=folder fewshot protocol folders per method", factory=list)
    datasets: list[str] = option(help="name=folder synthetic/retrieved datasets per method (samples, metrics)",
                                 factory=list)
    real_test: str | None = option(None, "real test dataset for the generation metrics (e.g. worlds/default/bench)")
    real_test_split: str = option("test", "split of real_test")
    clip_model: str = option("embedded:clip", "CLIP encoder for CLIP-T/CLIP-I/FID/KID")
    oracle: str | None = option("embedded:oracle", "oracle for generation accuracy (none: skip)")
    samples_per_class: int = option(4, "samples per class in each method's grid")
    max_metric_images: int = option(2000, "images per dataset used for the generation metrics")
    title: str = option("genaug: what each method buys the classifier", "report title")
    output: str = option("reports/compare", "report folder")

    def __post_init__(self) -> None:
        for entry in self.longtail + self.fewshot + self.datasets:
            if "=" not in entry or not entry.split("=", 1)[0].strip():
                raise ValueError(f"entries look like name=path, got {entry!r}")
        if not (self.longtail or self.fewshot or self.datasets):
            raise ValueError("give at least one of longtail, fewshot or datasets")
        names = [e.split("=", 1)[0].strip() for e in self.datasets]
        if len({slugify(n) for n in names}) != len(names):
            raise ValueError(f"dataset names must differ as file names (sample grids are samples-<name>.png): {names}")


@dataclass
class ReportResult:
    output: Path
    html: Path
    markdown: Path


def _named(entries: list[str]) -> list[tuple[str, list[str]]]:
    return [(e.split("=", 1)[0].strip(), [p for p in e.split("=", 1)[1].split(",") if p]) for e in entries]


def _fmt(mean: float | None, half: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "–"
    return f"{100 * mean:.1f} ± {100 * half:.1f}" if half else f"{100 * mean:.1f}"


def longtail_table(entries: list[tuple[str, list[str]]]) -> dict[str, dict[str, Any]]:
    table = {}
    for name, folders in entries:
        finals = [read_json_object(Path(f) / "final.json", "train-classifier result", ConfigError) for f in folders]
        row: dict[str, Any] = {"runs": len(finals), "extra_images": finals[0].get("train_images", {}).get("extra", 0)}
        for key in ("accuracy", "balanced_accuracy"):
            row[key] = ci95([f[key] for f in finals])
        for bucket in ("many", "medium", "few"):
            values = [f["buckets"][bucket] for f in finals if f["buckets"].get(bucket) is not None]
            row[bucket] = ci95(values) if values else (None, None)
        table[name] = row
    return table


def fewshot_table(entries: list[tuple[str, list[str]]]) -> dict[str, dict[str, Any]]:
    table = {}
    for name, folders in entries:
        data = read_json_object(Path(folders[0]) / "fewshot.json", "fewshot result", ConfigError)["table"]
        table[name] = {int(k): (v["mean"], v["ci95"]) for k, v in data.items()}
    return table


def chance_level(folders: list[str]) -> float | None:
    """1 / number of classes of the first classifier run in ``folders`` (a train-classifier folder, or a
    fewshot folder holding one per (k, trial)); None if none records its classes."""
    for folder in folders:
        for final in [Path(folder) / "final.json", *sorted(Path(folder).glob("*/final.json"))]:
            try:
                names = json.loads(final.read_text()).get("class_names")
            except (OSError, ValueError):
                continue
            if names:
                return 1.0 / len(names)
    return None


def _chance_note(chance: float | None) -> str:
    return f" Chance (a uniform guess over {round(1 / chance)} classes): {100 * chance:.1f}%." if chance else ""


def _new_axes(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _finish(fig, ax, xlabel: str, grid_axis: str = "both") -> bytes:
    """Label, legend and grid the axes, render the figure to PNG bytes and free it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis=grid_axis, alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_fewshot(table, chance: float | None = None) -> bytes:
    fig, ax = _new_axes((5.5, 3.6))
    for name, rows in table.items():
        ks = sorted(rows)
        ax.errorbar(ks, [100 * rows[k][0] for k in ks], yerr=[100 * rows[k][1] for k in ks], marker="o", capsize=3,
                    label=name)
    if chance:
        ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, "real images per class (k)")


def plot_buckets(table) -> bytes:
    buckets = ["many", "medium", "few", "accuracy"]
    fig, ax = _new_axes((6.5, 3.6))
    width = 0.8 / max(1, len(table))
    for i, (name, row) in enumerate(table.items()):
        means = [100 * (row[b][0] or 0) if row[b][0] is not None else 0 for b in buckets]
        errors = [100 * (row[b][1] or 0) if row[b][0] is not None else 0 for b in buckets]
        ax.bar(np.arange(len(buckets)) + i * width, means, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(np.arange(len(buckets)) + width * (len(table) - 1) / 2, ["many", "medium", "few", "overall"])
    return _finish(fig, ax, "training-count bucket", grid_axis="y")


def plot_vs_extra(table) -> bytes:
    fig, ax = _new_axes((5.5, 3.6))
    for name, row in table.items():
        ax.errorbar([row["extra_images"]], [100 * row["accuracy"][0]], yerr=[100 * row["accuracy"][1]], marker="o",
                    capsize=3, label=name)
    return _finish(fig, ax, "synthetic / retrieved training images")


def sample_grid(folder: str, per_class: int) -> bytes:
    """Up to ``per_class`` images of each class, one row per class (classes without images skipped)."""
    from PIL import Image

    from ..artefacts import encode_png

    ds = read_dataset(folder)
    rows = []
    for label in range(len(ds.class_names)):
        members = [i for i, r in enumerate(ds.records) if int(r["label"]) == label][:per_class]
        if members:
            rows.append([ds.image(i) for i in members])
    side = max(im.size[0] for row in rows for im in row) if rows else 32
    grid = Image.new("RGB", (side * per_class, side * max(1, len(rows))), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((side, side)), (c * side, r * side))
    return encode_png(grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST))


def generation_metrics(folder: str, cfg: ReportConfig, real_feats, real_images) -> dict[str, float | None]:
    import torch

    from ..models.embedded import resolve_model
    from ..pretrain.clip import load_dual_encoder
    from .metrics import (clip_image_features, clip_text_features, frechet_distance, kernel_inception_distance)

    ds = read_dataset(folder)
    n = min(len(ds), cfg.max_metric_images)
    idx = np.linspace(0, len(ds) - 1, n).astype(int) if n else []
    images = torch.from_numpy(np.stack([np.asarray(ds.image(int(i)).convert("RGB").resize(
        real_images.shape[-2:][::-1])) for i in idx])).permute(0, 3, 1, 2)
    model, tokenizer = load_dual_encoder(resolve_model(cfg.clip_model))
    feats = clip_image_features(model, images)
    labels = [ds.class_names[int(ds.records[int(i)]["label"])] for i in idx]
    prompts = [str(ds.records[int(i)].get("prompt") or f"a photo of a {name}") for i, name in zip(idx, labels)]
    text = clip_text_features(model, tokenizer, prompts)
    out: dict[str, float | None] = {"images": int(len(ds)), "clip_t": round(float((feats * text).sum(1).mean()), 4)}
    real_by_class = {}
    for name, f in zip(real_feats["labels"], real_feats["feats"]):
        real_by_class.setdefault(name, []).append(f)
    centres = {name: torch.nn.functional.normalize(torch.stack(v).mean(0), dim=0) for name, v in real_by_class.items()}
    sims = [float(centres[name] @ f) for name, f in zip(labels, feats) if name in centres]
    out["clip_i"] = round(float(np.mean(sims)), 4) if sims else None
    out["fid"] = round(frechet_distance(feats.numpy(), real_feats["feats"].numpy()), 3) if n > 1 else None
    subset = min(1000, n, len(real_feats["feats"]))
    out["kid"] = round(kernel_inception_distance(feats.numpy(), real_feats["feats"].numpy(),
                                                 subset_size=subset)[0], 5) if subset > 1 else None
    out["oracle_accuracy"] = None
    if cfg.oracle:
        from ..pretrain.oracle import load_oracle

        oracle = load_oracle(resolve_model(cfg.oracle))
        predicted, _ = oracle.predict(images)
        target = torch.tensor([oracle.class_names.index(n) if n in oracle.class_names else -1 for n in labels])
        known = target >= 0
        if known.any():
            out["oracle_accuracy"] = round(float((predicted[known] == target[known]).float().mean()), 4)
    return out


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def build_report(cfg: ReportConfig) -> ReportResult:
    out = Path(cfg.output)
    longtail = longtail_table(_named(cfg.longtail)) if cfg.longtail else {}
    fewshot = fewshot_table(_named(cfg.fewshot)) if cfg.fewshot else {}
    datasets = _named(cfg.datasets)
    chance = {"longtail": chance_level([f for _, fs in _named(cfg.longtail) for f in fs]),
              "fewshot": chance_level([f for _, fs in _named(cfg.fewshot) for f in fs])}
    record = RunRecord.start(out / "run", "report", cfg)
    figures: dict[str, bytes] = {}
    if fewshot:
        figures["fewshot.png"] = plot_fewshot(fewshot, chance["fewshot"])
    if longtail:
        figures["longtail-buckets.png"] = plot_buckets(longtail)
        figures["accuracy-vs-extra.png"] = plot_vs_extra(longtail)
    grids = {name: sample_grid(folders[0], cfg.samples_per_class) for name, folders in datasets}
    metrics: dict[str, Any] = {}
    if datasets and cfg.real_test:
        import torch

        from ..models.embedded import resolve_model
        from ..pretrain.clip import load_dual_encoder
        from .metrics import clip_image_features

        real = read_dataset(cfg.real_test, cfg.real_test_split)
        real_images = torch.from_numpy(np.stack([np.asarray(real.image(i)) for i in range(len(real))]))
        real_images = real_images.permute(0, 3, 1, 2)
        model, _ = load_dual_encoder(resolve_model(cfg.clip_model))
        real_feats = {"feats": clip_image_features(model, real_images),
                      "labels": [real.class_names[int(r["label"])] for r in real.records]}
        metrics = {name: generation_metrics(folders[0], cfg, real_feats, real_images) for name, folders in datasets}

    # Markdown.
    md = [f"# {cfg.title}", ""]
    if longtail:
        md += ["## Classifiers", "", "| method | runs | extra images | overall | balanced | many | medium | few |",
               "|---|---|---|---|---|---|---|---|"]
        md += [f"| {n} | {r['runs']} | {r['extra_images']} | {_fmt(*r['accuracy'])} | "
               f"{_fmt(*r['balanced_accuracy'])} | {_fmt(*r['many'])} | {_fmt(*r['medium'])} | {_fmt(*r['few'])} |"
               for n, r in longtail.items()]
        md += ["", "Accuracy in %, mean ± 95% CI over runs (seeds)." + _chance_note(chance["longtail"]), "",
               "![buckets](longtail-buckets.png) ![accuracy vs extra images](accuracy-vs-extra.png)", ""]
    if fewshot:
        ks = sorted({k for rows in fewshot.values() for k in rows})
        md += ["## Few-shot", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
               "|---|" + "---|" * len(ks)]
        md += [f"| {n} | " + " | ".join(_fmt(*rows[k]) if k in rows else "–" for k in ks) + " |"
               for n, rows in fewshot.items()]
        md += ["", "Test accuracy in %, mean ± 95% CI over trials." + _chance_note(chance["fewshot"]), "",
               "![few-shot](fewshot.png)", ""]
    if metrics:
        md += ["## Generated / retrieved data", "", "| method | images | CLIP-T | CLIP-I | FID | KID | oracle acc. |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {n} | {m['images']} | {m['clip_t']} | {m['clip_i']} | {m['fid']} | {m['kid']} | "
               f"{m['oracle_accuracy']} |" for n, m in metrics.items()]
        md += ["", f"CLIP features of `{cfg.clip_model}`; FID/KID against `{cfg.real_test}` ({cfg.real_test_split}).",
               ""]
    if grids:
        md += ["## Samples", ""] + [f"**{n}**\n\n![{n}](samples-{slugify(n)}.png)\n" for n in grids]
    md += ["## Provenance", "", "Inputs: " + ", ".join(cfg.longtail + cfg.fewshot + cfg.datasets) + ".",
           "Versions and the resolved config of this report: `run/`."]
    markdown = "\n".join(md) + "\n"

    for name, png in figures.items():
        atomic_write_bytes(out / name, png)
    for name, png in grids.items():
        atomic_write_bytes(out / f"samples-{slugify(name)}.png", png)  # names are user text, not paths
    atomic_write_text(out / "report.md", markdown)
    results = {"longtail": {n: {k: v for k, v in r.items()} for n, r in longtail.items()},
               "fewshot": {n: {str(k): v for k, v in rows.items()} for n, rows in fewshot.items()},
               "generation": metrics, "chance": chance}
    atomic_write_text(out / "report.json", json.dumps(results, indent=2, default=str))
    page = render_html(cfg.title, markdown, {**figures, **{f"samples-{slugify(n)}.png": g for n, g in grids.items()}})
    atomic_write_text(out / "report.html", page)
    record.finish({"methods": sorted(set(longtail) | set(fewshot) | {n for n, _ in datasets})})
    return ReportResult(out, out / "report.html", out / "report.md")


def render_html(title: str, markdown: str, images: dict[str, bytes]) -> str:
    """A self-contained page from the report's Markdown (tables, headings, images inlined)."""
    body, table = [], []

    def flush_table():
        if not table:
            return
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table if not set(line) <= set("|-: ")]
        head, *rest = rows
        body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
                    + "</tbody></table>")
        table.clear()

    import re

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif "![" in line:
            for alt, src in re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", line):
                if src in images:
                    body.append(f'<figure><img alt="{html.escape(alt)}" src="{_data_uri(images[src])}">'
                                f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        elif line.strip():
            text = html.escape(line)
            text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
            text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
            body.append(f"<p>{text}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th:first-child,td:first-child{text-align:left}figure{display:inline-block;"
             "margin:0.5em}img{max-width:100%;image-rendering:pixelated}code{background:#f4f4f4;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
