"""Synthesis throughput: genaug's engine against the stock diffusers pipeline, same work, same outputs.

Work: image-conditioned generation on the embedded generator (SD 2.1-unCLIP layout) — one image
per real training image, conditioned on its CLIP embedding, prompt = its class name, DDIM,
classifier-free guidance — every image saved as PNG.

  (a) DA-Fusion-style loop: the stock ``StableUnCLIPImg2ImgPipeline`` called once per image;
  (b) the stock pipeline called on batches of ``--batch-size`` images (lists of images, prompts
      and per-image generators);
  (c) ``genaug synth --method augcond --augcond-mode none`` at the same batch size (the whole
      engine: planning, batched sampling with the UNet traced (``--trace-unet``, its default), atomic PNG +
      metadata writes); with ``--untraced``, also ``engine_untraced``: the same with ``--no-trace-unet``;
  (d) the same with ``--compile`` (the UNet through torch.compile), timed with the compile included,
      from a cold inductor cache (a fresh cache folder) and again in a new process with that cache warm,
      as the second synthesis stage of a recipe finds it;
  (e) with ``--stock-compiled``: the stock batched pipeline with the same compiled UNet, to show how
      much of (d)'s gain is torch.compile itself;
  (f) with ``--large-batch-size N``: (b) and (c) again at batch N, eager. Ratio (a) is the engine
      against one pipeline call per image, so the engine may use the batch it runs best at; (b)
      is measured again at that same batch.
  (g) with ``--workers N``: (c) with ``synth --workers N`` at the same batch size (and at ``--large-batch-size``
      too, if given), each worker with ``--threads``/N torch threads, claiming batches from one queue.
      ``--worker-kind threads`` (the default; variant ``engine_threads``): N threads of one process share one
      model, so the run is measured in one process, its clock as (c)'s. ``--worker-kind processes`` (variant
      ``engine_workers``): this process and N - 1 spawned ones, merged into one dataset at the end; its whole
      clock covers starting the processes, every model load and the merge (the others' exclude loading); beside
      it, the "after load" clock starts once the first process has its model, as the others' clocks do, and
      still covers the other processes' start-up and the merge. Its peak RSS is this process's plus N times the
      largest worker's (an upper bound). ``both`` runs the two. Round-by-round (paired) ratios are reported too.
The per-image loop is slow and steady, so it runs on the first ``--loop-images`` images only; ratios
are of images/s.

Each variant runs in its own process (so its peak RSS is its own); all use the same torch thread
count. Printed: images/s, the ratios (c)/(a) and (c)/(b), peak RSS, and the largest pixel
difference between (b) and (c) (they draw the same noise, so they should agree to rounding).

    python benchmarks/synth_throughput.py --images 240 --batch-size 24 --steps 25
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from _isolated import run_isolated  # benchmarks/ is on sys.path when a script here runs


def _inputs(real_data: str, n: int):
    from genaug.artefacts import read_dataset
    from genaug.generate.synth import item_seed, slugify

    ds = read_dataset(real_data)
    rows = []
    per_class: dict[int, int] = {}
    for i, r in enumerate(ds.records[:n]):
        label = int(r["label"])
        j = per_class.get(label, 0)
        per_class[label] = j + 1
        name = ds.class_names[label]
        item_id = f"{label:04d}-{slugify(name, 32)}-{j:06d}"
        rows.append((i, name, item_seed(0, item_id), item_id))
    return ds, rows


def _stock(args, batch_size: int, out_dir: str, n_images: int, inductor_cache: str | None, queue) -> None:
    import os

    if inductor_cache:  # a compiled UNet, with inductor's cache here (set before torch is imported)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    import torch

    from genaug.models.loading import compile_unet, default_resolution, load_pipeline

    torch.set_num_threads(args.threads)
    ds, rows = _inputs(args.real_data, n_images)
    loading = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu")
    if inductor_cache:
        compile_unet(pipe)
    size = default_resolution(pipe)
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        # Read inside the clock, as the engine does (and as a DA-Fusion loop reads each real image).
        images = {i: ds.image(i).resize((size, size)) for i, *_ in batch}
        out = pipe(image=[images[i] for i, *_ in batch], prompt=[f"a photo of a {n}" for _, n, *_ in batch],
                   num_inference_steps=args.steps, guidance_scale=args.guidance, noise_level=0,
                   generator=[torch.Generator().manual_seed(s) for _, _, s, _ in batch]).images
        for (_, _, _, item_id), image in zip(batch, out):
            image.save(Path(out_dir) / f"{item_id}.png")
    seconds = time.perf_counter() - t0
    queue.put({"seconds": seconds, "end_to_end_seconds": time.perf_counter() - loading,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _engine(args, batch_size: int, out_dir: str, inductor_cache: str | None, workers: int, worker_kind: str,
            trace_unet: bool, queue) -> None:
    import os

    if inductor_cache:  # before torch is imported, so inductor reads it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    import torch

    from genaug.generate.synth import SynthConfig, synthesize

    torch.set_num_threads(args.threads)
    # Restrict the real data to the same first N images as the stock runs.
    from genaug.artefacts import DatasetWriter, read_dataset

    ds = read_dataset(args.real_data)
    subset = Path(out_dir) / "real"
    with DatasetWriter(subset, ds.class_names) as writer:
        for i, r in enumerate(ds.records[:args.images]):
            writer.add(str(r["id"]), ds.image(i), int(r["label"]))
    cfg = SynthConfig(model=args.model, output=str(Path(out_dir) / "synth"), method="augcond", augcond_mode="none",
                      real_data=str(subset), per_real=1, prompt_templates=["a photo of a {}"],
                      guidance_scale=args.guidance, num_inference_steps=args.steps, batch_size=batch_size,
                      device="cpu", seed=0, compile=bool(inductor_cache), workers=workers, worker_kind=worker_kind,
                      trace_unet=trace_unet)
    # The engine's own clock covers sampling and writing (not model loading), like the stock runs'; with worker
    # processes it covers everything from starting them to the merged dataset.
    called = time.perf_counter()
    seconds = synthesize(cfg).seconds
    extra = {"end_to_end_seconds": time.perf_counter() - called}  # model loading and planning included
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extra["after_load_seconds"] = seconds  # threads: the clock already starts once the model is loaded
    if workers > 1 and worker_kind == "processes":
        peak += workers * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        metrics = json.loads((Path(out_dir) / "synth" / "run" / "metrics.json").read_text())
        # From the moment this process has its model (as the other variants' clocks start) to the merged
        # dataset: the other workers' start-up and loading stay inside.
        extra["after_load_seconds"] = metrics["seconds"] - metrics["worker_started_after_seconds"][0]
    queue.put({"seconds": seconds, "peak_rss_mb": peak, **extra})


WORKER_VARIANT = {"threads": "threads", "processes": "workers"}  # --worker-kind -> variant name engine_<...>


def _worker_ratios(name: str, rate: dict[str, float], after_load: list[float], n: int,
                   paired: Callable[..., float]) -> dict[str, float | list[float]]:
    """Ratios of one (g) variant: vs stock at its batch size (whole clock, after load, paired), vs the one-worker
    engine, vs the per-image loop (a)."""
    large = name.endswith("_large")
    stock, engine = ("stock_batched_large", "engine_large") if large else ("stock_batched", "engine")
    return {f"vs_{stock}": round(rate[name] / rate[stock], 2),
            f"vs_{stock}_paired": paired(name, stock),
            f"vs_{engine}": round(rate[name] / rate[engine], 2),
            "vs_stock_loop": round(rate[name] / rate["stock_loop"], 2),
            "after_load_seconds_per_round": [round(x, 2) for x in after_load],
            f"after_load_vs_{stock}_paired": paired(name, stock, "after_load_seconds"),
            "after_load_vs_stock_loop": round(n / float(np.median(after_load)) / rate["stock_loop"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--real-data", default="worlds/default/bench")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--loop-images", type=int, default=48, help="images for the slow per-image loop")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled engine runs (d)")
    parser.add_argument("--stock-compiled", action="store_true", help="also run (e): stock batched, compiled UNet")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the eager variants (median reported)")
    parser.add_argument("--large-batch-size", type=int, default=0,
                        help="also run (b) and (c) at this batch size (eager), for ratio (a) at the engine's "
                             "best batch and ratio (b) there too")
    parser.add_argument("--workers", type=int, default=0,
                        help="also run (g): the engine with this many workers (--threads shared out)")
    parser.add_argument("--untraced", action="store_true",
                        help="also run (c) with --no-trace-unet (engine_untraced): the UNet called eagerly, as stock")
    parser.add_argument("--worker-kind", choices=["threads", "processes", "both"], default="threads",
                        help="(g)'s workers: threads of one process, spawned processes, or both variants")
    args = parser.parse_args()
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        names = ["compiled-cold", "compiled-warm", "stock-compiled", "inductor-cache"]
        dirs = {k: Path(tmp) / k for k in names}
        for d in dirs.values():
            d.mkdir()
        cache = str(dirs["inductor-cache"])
        # The eager variants run --repeats times, interleaved (so a slow spell of a shared machine hits
        # every variant alike), each round in fresh folders; the median time of each is reported.
        rounds = []
        for r in range(args.repeats):
            d = Path(tmp) / f"round{r}"
            variants = {"stock_loop": (_stock, 1, min(args.loop_images, n)),
                        "stock_batched": (_stock, args.batch_size, n), "engine": (_engine, args.batch_size, None)}
            if args.untraced:
                variants["engine_untraced"] = (_engine, args.batch_size, None)
            kinds = ["threads", "processes"] if args.worker_kind == "both" else [args.worker_kind]
            worker_variants = {f"engine_{WORKER_VARIANT[kind]}": kind for kind in kinds} if args.workers > 1 else {}
            for name in worker_variants:
                variants[name] = (_engine, args.batch_size, None)
            if args.large_batch_size:
                variants["stock_batched_large"] = (_stock, args.large_batch_size, n)
                variants["engine_large"] = (_engine, args.large_batch_size, None)
                for name in list(worker_variants):
                    variants[f"{name}_large"] = (_engine, args.large_batch_size, None)
                    worker_variants[f"{name}_large"] = worker_variants[name]
            results = {}
            for name, (target, batch, count) in variants.items():
                (d / name).mkdir(parents=True)
                if target is _stock:
                    extra = (count, None)
                elif name in worker_variants:
                    extra = (None, args.workers, worker_variants[name], True)
                else:
                    extra = (None, 1, "threads", name != "engine_untraced")
                results[name] = run_isolated(target, args, batch, str(d / name), *extra)
            rounds.append(results)
        worker_names = [name for name in rounds[0] if name.startswith(("engine_threads", "engine_workers"))]
        after_load = {name: [r[name]["after_load_seconds"] for r in rounds] for name in worker_names}

        def paired(name: str, baseline: str, key: str = "seconds", baseline_key: str = "seconds") -> float:
            """The median over rounds of baseline seconds / this variant's seconds, round by round."""
            return round(float(np.median([r[baseline][baseline_key] / r[name][key] for r in rounds])), 2)
        runs = {name: {"seconds": float(np.median([r[name]["seconds"] for r in rounds])),
                       "all_seconds": [round(r[name]["seconds"], 2) for r in rounds],
                       "peak_rss_mb": max(r[name]["peak_rss_mb"] for r in rounds)} for name in rounds[0]}
        dirs.update(loop=Path(tmp) / "round0/stock_loop", batch=Path(tmp) / "round0/stock_batched",
                    engine=Path(tmp) / "round0/engine")
        if not args.no_compile:
            runs["engine_compiled_cold_cache"] = run_isolated(_engine, args, args.batch_size,
                                                              str(dirs["compiled-cold"]), cache, 1, "threads", False)
            runs["engine_compiled_warm_cache"] = run_isolated(_engine, args, args.batch_size,
                                                              str(dirs["compiled-warm"]), cache, 1, "threads", False)
        if args.stock_compiled:
            runs["stock_batched_compiled"] = run_isolated(
                _stock, args, args.batch_size, str(dirs["stock-compiled"]), n, cache)
        from genaug.artefacts import read_dataset

        def largest_difference(folder: Path) -> int:
            ds = read_dataset(folder / "synth")
            return int(max(np.abs(np.asarray(ds.image(i), dtype=int)
                                  - np.asarray(Image.open(dirs["batch"] / f"{r['id']}.png"), dtype=int)).max()
                           for i, r in enumerate(ds.records)))

        diffs = {"engine": largest_difference(dirs["engine"])}
        if args.large_batch_size:  # same per-item seeds: equal across batch sizes within 2/255
            diffs["engine_large"] = largest_difference(Path(tmp) / "round0/engine_large")
        for name in worker_names:
            diffs[name] = largest_difference(Path(tmp) / f"round0/{name}")
        if not args.no_compile:
            diffs["engine_compiled"] = largest_difference(dirs["compiled-cold"])
    counts = {name: min(args.loop_images, n) if name == "stock_loop" else n for name in runs}
    rate = {name: counts[name] / r["seconds"] for name, r in runs.items()}
    report = {
        "images": n, "loop_images": counts["stock_loop"], "batch_size": args.batch_size, "steps": args.steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "images_per_s": {name: round(v, 3) for name, v in rate.items()},
        # Everything a user waits for after the imports: model loading, planning, sampling, writing, merging.
        "end_to_end_seconds_per_round": {name: [round(r[name]["end_to_end_seconds"], 2) for r in rounds]
                                         for name in rounds[0]},
        # each engine variant against stock at its batch size
        "end_to_end_vs_stock_batched_paired": {
            name: paired(name, "stock_batched_large" if name.endswith("_large") else "stock_batched",
                         "end_to_end_seconds", "end_to_end_seconds")
            for name in rounds[0] if name.startswith("engine")},
        "seconds_per_round": {name: r["all_seconds"] for name, r in runs.items() if "all_seconds" in r},
        "engine_vs_stock_loop": round(rate["engine"] / rate["stock_loop"], 2),
        "engine_vs_stock_batched": round(rate["engine"] / rate["stock_batched"], 2),
        "engine_vs_stock_batched_paired": paired("engine", "stock_batched"),
        **({"engine_untraced_vs_stock_batched_paired": paired("engine_untraced", "stock_batched"),
            "engine_vs_engine_untraced_paired": paired("engine", "engine_untraced")} if args.untraced else {}),
        **({"workers": args.workers, "worker_kind": args.worker_kind} if worker_names else {}),
        # (g): each worker variant against stock at its batch size, against the one-worker engine, and against the
        # per-image loop (ratio (a)); paired ratios are round by round, on the whole clock and after load
        **{f"{name}_{key}": value for name in worker_names for key, value in _worker_ratios(
            name, rate, after_load[name], n, paired).items()},
        **{f"{name}_vs_stock_batched": round(rate[name] / rate["stock_batched"], 2)
           for name in rate if name.startswith(("engine_compiled", "stock_batched_compiled"))},
        **({"large_batch_size": args.large_batch_size,
            "engine_large_vs_stock_loop": round(rate["engine_large"] / rate["stock_loop"], 2),
            "engine_large_vs_stock_batched_large": round(rate["engine_large"] / rate["stock_batched_large"], 2)}
           if args.large_batch_size else {}),
        "peak_rss_mb": {name: round(r["peak_rss_mb"]) for name, r in runs.items()},
        "max_pixel_difference_vs_stock_batched": diffs,
        "timed": "sampling + PNG writing (and the compile, where there is one); model loading excluded, except "
                 "for engine_workers, the worker processes (every process's start and model loading and the merge "
                 "included; its after_load clock excludes only the first process's model loading, as the others' "
                 "clocks do)",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
