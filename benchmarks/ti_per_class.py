"""Per-class textual inversion (DA-Fusion's per-trial cost): classes one after another vs trained together.

DA-Fusion learns one inversion per class for every few-shot split, so the embedded few-shot
recipe trains 24 classes x 20 splits of them. ``train-ti --per-class`` trains ``class_batch``
classes in one loop (one UNet pass per step for all of them), each with exactly its lone run's
draws, loss and Adam updates. This script trains the same classes with ``class_batch: 1`` (the
one-by-one loop every per-class run used before) and with larger groups, each variant in its own
process with the same thread count, and prints seconds, the speed ratio, peak RSS and how far
each group's vectors are from the one-by-one vectors.

    python benchmarks/ti_per_class.py --data worlds/default/fewshot/k4-trial0 --steps 100 --class-batch 8,24
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from _isolated import run_isolated  # benchmarks/ is on sys.path when a script here runs


def variant(args, data: str, out: str, class_batch: int, queue) -> None:
    import torch

    from genaug.personalize.textual_inversion import TextualInversionConfig, train_textual_inversion

    torch.set_num_threads(args.threads)
    cfg = TextualInversionConfig(model=args.model, instance_data=data, output=out, per_class=True,
                                 class_batch=class_batch, max_train_steps=args.steps, num_vectors=4,
                                 initializer_token="shape", device="cpu", seed=0)
    t0 = time.perf_counter()
    result = train_textual_inversion(cfg)
    seconds = time.perf_counter() - t0
    queue.put({"seconds": seconds, "classes": len(result.classes),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def learned(folder: Path) -> dict:
    from genaug.artefacts import read_safetensors

    vectors = {}
    for path in sorted(folder.glob("*/learned_embeds.safetensors")):
        tensors, _ = read_safetensors(path)
        vectors.update(tensors)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a labelled dataset, e.g. a few-shot split of the embedded world")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per class")
    parser.add_argument("--class-batch", default="8,24", help="group sizes to compare with one-by-one")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    groups = [int(x) for x in args.class_batch.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for class_batch in [1, *groups]:
            out = Path(tmp) / f"cb{class_batch}"
            rows[class_batch] = run_isolated(variant, args, args.data, str(out), class_batch)
            rows[class_batch]["vectors"] = learned(out)
        base = rows[1]
        print(f"{base['classes']} classes, {args.steps} steps each, {args.threads} threads")
        print("| class_batch | seconds | vs one by one | peak RSS | largest difference from one by one |")
        print("|---|---|---|---|---|")
        for class_batch, row in rows.items():
            diff = max(float((row["vectors"][k] - base["vectors"][k]).abs().max()) for k in base["vectors"])
            print(f"| {class_batch} | {row['seconds']:.1f} | {base['seconds'] / row['seconds']:.2f}x | "
                  f"{row['peak_rss_mb']:.0f} MB | {diff:.2e} |")
        print(json.dumps({str(k): {"seconds": round(v["seconds"], 2), "peak_rss_mb": round(v["peak_rss_mb"])}
                          for k, v in rows.items()}))


if __name__ == "__main__":
    main()
