"""Pilot: retrain the embedded UNet from scratch with one change, and judge its text samples by the oracle.

The UNet is trained as ``genaug pretrain`` trains it (``GeneratorConfig`` with the shipped config's
steps, on the pool minus its 1,000 held-out images), on the shipped family's autoencoder and dual-encoder
towers, so the shipped generator is the control. One change at a time:

- ``--separate-text STEPS``: first train the text tower alone to name each caption's shape and pattern
  (``embedded_diagnostics.text_attribute_pretraining``), then freeze it: does a UNet that gets the
  shape and pattern words apart from its first step learn to draw them?
- ``--text-tower FOLDER``: condition on another dual encoder's text tower and tokenizer (a `<family>/clip/`
  folder, e.g. the one `conv_tower_pilot.py` trains beside a convolutional image tower): does a UNet
  whose prompts come from a tower that was trained against images it could read shape in draw shape?
- ``--text-tower words``: condition on a stock ``CLIPTextModel`` with no transformer layers, its token
  embeddings drawn at random (seeded) and frozen: every word its own vector, no two words alike (cosine
  about 0), word order only through a weak random position embedding. The best separation any text
  tower could give, at no training cost: if a UNet cannot draw the classes from it, the UNet is the
  bottleneck.
- ``--image-tower FOLDER``: condition on the convolutional image tower of a dual encoder that
  `conv_tower_pilot.py --tower cnn` trained (its `<out>/clip`), in place of the shipped ViT tower, whose
  embeddings hold colour and background but little shape (linear probe 0.29 against the CNN's 0.74): do
  image-conditioned samples keep their source's class once the embedding carries it? Only the UNet is saved.
- ``--generator JSON``: ``GeneratorConfig`` overrides, e.g. ``'{"snr_gamma": 5}'`` (Min-SNR weighting) or
  ``'{"prediction_type": "v_prediction", "zero_terminal_snr": true}'``. With ``latent_normalization: channel``
  (the default) the autoencoder's latent channels are centred and scaled first (``normalize_latent_channels``;
  the first shipped family's autoencoder needed it, the second's already is).

    python benchmarks/generator_pilot.py --separate-text 300 --out runs/pilot-separated
    python benchmarks/generator_pilot.py --generator '{"snr_gamma": 5}' --out runs/pilot-minsnr
    python benchmarks/generator_pilot.py --text-tower runs/pilot-conv-tower/clip --out runs/pilot-conv-text
    python benchmarks/generator_pilot.py --text-tower words --out runs/pilot-words
    python benchmarks/generator_pilot.py --text-tower words --generator '{"pooled_text_embedding": true}' \
        --out runs/pilot-words-pooled
    python benchmarks/generator_pilot.py --text-tower runs/pilot-conv-tower/clip \
        --image-tower runs/pilot-conv-tower/clip --out runs/pilot-conv-family
    python benchmarks/generator_pilot.py --text-tower words --generator '{"unet_channels": [96, 192, 192]}' \
        --out runs/pilot-words-wide96

``--curve-every N`` keeps a checkpoint every N steps and scores each one's EMA weights as well (at guidance 4
and 8): a learning curve of one run (the cosine schedule still spans the whole run, so step 4,000 of a
10,000-step run is not a 4,000-step run).

Prints the text tower's word cosines and the oracle's class / shape / pattern accuracy on 8 samples per
drawable class at guidance 1, 4 and 8: prompted by text (``embedded_diagnostics.sample_check``) and
conditioned on a test image's embedding (``image_check``); and saves the pipeline.
About 27 minutes on 2 CPU cores at the shipped 4,000 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import embedded_diagnostics as diag  # benchmarks/ is on sys.path when a script here runs
from genaug.artefacts import read_dataset
from genaug.models.embedded import EMBEDDED_ROOT
from genaug.pretrain.data import load_split
from genaug.pretrain.diffusion import GeneratorConfig, normalize_latent_channels, train_generator


def word_vector_tower(config, seed: int = 0, position_std: float = 0.3):
    """A stock ``CLIPTextModel`` with no layers: each token's state is LayerNorm(random word vector + position)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{**config.to_dict(), "num_hidden_layers": 0})
    tower = CLIPTextModel(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    emb = tower.embeddings
    emb.token_embedding.weight.copy_(torch.randn(emb.token_embedding.weight.shape, generator=g))
    emb.position_embedding.weight.copy_(position_std * torch.randn(emb.position_embedding.weight.shape, generator=g))
    return tower


def learning_curve(generator, oracle, class_names, drawable, checkpoints: Path) -> list[dict]:
    """Oracle scores of each kept checkpoint's EMA UNet, at guidance 4 and 8."""
    from genaug.artefacts import read_safetensors
    from genaug.checkpoints import STATE_FILE, list_checkpoints

    final_unet, curve = generator.unet, []
    for path in list_checkpoints(checkpoints):
        tensors, _ = read_safetensors(path / STATE_FILE)
        unet = copy.deepcopy(final_unet)
        unet.load_state_dict({k[len("extra/ema/"):]: v for k, v in tensors.items() if k.startswith("extra/ema/")})
        generator.unet = unet
        step = int(path.name.split("-")[1])
        curve += [{"step": step, **diag.sample_check(generator, oracle, class_names, drawable, g, 8)}
                  for g in (4.0, 8.0)]
        print(json.dumps(curve[-2:]), flush=True)
    generator.unet = final_unet
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="worlds/default")
    parser.add_argument("--out", required=True)
    parser.add_argument("--unet-steps", type=int, default=4000, help="the shipped config's 4,000")
    parser.add_argument("--warmup-steps", type=int, default=300, help="the shipped config's 300")
    parser.add_argument("--separate-text", type=int, default=0, metavar="STEPS")
    parser.add_argument("--text-tower", default=None, metavar="FOLDER",
                        help="a dual-encoder folder whose text tower and tokenizer replace the shipped ones, "
                             "or 'words': a text tower of random, frozen word vectors (see above)")
    parser.add_argument("--image-tower", default=None, metavar="FOLDER",
                        help="a conv_tower_pilot.py --tower cnn dual-encoder folder whose CNN image tower replaces "
                             "the shipped image encoder")
    parser.add_argument("--generator", default="{}", help="GeneratorConfig overrides as JSON")
    parser.add_argument("--curve-every", type=int, default=0, metavar="N",
                        help="also score the EMA weights every N steps (a learning curve)")
    parser.add_argument("--holdout", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world, out = Path(args.world), Path(args.out)
    pipe, oracle, test, drawable = diag.load_family(EMBEDDED_ROOT, world)
    pool = load_split(world / "pool", "train", progress=False)
    overrides = json.loads(args.generator)
    report: dict = {"separate_text_steps": args.separate_text, "generator": overrides}
    t0 = time.time()
    if args.text_tower == "words":
        pipe.text_encoder = word_vector_tower(pipe.text_encoder.config)
        report["text_tower"] = "words"
    elif args.text_tower:
        # Its image tower may not be a stock CLIP one (conv_tower_pilot.py's): take the text side only.
        from genaug.pretrain.clip import export_encoders, load_dual_encoder

        dual_encoder, pipe.tokenizer = load_dual_encoder(args.text_tower)
        pipe.text_encoder = export_encoders(dual_encoder)[0]
        report["text_tower"] = args.text_tower
    if args.image_tower:
        from conv_tower_pilot import load_conv_image_encoder

        pipe.image_encoder = load_conv_image_encoder(args.image_tower)
        report["image_tower"] = args.image_tower
    if args.separate_text:
        records = read_dataset(world / "pool", "train").records
        ids = diag.token_ids(pipe.tokenizer, pool.captions)
        diag.text_attribute_pretraining(pipe.text_encoder, ids, records, args.separate_text)
    report["text_tower_cosine_by_layer"] = diag.text_tower_check(pipe)
    print(json.dumps(report), flush=True)

    if args.curve_every:
        overrides["checkpoint_every"] = args.curve_every
    # The shipped autoencoder, not a new one: the UNet is the only thing that changes.
    cfg = GeneratorConfig(unet_steps=args.unet_steps, warmup_steps=args.warmup_steps, **overrides)
    vae = copy.deepcopy(pipe.vae)
    if cfg.latent_normalization == "channel":  # as train_vae would have left it
        normalize_latent_channels(vae, pool.images[:4096])
    result = train_generator(cfg, pool.subset(range(len(pool) - args.holdout)), pipe.text_encoder,
                             pipe.image_encoder, pipe.tokenizer, pipe.feature_extractor, out / "work",
                             progress=False, vae=vae,
                             keep_checkpoints=args.unet_steps if args.curve_every else 2)
    report["unet_seconds"] = result.unet_seconds
    generator = result.pipeline
    generator.set_progress_bar_config(disable=True)
    report["samples"] = [diag.sample_check(generator, oracle, test.class_names, drawable, g, 8)
                         for g in (1.0, 4.0, 8.0)]
    report["image_conditioned"] = [diag.image_check(generator, oracle, test, drawable, g, 8) for g in (1.0, 4.0, 8.0)]
    print(json.dumps({k: report[k] for k in ("samples", "image_conditioned")}), flush=True)
    if args.curve_every:
        checkpoints = out / "work" / "unet-checkpoints"
        report["curve"] = learning_curve(generator, oracle, test.class_names, drawable, checkpoints)
    report["seconds"] = round(time.time() - t0, 1)
    if args.image_tower:  # the conv tower is no transformers model: the pipeline cannot be saved whole
        generator.unet.save_pretrained(out / "generator" / "unet", safe_serialization=True)
    else:
        generator.save_pretrained(out / "generator", safe_serialization=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
