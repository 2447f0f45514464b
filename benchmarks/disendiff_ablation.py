"""DisenDiff's attention calibration, ablated over several two-concept images and seeds (issue 4).

For each of ``--pairs`` two-concept images of the embedded world's ``novel-pairs`` (one per distinct
pair of concepts, in order) and each of ``--seeds``, the same multi-concept training runs twice with
the same seed: with the bind/separate calibration terms and without them. Each concept is then drawn
alone and scored against its own reference images (CLIP-I, oracle-feature similarity), and both are
drawn together (CLIP-I to the training image). The table gives each variant's mean and the paired
difference (calibrated - uncalibrated) with a 95% CI over the (image, seed) units, so a difference
can be told from run-to-run noise.

    python benchmarks/disendiff_ablation.py --world worlds/default --out runs/disendiff-ablation \
        --pairs 3 --seeds 2
    # with the masked diffusion loss on the world's object masks:
    python benchmarks/disendiff_ablation.py --world worlds/default --out runs/disendiff-ablation-masked \
        --pairs 4 --seeds 2 --masks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METRICS = ("alone CLIP-I", "alone feature sim.", "together CLIP-I")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--out", default="runs/disendiff-ablation")
    parser.add_argument("--pairs", type=int, default=3, help="two-concept images (distinct concept pairs)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=16, help="samples per prompt")
    parser.add_argument("--masks", action="store_true",
                        help="masked diffusion loss (--mask-data): the world's masks of the two objects as given masks")
    args = parser.parse_args()

    from genaug.artefacts import DatasetWriter, read_dataset
    from genaug.evaluate.classifier import ci95
    from genaug.personalize.evaluate import EvalPersonalizationConfig, evaluate_personalization
    from genaug.personalize.multiconcept import MultiConceptConfig, train_multiconcept
    from genaug.world import world_object_masks, write_masks

    world, out = Path(args.world), Path(args.out)
    pairs = read_dataset(world / "novel-pairs")
    chosen, seen = [], set()
    for index, record in enumerate(pairs.records):
        key = frozenset(record["concepts"])
        if key not in seen:
            seen.add(key)
            chosen.append(index)
        if len(chosen) == args.pairs:
            break

    def evaluate(adapter: Path, references: Path, prompt: str, placeholder: str, word: str, where: Path) -> dict:
        return evaluate_personalization(EvalPersonalizationConfig(
            model="embedded", adapters=[str(adapter)], references=str(references), prompts=[prompt],
            placeholder=placeholder, class_word=word, images_per_prompt=args.images, compare_base=False,
            output=str(where), device="cpu")).scores["adapted"]

    units = []
    for index in chosen:
        concepts = pairs.records[index]["concepts"]
        image_dir = out / "data" / f"pair-{index}"
        with DatasetWriter(image_dir, ["pair"]) as writer:
            if "pair" not in writer.done_ids:
                writer.add("pair", pairs.image(index), 0)
        mask_dir = None
        if args.masks:  # one mask per concept, left then right, as the class words are ordered
            item_id = pairs.records[index]["id"]
            both = world_object_masks(world, "novel-pairs", [item_id])[item_id]
            mask_dir = write_masks(out / "data" / f"pair-{index}-masks", {f"mask-{i}": m for i, m in enumerate(both)})
        for seed in range(args.seeds):
            unit = {"image": index, "concepts": concepts, "seed": seed}
            for variant, flags in (("calibrated", {}), ("uncalibrated", {"bind_loss": False, "separate_loss": False})):
                folder = out / f"pair-{index}-seed{seed}" / variant
                t0 = time.time()
                train_multiconcept(MultiConceptConfig(
                    model="embedded", instance_data=str(image_dir), class_words=["shape", "shape"],
                    prompt_template="a {0} beside a {1}", max_train_steps=args.steps, output=str(folder / "adapter"),
                    device="cpu", attention_loss_weight=0.1, seed=seed,
                    mask_data=str(mask_dir) if mask_dir else None, **flags))
                seconds = time.time() - t0
                alone = [evaluate(folder / "adapter", world / "novel" / concept.replace(" ", "-"),
                                  f"a photo of a <new{i + 1}> shape", f"<new{i + 1}> shape", concept, folder / f"c{i}")
                         for i, concept in enumerate(concepts)]
                together = evaluate(folder / "adapter", image_dir, "a photo of a <new1> shape beside a <new2> shape",
                                    "<new1> shape beside a <new2>", f"{concepts[0]} beside a", folder / "both")
                unit[variant] = {"alone CLIP-I": sum(a["clip_i"] for a in alone) / len(alone),
                                 "alone feature sim.": sum(a["feature_similarity"] for a in alone) / len(alone),
                                 "together CLIP-I": together["clip_i"], "train_seconds": round(seconds, 1)}
            units.append(unit)
            print(json.dumps(unit), flush=True)

    table = {}
    for metric in METRICS:
        cal = [u["calibrated"][metric] for u in units]
        unc = [u["uncalibrated"][metric] for u in units]
        diff = [c - u for c, u in zip(cal, unc)]
        table[metric] = {"calibrated": ci95(cal), "uncalibrated": ci95(unc), "difference": ci95(diff),
                         "calibrated_higher": sum(d > 0 for d in diff), "units": len(diff)}
    (out / "results.json").write_text(json.dumps({"units": units, "table": table}, indent=2))
    print(f"\n{len(units)} units ({len(chosen)} images x {args.seeds} seeds), mean ± 95% CI\n")
    print("| metric | calibrated | uncalibrated | calibrated - uncalibrated | calibrated higher |")
    print("|---|---|---|---|---|")
    for metric, row in table.items():
        print(f"| {metric} | {row['calibrated'][0]:.3f} ± {row['calibrated'][1]:.3f} | "
              f"{row['uncalibrated'][0]:.3f} ± {row['uncalibrated'][1]:.3f} | "
              f"{row['difference'][0]:+.3f} ± {row['difference'][1]:.3f} | {row['calibrated_higher']} of {row['units']} |")


if __name__ == "__main__":
    main()
