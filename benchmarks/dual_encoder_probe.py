"""What a trained dual encoder knows about each attribute of the pool (issue 3's diagnosis, repeatable).

For each dual-encoder folder (`genaug pretrain` writes one as `<family>/clip/`), prints:
- its recorded held-out figures (text-to-image recall@10, zero-shot top-1) and training steps;
- a linear probe on the unit image embeddings for each labelled attribute of the pool (shape,
  pattern, colour, background): multinomial logistic regression trained on `--train` pool images,
  scored on the last `--test` pool images (the ones `genaug pretrain` holds out);
- the text tower's cosine between two prompts' last hidden states at the one word that differs
  ("plain circle" vs "plain square", ...): near 1 means the tower merged the two words, and the
  generator, conditioned on those states, cannot tell them apart.

    python benchmarks/dual_encoder_probe.py --world worlds/default genaug/embedded/clip runs/clip-4000/clip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from genaug.evaluate.metrics import clip_image_features
from genaug.pretrain.clip import load_dual_encoder
from genaug.pretrain.data import load_split

from embedded_diagnostics import WORD_PAIRS, token_ids  # the same prompts, padded the same way

ATTRIBUTES = ("shape", "pattern", "colour", "background")


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax regression fitted with L-BFGS (a light L2 keeps it well posed)."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(a), train_y) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(b).argmax(1) == test_y).float().mean())


def word_cosines(model, tokenizer) -> dict[str, float]:
    out = {}
    for name, (first, second) in WORD_PAIRS.items():
        ids = token_ids(tokenizer, [first, second])
        token = int((ids[0] != ids[1]).nonzero()[0])
        with torch.no_grad():
            states = model.text_model(input_ids=ids).last_hidden_state
        out[name] = round(float(F.cosine_similarity(states[0, token], states[1, token], dim=0)), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="dual-encoder folders (with genaug_dual_encoder.json)")
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--train", type=int, default=8000, help="pool images the probes fit on (from the start)")
    parser.add_argument("--test", type=int, default=1000, help="last pool images the probes are scored on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = load_split(Path(args.world) / "pool", "train", progress=False)
    train_idx = list(range(args.train))
    test_idx = list(range(len(pool) - args.test, len(pool)))
    labels = {}
    for key in ATTRIBUTES:
        values = sorted({str(r[key]) for r in pool.records})
        index = {v: i for i, v in enumerate(values)}
        labels[key] = (len(values), torch.tensor([index[str(r[key])] for r in pool.records]))
    header = ["folder", "steps", "recall@10", "zero-shot"] + [f"probe: {k} (chance)" for k in ATTRIBUTES] + \
        [f"cos {k}" for k in WORD_PAIRS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for folder in args.folders:
        record = json.loads((Path(folder) / "genaug_dual_encoder.json").read_text())
        metrics = record.get("result", {}).get("eval_metrics", {})
        model, tokenizer = load_dual_encoder(folder)
        feats = clip_image_features(model, pool.images[train_idx + test_idx])
        train_x, test_x = feats[: len(train_idx)], feats[len(train_idx):]
        cells = [folder, str(record.get("result", {}).get("steps")), f"{metrics.get('recall@10', float('nan')):.3f}",
                 f"{metrics.get('zero_shot_top1', float('nan')):.3f}"]
        for key in ATTRIBUTES:
            classes, y = labels[key]
            acc = linear_probe(train_x, y[train_idx], test_x, y[test_idx], classes)
            cells.append(f"{acc:.3f} ({1 / classes:.2f})")
        cells += [f"{v:.3f}" for v in word_cosines(model, tokenizer).values()]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
