"""Personalization on the embedded world: LoRA, textual inversion and DisenDiff against the base model.

1. For each novel benchmark class (never in the pool: the base model cannot draw it from text), a
   DreamBooth-LoRA and a textual inversion are trained on ``--shots`` of its training images, then
   ``genaug eval-personalization`` draws samples for the concept prompt and two new-context prompts
   and scores them: the oracle's accuracy on the class, CLIP-T (placeholder replaced by the class
   name; per prompt, over all three, and as issue 4 reads it, over the two new-context prompts) and CLIP-I,
   against the base model on the same prompts.
2. DisenDiff on one two-concept image (``novel-pairs``): trained twice in one run, with and without
   the attention-calibration terms; each concept is drawn alone and scored per concept (CLIP-I to
   that concept's reference images, oracle-feature similarity), and both together.

    python benchmarks/personalization_embedded.py --world worlds/default --out runs/personalization
    # LoRA on every UNet layer (LoCon), longer, LoRA only:
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/personalization-locon \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 1200
    # the same with DreamBooth's prior preservation:
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/personalization-locon-prior \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 1200 --lora-prior
    # each adapter sampled at LoRA scales 1, 0.75 and 0.5 (reported as lora, lora@0.75, lora@0.5):
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/locon-2400-scales \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 2400 --lora-scales 1,0.75,0.5
    # each reference trained on its own caption (what else it shows is named, not learned into "sks"):
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/locon-2400-captions \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 2400 --lora-captions
    # prior preservation on 200 captioned pool images (Custom Diffusion's captioned real regularization images):
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/locon-2400-prior-pool \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 2400 --lora-prior-pool 200
    # the same adapters sampled with delayed subject conditioning (FastComposer): the base model draws the first
    # 30% / 50% of the steps on the class-word prompt, then the adapter joins (reported as lora+delay0.3, ...):
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/locon-2400-delay \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 2400 --lora-starts 0,0.3,0.5 --reuse-adapters
    # masked diffusion loss (Break-A-Scene), the world's object masks as given masks:
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/personalization-locon-masked \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 2400 --lora-masks
    # each reference also cut out by its mask and pasted on 8 of 64 rendered scenes (sand, water, wall, noise; not the
    # evaluation's grass or sky), as BLIP-Diffusion composes subjects onto random backgrounds:
    python benchmarks/personalization_embedded.py --world worlds/default --out runs/locon-2400-backgrounds \
        --methods lora --lora-targets all --lora-rank 16 --lora-steps 2400 --lora-backgrounds 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def identified_caption(caption: str, name: str) -> str:
    """A reference's world caption with the concept named as the prompts name it: "a red wavy square on grass" ->
    "a red sks wavy square on grass". Captions drop the word "plain" ("a red heart"), so the shape word stands in."""
    if name in caption:
        return caption.replace(name, f"sks {name}", 1)
    shape = name.split()[-1]
    if shape not in caption.split():
        raise SystemExit(f"caption {caption!r} names neither {name!r} nor {shape!r}")
    words = caption.split()
    words[words.index(shape)] = f"sks {name}"
    return " ".join(words)


def real_context_clip_t(test, judge, name: str, contexts: list[str]) -> dict:
    """CLIP-T of the ``test`` split's real images of ``name`` on each context's background, against that context's
    prompt, read by ``judge`` (the evaluation's ``(CLIPModel, tokenizer)``): what a perfect adapter would score (the
    dual encoder never saw the novel concepts, so this can fall below the base model's wrong samples)."""
    import numpy as np
    import torch

    from genaug.evaluate.metrics import clip_image_features, clip_text_features
    from genaug.world.render import BACKGROUND_PHRASES

    kind_of = {phrase: kind for kind, phrases in BACKGROUND_PHRASES.items() for phrase in phrases}
    clip_model, tokenizer = judge
    scores = {}
    for context in contexts:
        kind = kind_of[context.split("{}")[-1].strip()]  # the scene the context's words name
        rows = [i for i, r in enumerate(test.records) if r["class_name"] == name and r["background"] == kind]
        images = torch.from_numpy(np.stack([np.asarray(test.image(i)) for i in rows])).permute(0, 3, 1, 2)
        text = clip_text_features(clip_model, tokenizer, [context.format(name)])
        clip_t = float((clip_image_features(clip_model, images) @ text.T).mean())
        scores[context.format(name)] = {"clip_t": round(clip_t, 4), "images": len(rows)}
    return {"per_prompt": scores, "mean": round(sum(v["clip_t"] for v in scores.values()) / len(scores), 4)}


def write_backgrounds(folder: Path, count: int, kinds: list[str], size: int) -> Path:
    """``count`` scenes without objects from the world's own renderer, kinds in turn, each captioned with one of the
    world's phrases for its kind: what a user's folder of background photos would be."""
    import numpy as np
    from PIL import Image

    from genaug.artefacts import DatasetWriter
    from genaug.world.render import BACKGROUND_PHRASES, render_background

    unknown = sorted(set(kinds) - set(BACKGROUND_PHRASES))
    if unknown:
        raise SystemExit(f"unknown background kinds {unknown}; the world has {sorted(BACKGROUND_PHRASES)}")
    rng = np.random.default_rng(0)
    with DatasetWriter(folder, ["background"]) as writer:
        for i in range(count):
            kind = kinds[i % len(kinds)]
            tint = tuple(float(t) for t in rng.uniform(-18, 18, 3))
            scene = render_background(kind, size, tint, int(rng.integers(2 ** 31)))
            phrase = str(rng.choice(BACKGROUND_PHRASES[kind]))
            if f"bg-{i}" not in writer.done_ids:
                image = Image.fromarray(np.clip(scene, 0, 255).round().astype(np.uint8))
                writer.add(f"bg-{i}", image, 0, caption=phrase, background=kind)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--out", default="runs/personalization")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=16, help="samples per prompt")
    parser.add_argument("--classes", nargs="*", default=None, help="novel classes (default: all)")
    parser.add_argument("--methods", default="lora,ti,disendiff",
                        help="which of lora, ti, pivotal (TI + a UNet LoRA with the --lora-* settings), disendiff")
    parser.add_argument("--lora-targets", default="attention", choices=["attention", "all"],
                        help="UNet layers with LoRA (train-lora --unet-targets)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--lora-dora", action="store_true", help="DoRA: learned magnitudes beside the LoRA")
    parser.add_argument("--lora-prior", action="store_true",
                        help="prior preservation: 50 base-model images of --lora-class-prompt")
    parser.add_argument("--lora-prior-pool", type=int, default=0,
                        help="prior preservation on this many captioned pool images (the generator's own training "
                             "data, drawn at random), each with its caption, as Custom Diffusion regularizes")
    parser.add_argument("--lora-prior-weight", type=float, default=1.0, help="prior loss weight (train-lora's)")
    parser.add_argument("--lora-class-prompt", default="a photo of a {}",
                        help="class prompt for --lora-prior; {} is the class name")
    parser.add_argument("--lora-masks", action="store_true",
                        help="masked diffusion loss (Break-A-Scene): the world's object masks as the given masks")
    parser.add_argument("--lora-mask-background", type=float, default=0.0,
                        help="with --lora-masks: weight holding the background to the base model's prediction")
    parser.add_argument("--lora-backgrounds", type=int, default=0,
                        help="render this many scenes without objects and train each reference, cut out by the "
                             "world's object mask, on --lora-backgrounds-per-image of them as well (train-lora "
                             "--background-data); the scene kinds are --lora-background-kinds")
    parser.add_argument("--lora-background-kinds", default="sand,water,wall,noise",
                        help="scene kinds to render: by default not grass or sky, the contexts the evaluation asks "
                             "for, so that those stay new to the adapter")
    parser.add_argument("--lora-backgrounds-per-image", type=int, default=8)
    parser.add_argument("--lora-background-captions", action="store_true",
                        help="append the scene's words (\"on sand\") to the composites' prompt")
    parser.add_argument("--lora-scales", default="1",
                        help="comma-separated LoRA scales to sample each adapter at (eval-personalization "
                             "--adapter-weights); scale 1 is reported as lora, others as lora@<scale>")
    parser.add_argument("--lora-starts", default="0",
                        help="comma-separated adapter starts: each LoRA is also sampled with the base model drawing "
                             "this fraction of the steps first (eval-personalization --adapter-start)")
    parser.add_argument("--reuse-adapters", action="store_true",
                        help="evaluate a LoRA already trained in --out with the same steps instead of training it")
    parser.add_argument("--lora-captions", action="store_true",
                        help="train each reference on its own world caption with the identifier put in "
                             "(train-lora --caption-column)")
    args = parser.parse_args()

    from genaug.artefacts import DatasetWriter, read_dataset
    from genaug.personalize.evaluate import EvalPersonalizationConfig, evaluate_personalization
    from genaug.personalize.lora import LoraTrainConfig, train_lora
    from genaug.personalize.multiconcept import MultiConceptConfig, train_multiconcept
    from genaug.personalize.textual_inversion import TextualInversionConfig, train_textual_inversion
    from genaug.models.embedded import resolve_model
    from genaug.pretrain.clip import load_dual_encoder
    from genaug.world import world_object_masks, write_masks

    world, out = Path(args.world), Path(args.out)
    info = json.loads((world / "world.json").read_text())
    novel = [c["name"] for c in info["benchmark"]["classes"] if c.get("novel_concept")]
    bench = read_dataset(world / "bench", "train")
    test = read_dataset(world / "bench", "test")
    judge = load_dual_encoder(resolve_model("embedded:clip"))  # eval-personalization's default CLIP-T judge
    methods = set(args.methods.split(","))
    # A second invocation into the same --out (other --classes) adds to the results instead of replacing them.
    results: dict = {"lora": {}, "ti": {}, "disendiff": {}}
    if (out / "results.json").exists():
        results.update(json.loads((out / "results.json").read_text()))
    prior_pool = None
    if args.lora_prior_pool:
        import random

        pool = read_dataset(world / "pool", "train")
        prior_pool = out / "prior-pool"
        with DatasetWriter(prior_pool, ["pool"]) as writer:
            for i in sorted(random.Random(0).sample(range(len(pool)), args.lora_prior_pool)):
                if pool.records[i]["id"] not in writer.done_ids:
                    writer.add(pool.records[i]["id"], pool.image(i), 0, caption=pool.records[i]["caption"])
    backgrounds = None
    if args.lora_backgrounds:
        backgrounds = write_backgrounds(out / "backgrounds", args.lora_backgrounds,
                                        args.lora_background_kinds.split(","), info["image_size"])
    for name in args.classes or novel:
        label = bench.class_names.index(name)
        rows = [i for i, r in enumerate(bench.records) if int(r["label"]) == label][: args.shots]
        data = out / "data" / name.replace(" ", "-")
        with DatasetWriter(data, [name]) as writer:
            for i in rows:
                if f"ref-{i}" not in writer.done_ids:
                    caption = identified_caption(bench.records[i]["caption"], name) if args.lora_captions else None
                    writer.add(f"ref-{i}", bench.image(i), 0, **({"caption": caption} if caption else {}))
        slug = name.replace(" ", "-")
        masks = None
        if args.lora_masks or backgrounds:  # the main object's visible pixels, as a user's segmentation would give them
            ids = [bench.records[i]["id"] for i in rows]
            object_masks = world_object_masks(world, "bench/train", ids)
            masks = write_masks(out / "masks" / slug, {f"mask-{i}": object_masks[i][0] for i in ids})
        trained = []
        lora_steps = args.lora_steps or args.steps
        finished = out / "lora" / slug / "run" / "metrics.json"
        reuse = args.reuse_adapters and finished.is_file() and \
            json.loads(finished.read_text()).get("steps") == lora_steps
        if "lora" in methods and reuse:
            seconds = json.loads(finished.read_text())["seconds"]
            print(f"reusing the trained adapter in {out / 'lora' / slug}", flush=True)
        elif "lora" in methods:
            t0 = time.time()
            train_lora(LoraTrainConfig(model="embedded", instance_data=str(data),
                                       instance_prompt=f"a photo of a sks {name}", output=str(out / "lora" / slug),
                                       max_train_steps=lora_steps, learning_rate=args.lora_lr,
                                       rank=args.lora_rank, unet_targets=args.lora_targets, train_batch_size=4,
                                       use_dora=args.lora_dora, instance_mask_data=str(masks) if masks else None,
                                       mask_background_weight=args.lora_mask_background,
                                       background_data=str(backgrounds) if backgrounds else None,
                                       background_caption_column="caption" if args.lora_background_captions
                                       else None, backgrounds_per_image=args.lora_backgrounds_per_image,
                                       with_prior_preservation=args.lora_prior or prior_pool is not None,
                                       caption_column="caption" if args.lora_captions else None,
                                       class_prompt=args.lora_class_prompt.format(name),
                                       class_data=str(prior_pool) if prior_pool else None,
                                       class_caption_column="caption" if prior_pool else None,
                                       num_class_images=args.lora_prior_pool or 50,
                                       prior_loss_weight=args.lora_prior_weight,
                                       device="cpu"))
            seconds = time.time() - t0
        if "lora" in methods:
            for scale in [float(x) for x in args.lora_scales.split(",")]:
                for start in [float(x) for x in args.lora_starts.split(",")]:
                    kind = ("lora" if scale == 1 else f"lora@{scale:g}") + (f"+delay{start:g}" if start else "")
                    trained.append((kind, out / "lora" / slug, f"sks {name}", seconds, scale, start))
        if "ti" in methods:
            t0 = time.time()
            train_textual_inversion(TextualInversionConfig(model="embedded", instance_data=str(data),
                                                           placeholder_token=f"<{slug}>", initializer_token="shape",
                                                           num_vectors=2, output=str(out / "ti" / slug),
                                                           max_train_steps=args.steps, device="cpu"))
            trained.append(("ti", out / "ti" / slug, f"<{slug}>", time.time() - t0, 1.0, 0.0))
        if "pivotal" in methods:
            # Pivotal tuning: the placeholder's embeddings and a UNet LoRA (the same rank, layers, learning rate and
            # steps as the LoRA runs) learn together, so the concept need not overwrite an existing word.
            folder = out / "pivotal" / slug
            finished = folder / "run" / "metrics.json"
            if args.reuse_adapters and finished.is_file() and \
                    json.loads(finished.read_text()).get("steps") == lora_steps:
                seconds = json.loads(finished.read_text())["seconds"]
            else:
                t0 = time.time()
                train_textual_inversion(TextualInversionConfig(
                    model="embedded", instance_data=str(data), placeholder_token=f"<{slug}>",
                    initializer_token="shape", num_vectors=2, output=str(folder), max_train_steps=lora_steps,
                    pivotal=True, rank=args.lora_rank, lora_learning_rate=args.lora_lr,
                    unet_targets=args.lora_targets, device="cpu"))
                seconds = time.time() - t0
            for start in [float(x) for x in args.lora_starts.split(",")]:
                trained.append(("pivotal" + (f"+delay{start:g}" if start else ""), folder, f"<{slug}>", seconds,
                                1.0, start))
        contexts = ["a photo of a {} on grass", "a photo of a {} in the sky"]
        results.setdefault("real", {})[name] = real_context_clip_t(test, judge, name, contexts)
        for kind, adapter, words, seconds, scale, start in trained:
            prompts = [f"a photo of a {words}"] + [c.format(words) for c in contexts]
            report = evaluate_personalization(EvalPersonalizationConfig(
                model="embedded", adapters=[str(adapter)], adapter_weights=[scale], references=str(data),
                prompts=prompts, placeholder=words,
                class_word=name, oracle_class=name, images_per_prompt=args.images, adapter_start=start,
                output=str(out / "eval" / kind / slug), device="cpu"))
            # Issue 4's prompt fidelity: CLIP-T on the new-context prompts only (the concept prompt's own CLIP-T
            # is kept in "clip_t", over all three prompts, as before).
            plain_contexts = [c.format(name) for c in contexts]
            context = {which: round(sum(report.scores[which]["per_prompt_clip_t"][p] for p in plain_contexts)
                                    / len(plain_contexts), 4) for which in ("adapted", "base")}
            context["ratio"] = round(context["adapted"] / context["base"], 3)
            results.setdefault(kind, {})[name] = {**report.scores, "new_context_clip_t": context,
                                                  "train_seconds": round(seconds, 1)}
            print(kind, name, json.dumps(results[kind][name]), flush=True)

    if "disendiff" in methods:
        # DisenDiff on the first two-concept image, with and without calibration.
        pairs = read_dataset(world / "novel-pairs")
        first = pairs.records[0]
        concepts = first["concepts"]
        pair_dir = out / "data" / "pair"
        with DatasetWriter(pair_dir, ["pair"]) as writer:
            if "pair" not in writer.done_ids:
                writer.add("pair", pairs.image(0), 0)
        for variant, flags in (("calibrated", {}), ("uncalibrated", {"bind_loss": False, "separate_loss": False})):
            folder = out / "disendiff" / variant
            train_multiconcept(MultiConceptConfig(model="embedded", instance_data=str(pair_dir),
                                                  class_words=["shape", "shape"], prompt_template="a {0} beside a {1}",
                                                  max_train_steps=args.steps, output=str(folder), device="cpu",
                                                  attention_loss_weight=0.1, **flags))
            scores = {}
            for i, concept in enumerate(concepts):
                refs = world / "novel" / concept.replace(" ", "-")
                report = evaluate_personalization(EvalPersonalizationConfig(
                    model="embedded", adapters=[str(folder)], references=str(refs),
                    prompts=[f"a photo of a <new{i + 1}> shape"], placeholder=f"<new{i + 1}> shape", class_word=concept,
                    images_per_prompt=args.images, compare_base=False, output=str(out / "eval" / variant / f"c{i}"),
                    device="cpu"))
                scores[concept] = report.scores["adapted"]
            both = evaluate_personalization(EvalPersonalizationConfig(
                model="embedded", adapters=[str(folder)], references=str(pair_dir),
                prompts=["a photo of a <new1> shape beside a <new2> shape"], placeholder="<new1> shape beside a <new2>",
                class_word=f"{concepts[0]} beside a", images_per_prompt=args.images, compare_base=False,
                output=str(out / "eval" / variant / "both"), device="cpu"))
            scores["together"] = both.scores["adapted"]
            results["disendiff"][variant] = scores
            print("disendiff", variant, json.dumps(scores), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    for kind in [k for k in results if k.startswith(("lora", "pivotal"))] + ["ti"]:
        if results[kind]:
            print(f"\n{kind}: concept | oracle acc. (base) | CLIP-T of base, new-context prompts | all prompts | "
                  "real images of the concept in those contexts, of base")
        for name, r in results[kind].items():
            ratio_all = r["adapted"]["clip_t"] / r["base"]["clip_t"]
            context = r.get("new_context_clip_t", {})
            real = results.get("real", {}).get(name, {}).get("mean", float("nan")) / context.get("base", float("nan"))
            print(f"{name} | {r['adapted']['oracle_accuracy']:.3f} ({r['base']['oracle_accuracy']:.3f}) | "
                  f"{context.get('ratio', float('nan')):.2f} | {ratio_all:.2f} | {real:.2f}")


if __name__ == "__main__":
    main()
