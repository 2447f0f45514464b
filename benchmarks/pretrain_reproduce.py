"""Does `genaug pretrain` on the shipped config reproduce the shipped family? (issue 3)

Compares a freshly trained family with the shipped one (or any two families): every figure in
``figures.json`` side by side, every weight file tensor by tensor (identical bytes, or the largest
difference), and the stage times. Reads safetensors and JSON only.

    genaug world --output worlds/default
    genaug pretrain --config configs/pretrain_embedded.yaml --output runs/pretrain-repro
    python benchmarks/pretrain_reproduce.py genaug/embedded runs/pretrain-repro
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

# Timing and bookkeeping entries: they differ from run to run by nature, not by training.
NOT_FIGURES = ("training_seconds", "seconds", "device", "command")


def flatten(value, prefix: str = ""):
    """(dotted key, number) for every numeric leaf of a figures.json."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in NOT_FIGURES:
                continue
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix, float(value)


def compare_weights(reference: Path, candidate: Path) -> list[tuple[str, int, int, float]]:
    """(file, tensors, byte-identical tensors, largest absolute difference) per shared weight file."""
    rows = []
    for ref_file in sorted(reference.rglob("*.safetensors")):
        rel = ref_file.relative_to(reference)
        cand_file = candidate / rel
        if not cand_file.is_file():
            rows.append((str(rel), 0, 0, float("nan")))
            continue
        a, b = load_file(ref_file), load_file(cand_file)
        same, worst = 0, 0.0
        for name, tensor in a.items():
            other = b.get(name)
            if other is None or other.shape != tensor.shape:
                worst = float("inf")
                continue
            if tensor.dtype == other.dtype and tensor.numpy().tobytes() == other.numpy().tobytes():
                same += 1
            else:
                worst = max(worst, (tensor.double() - other.double()).abs().max().item())
        rows.append((str(rel), len(a), same, worst))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="family folder holding figures.json (e.g. genaug/embedded)")
    parser.add_argument("candidate", type=Path, help="family folder to compare with it")
    args = parser.parse_args(argv)
    figures = []
    for folder in (args.reference, args.candidate):
        path = folder / "figures.json"
        if not path.is_file():
            print(f"error: {path} not found; pass a folder written by `genaug pretrain`", file=sys.stderr)
            return 2
        figures.append(json.loads(path.read_text()))
    ref, cand = (dict(flatten(f)) for f in figures)
    print(f"| figure | {args.reference} | {args.candidate} | difference |\n|---|---|---|---|")
    differing = 0
    for key in sorted(set(ref) | set(cand)):
        a, b = ref.get(key), cand.get(key)
        diff = "missing" if a is None or b is None else f"{b - a:+.4g}"
        differing += diff != "+0"
        if key.count(".") <= 1 or diff != "+0":  # per-class entries only where they differ
            print(f"| {key} | {a} | {b} | {diff} |")
    print(f"\n{len(set(ref) | set(cand))} figures, {differing} differ")
    print("\n| weight file | tensors | byte-identical | largest abs. difference |\n|---|---|---|---|")
    for rel, n, same, worst in compare_weights(args.reference, args.candidate):
        print(f"| {rel} | {n} | {same} | {worst:.3g} |")
    for label, fig in zip((args.reference, args.candidate), figures):
        print(f"training seconds, {label}: {json.dumps(fig.get('training_seconds', {}))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
