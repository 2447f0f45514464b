"""Does starting each residual block's last BatchNorm at zero help genaug's CNNs learn the world?

``zero_init_last`` (timm's name; Goyal et al., 2017) starts every residual block as an identity. It
was genaug_cnn_*'s default until 2026-12-01. This script trains the oracle (genaug_cnn_small on the
world's balanced ``oracle`` split, selected on ``bench/val``) both ways with the same seed and
epochs, one process per variant, and prints each epoch's validation accuracy. The classifier side of
the comparison is the ``embedded-longtail`` recipe itself (``benchmarks/RESULTS.md``).

    python benchmarks/zero_init_last.py --world worlds/default --epochs 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def train_one(world: str, epochs: int, zero_init_last: bool, threads: int, out: str) -> dict:
    import torch

    from genaug.pretrain.data import load_split
    from genaug.pretrain.oracle import OracleConfig, train_oracle

    torch.set_num_threads(threads)
    train = load_split(f"{world}/oracle", "train", progress=False)
    val = load_split(f"{world}/bench", "val", progress=False)
    result = train_oracle(OracleConfig(epochs=epochs, zero_init_last=zero_init_last, progress=False), train, val, out)
    return {"zero_init_last": zero_init_last, "epochs": epochs, "best_val_accuracy": round(result.val_accuracy, 4),
            "best_epoch": result.best_epoch, "seconds": result.seconds,
            "val_curve": [h["val_accuracy"] for h in result.history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="threads per variant (both run at once)")
    parser.add_argument("--out", default="runs/zero-init-last", help="folder for the two oracles")
    parser.add_argument("--variant", choices=["on", "off"], help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.variant:
        on = args.variant == "on"
        print(json.dumps(train_one(args.world, args.epochs, on, args.threads, f"{args.out}/{args.variant}")))
        return
    children = [subprocess.Popen([sys.executable, __file__, "--world", args.world, "--epochs", str(args.epochs),
                                  "--threads", str(args.threads), "--out", args.out, "--variant", variant],
                                 stdout=subprocess.PIPE, text=True) for variant in ("on", "off")]
    results = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    if any(child.returncode for child in children):
        sys.exit("a variant failed; see its error above")
    for r in results:
        print(json.dumps(r))
    on, off = results
    print(f"oracle, {args.epochs} epochs: best validation accuracy {on['best_val_accuracy']} with zero_init_last, "
          f"{off['best_val_accuracy']} without")


if __name__ == "__main__":
    main()
