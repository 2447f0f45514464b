"""The shipped embedded model family: it is in the package, it loads, and it works on fresh renders.

These run on the real shipped weights (no world build needed: test images are rendered here from
a seed the world never uses), so they catch a broken or missing family before a user does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genaug.artefacts import load_hf_dataset, read_dataset
from genaug.models.embedded import EMBEDDED_ROOT, embedded_path
from genaug.world.build import RenderTask, render_task
from genaug.world.render import SceneOptions

FRESH_SEED = 987_654  # not a world seed: these images were never trained or evaluated on


def render(shape: str, pattern: str, n: int) -> tuple[torch.Tensor, list[str]]:
    items = [render_task(RenderTask((7, i), "class", ((shape, pattern),)), FRESH_SEED, SceneOptions())
             for i in range(n)]
    images = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2).contiguous()
    return images, [it.caption for it in items]


@pytest.fixture(scope="module")
def figures():
    return json.loads((EMBEDDED_ROOT / "figures.json").read_text())


def test_family_is_shipped_small_and_carded():
    for part in ("clip", "generator", "oracle"):
        folder = embedded_path(part)
        assert (folder / "MODEL_CARD.md").is_file()
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))  # safetensors only
    total = sum(p.stat().st_size for p in EMBEDDED_ROOT.rglob("*") if p.is_file())
    assert total <= 40 * 2 ** 20
    assert (EMBEDDED_ROOT / "MODEL_CARD.md").is_file() and (EMBEDDED_ROOT / "run" / "config.yaml").is_file()


def test_oracle_recognizes_fresh_renders_of_drawable_classes(figures):
    from genaug.pretrain.oracle import load_oracle

    oracle = load_oracle(embedded_path("oracle"))
    novel = set(figures["classes"]["novel"])
    names = [n for n in oracle.class_names if n not in novel]
    images, labels = [], []
    for name in names:
        pattern, shape = name.split()
        batch, _ = render(shape, pattern, 3)
        images.append(batch)
        labels += [oracle.class_names.index(name)] * len(batch)
    predicted, _ = oracle.predict(torch.cat(images))
    accuracy = float((predicted == torch.tensor(labels)).float().mean())
    assert accuracy >= 0.75, accuracy


def test_dual_encoder_matches_captions_to_their_images():
    from genaug.evaluate.metrics import clip_image_features, clip_text_features, recall_at_k
    from genaug.pretrain.clip import load_dual_encoder

    model, tokenizer = load_dual_encoder(embedded_path("clip"))
    images, captions = [], []
    for shape, pattern in [("circle", "striped"), ("square", "dotted"), ("triangle", "plain"), ("cross", "checkered")]:
        batch, caps = render(shape, pattern, 10)
        images.append(batch)
        captions += caps
    image_feats = clip_image_features(model, torch.cat(images))
    text_feats = clip_text_features(model, tokenizer, captions)
    # 40 candidates: chance recall@5 is 0.125.
    assert recall_at_k(text_feats, image_feats, 5) >= 0.4


def test_embedded_generator_synthesizes_a_dataset(tmp_path):
    from genaug.generate.synth import SynthConfig, synthesize

    result = synthesize(SynthConfig(model="embedded", output=str(tmp_path / "syn"),
                                    class_names=["striped circle", "dotted square"], images_per_class=2,
                                    num_inference_steps=8, guidance_scale=4.0, batch_size=4, device="cpu"))
    assert result.generated == 4
    ds = read_dataset(tmp_path / "syn")
    arrays = [np.asarray(ds.image(i)) for i in range(len(ds))]
    assert all(a.shape == (32, 32, 3) for a in arrays)
    assert min(float(a.std()) for a in arrays) > 5  # pictures, not flat fields
    assert len(load_hf_dataset(tmp_path / "syn")["train"]) == 4
