"""The embedded dual encoder: config checks, EOS pooling, training, save/load, exported towers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genaug.config import ConfigError, config_from_dict
from genaug.models.tokenizer import build_clip_tokenizer
from genaug.pretrain.clip import (DualEncoderConfig, DualEncoderResult, build_dual_encoder, contrastive_loss,
                                  export_encoders, load_dual_encoder, random_crop_flip, random_rotate90,
                                  tokenize_captions, train_dual_encoder)
from genaug.pretrain.data import ImageSplit, clip_normalize

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
SIZES = {"small": 0.2, "large": 0.42}  # square half-side as a fraction of the image side


def toy_split(per_class: int = 4, size: int = 16, seed: int = 0) -> ImageSplit:
    """Colour x size toy squares on a noisy grey background, captioned "a <size> <colour> square"."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels, captions = [], [], []
    names = [f"{s} {c} square" for c in COLOURS for s in SIZES]
    for label, name in enumerate(names):
        size_word, colour, _ = name.split()
        for _ in range(per_class):
            image = np.full((size, size, 3), 128, np.float32) + rng.normal(0, 8, (size, size, 3))
            cx, cy = size / 2 + rng.uniform(-1, 1), size / 2 + rng.uniform(-1, 1)
            half = size * SIZES[size_word] * rng.uniform(0.9, 1.1)
            image[(np.abs(xx - cx) < half) & (np.abs(yy - cy) < half)] = COLOURS[colour]
            images.append(np.clip(image, 0, 255).astype(np.uint8))
            labels.append(label)
            captions.append(f"a {name}")
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(tensor, torch.tensor(labels), captions, names, [{} for _ in labels])


def tiny_config(**overrides) -> DualEncoderConfig:
    values = dict(image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
                  text_layers=2, text_heads=2, projection_dim=16, max_text_length=16, steps=60, batch_size=16,
                  learning_rate=3e-3, warmup_steps=5, progress=False)
    values.update(overrides)
    return DualEncoderConfig(**values)


_TRAINED: dict[str, tuple] = {}


def trained_toy_model(tmp_path_factory) -> tuple[Path, DualEncoderResult, ImageSplit, object]:
    """``(folder, result, toy split, tokenizer)`` of a tiny dual encoder trained once per session."""
    if "toy" not in _TRAINED:
        toy = toy_split()
        corpus = toy.captions + [f"a photo of a {name}" for name in toy.class_names]
        tokenizer = build_clip_tokenizer(tmp_path_factory.mktemp("tok"), model_max_length=16, corpus=corpus)
        out = tmp_path_factory.mktemp("clip")
        result = train_dual_encoder(tiny_config(), toy, tokenizer, out, eval_split=toy)
        _TRAINED["toy"] = (out, result, toy, tokenizer)
    return _TRAINED["toy"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run faster on one thread, and many times faster when other processes share the
    # cores (OpenMP threads spin-waiting on a busy core).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> ImageSplit:
    return trained_toy_model(tmp_path_factory)[2]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return trained_toy_model(tmp_path_factory)[3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out, result, _, _ = trained_toy_model(tmp_path_factory)
    return out, result


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DualEncoderConfig(image_size=32, patch_size=5)
    with pytest.raises(ValueError, match="divisible"):
        DualEncoderConfig(vision_width=30, vision_heads=4)
    with pytest.raises(ValueError, match="negatives"):
        DualEncoderConfig(batch_size=1)
    with pytest.raises(ConfigError):
        config_from_dict(DualEncoderConfig, {"steps": "many"})
    assert config_from_dict(DualEncoderConfig, {"steps": "7", "warmup_steps": 2}).steps == 7


def test_pooling_uses_the_first_eos_of_the_pruned_tokenizer(tokenizer):
    model = build_dual_encoder(tiny_config(), len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).eval()
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id == len(tokenizer) - 1
    long_caption = " ".join(["a large blue square"] * 3)  # 14 words: cut at 16 tokens
    ids, lengths = tokenize_captions(tokenizer, ["a red square", long_caption], 16)
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, lengths[0] - 1] == tokenizer.eos_token_id
    assert ids[1, -1] == tokenizer.eos_token_id  # a caption cut at max length still ends with EOS
    with torch.no_grad():
        out = model.text_model(input_ids=ids)
        eos_position = int(lengths[0]) - 1
        assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos_position])
        # Tokens after the EOS are invisible to it (causal attention): other padding, same pooled feature.
        changed = ids.clone()
        changed[0, eos_position + 1:] = tokenizer.bos_token_id
        assert torch.allclose(model.text_model(input_ids=changed).pooler_output[0], out.pooler_output[0], atol=1e-6)


def test_training_lowers_the_loss_and_is_reproducible(tmp_path, toy, tokenizer, trained):
    _, result = trained
    losses = [loss for _, loss in result.loss_history]
    assert np.mean(losses[-2:]) < 0.5 * losses[0]
    assert result.eval_metrics["recall@10"] > 0.5 and result.eval_metrics["zero_shot_top1"] > 0.5
    again = train_dual_encoder(tiny_config(steps=5), toy, tokenizer, tmp_path / "a")
    twice = train_dual_encoder(tiny_config(steps=5), toy, tokenizer, tmp_path / "b")
    assert again.loss_history == twice.loss_history


def test_saved_folder_loads_like_a_real_clip_checkpoint(trained, toy, tokenizer):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from genaug.evaluate.metrics import clip_image_features, clip_text_features

    out, _ = trained
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model = CLIPModel.from_pretrained(out).eval()
    loaded_tokenizer = CLIPTokenizer.from_pretrained(out)
    assert loaded_tokenizer.model_max_length == 16
    assert loaded_tokenizer("a red square")["input_ids"] == tokenizer("a red square")["input_ids"]
    processor = CLIPImageProcessor.from_pretrained(out)
    pixels = processor(images=[im.permute(1, 2, 0).numpy() for im in toy.images[:3]], return_tensors="pt")
    assert torch.allclose(pixels["pixel_values"], clip_normalize(toy.images[:3]), atol=1e-5)

    reloaded, reloaded_tokenizer = load_dual_encoder(out)
    first = clip_image_features(reloaded, toy.images), clip_text_features(reloaded, reloaded_tokenizer, toy.captions)
    second = clip_image_features(model, toy.images), clip_text_features(model, loaded_tokenizer, toy.captions)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_exported_encoders_match_the_dual_encoder(trained, toy, tokenizer):
    out, _ = trained
    model, _ = load_dual_encoder(out)
    text, vision = export_encoders(model)
    ids = tokenizer(toy.captions[:5], padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    pixels = clip_normalize(toy.images[:5])
    with torch.no_grad():
        assert torch.equal(text(input_ids=ids).last_hidden_state, model.text_model(input_ids=ids).last_hidden_state)
        assert torch.equal(vision(pixel_values=pixels).image_embeds,
                           model.get_image_features(pixel_values=pixels).pooler_output)
    assert vision.config.projection_dim == model.config.projection_dim
    assert text.training is False and vision.training is False


def test_random_crop_flip_keeps_shape_and_can_be_identity():
    images = torch.rand(6, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(images, generator, scale_min=1.0, flip=False), images)
    out = random_crop_flip(images, generator, scale_min=0.8, flip=True)
    assert out.shape == images.shape and not torch.equal(out, images)
    # A full-size crop with every image flipped is an exact mirror.
    flipped = random_crop_flip(images, torch.Generator().manual_seed(1), scale_min=1.0, ratio=(1.0, 1.0), flip=True)
    mirrored = [torch.allclose(a, images[i].flip(-1), atol=1e-5) or torch.allclose(a, images[i], atol=1e-5)
                for i, a in enumerate(flipped)]
    assert all(mirrored)
    rotated = random_rotate90(images, torch.Generator().manual_seed(2))
    assert all(any(torch.equal(r, torch.rot90(images[i], k, dims=(1, 2))) for k in range(4))
               for i, r in enumerate(rotated))


def test_contrastive_loss_equals_clip_models_own(toy, tokenizer):
    model = build_dual_encoder(tiny_config(), len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ids = tokenizer(toy.captions[:6], padding=True, return_tensors="pt")["input_ids"]
    pixels = clip_normalize(toy.images[:6])
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        assert torch.allclose(contrastive_loss(model, ids, pixels), expected, atol=1e-6)
        # Under bf16 autocast only the towers lose precision; the loss stays close.
        assert abs(float(contrastive_loss(model, ids, pixels, bf16=True)) - float(expected)) < 0.05


def test_attribute_swapped_caption_replaces_the_main_objects_word():
    from genaug.pretrain.clip import attribute_swapped_caption

    shapes, patterns = ["circle", "semicircle", "square"], ["plain", "striped", "dotted"]
    rng = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        out = attribute_swapped_caption("a red striped circle next to a blue circle", "circle", "striped", shapes,
                                        patterns, rng)
        assert out.endswith("next to a blue circle")  # the second object is never touched
        head = out[: -len(" next to a blue circle")]
        assert head != "a red striped circle"
        assert head in {f"a red {p} {s}" for p in patterns for s in shapes}
        assert sum(w != v for w, v in zip(head.split(), "a red striped circle".split())) == 1
        seen.add(head)
    assert len(seen) >= 3  # both shape and pattern swaps happen
    # "circle" inside "semicircle" is not the word "circle".
    assert attribute_swapped_caption("a semicircle", "circle", "plain", shapes, patterns, rng) is None
    # A plain object whose caption leaves "plain" unsaid gets a pattern word inserted, or a new shape.
    outs = {attribute_swapped_caption("a red square on sand", "square", "plain", shapes, patterns, rng)
            for _ in range(30)}
    assert outs <= {"a red striped square on sand", "a red dotted square on sand", "a red circle on sand",
                    "a red semicircle on sand"}
    assert "a red striped square on sand" in outs and "a red circle on sand" in outs


def test_hard_negatives_join_the_image_to_text_softmax_only(toy, tokenizer):
    model = build_dual_encoder(tiny_config(), len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ids = tokenizer(toy.captions[:6], padding=True, return_tensors="pt")["input_ids"]
    negative_ids = tokenizer(toy.captions[6:12], padding=True, return_tensors="pt")["input_ids"]
    pixels = clip_normalize(toy.images[:6])
    with torch.no_grad():
        plain = contrastive_loss(model, ids, pixels)
        with_negatives = contrastive_loss(model, ids, pixels, negative_ids=negative_ids)
    # Extra negatives only add terms to the image-to-text denominators: the loss can only grow.
    assert float(with_negatives) > float(plain)


def test_hard_negative_captions_need_attribute_labels(toy):
    from genaug.pretrain.clip import hard_negative_captions

    assert hard_negative_captions(toy, 0) is None  # the toy records carry no shape/pattern labels
    labelled = ImageSplit(toy.images, toy.labels, toy.captions, toy.class_names,
                          [{"shape": "square", "pattern": ["plain", "striped"][i % 2]} for i in range(len(toy))])
    negatives = hard_negative_captions(labelled, 0)
    assert len(negatives) == len(toy.captions)
    assert all(n != c for n, c in zip(negatives, toy.captions))
    assert negatives == hard_negative_captions(labelled, 0)  # seeded


def test_attribute_loss_and_hard_negatives_train(tmp_path, toy, tokenizer):
    # Captions are "a <size> <colour> square".
    records = [{"shape": "square", "pattern": "plain", "size": c.split()[1], "colour": c.split()[2]}
               for c in toy.captions]
    labelled = ImageSplit(toy.images, toy.labels, toy.captions, toy.class_names, records)
    cfg = tiny_config(steps=4, warmup_steps=1, attribute_keys=["size", "colour", "missing"], attribute_loss_weight=1.0)
    result = train_dual_encoder(cfg, labelled, tokenizer, tmp_path / "clip")
    assert np.isfinite(result.final_loss)
    model, _ = load_dual_encoder(tmp_path / "clip")
    assert not any("head" in name for name in model.state_dict())  # auxiliary heads are not shipped


def test_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    import genaug.pretrain.clip as clip

    monkeypatch.setattr(clip, "_cpu_flags", lambda: {"avx512f", "avx512bw"})
    assert not clip.native_bf16(torch.device("cpu"))  # oneDNN would emulate it, ~2x slower
    monkeypatch.setattr(clip, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert clip.native_bf16(torch.device("cpu"))


def test_eager_attention_trains_the_same_model_as_sdpa(tmp_path, toy, tokenizer):
    # `attention: auto` trains with eager attention on the CPU for speed; it is the same arithmetic
    # up to float rounding, and the saved model runs with transformers' default kernel again.
    runs = {kind: train_dual_encoder(tiny_config(steps=4, warmup_steps=1, bf16=False, attention=kind), toy, tokenizer,
                                     tmp_path / kind) for kind in ("eager", "sdpa")}
    assert runs["eager"].attention == "eager" and runs["sdpa"].attention == "sdpa"
    eager, _ = load_dual_encoder(tmp_path / "eager")
    sdpa, _ = load_dual_encoder(tmp_path / "sdpa")
    for (name, a), (_, b) in zip(eager.state_dict().items(), sdpa.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-4), name
    assert eager.config._attn_implementation == "sdpa"
    auto = train_dual_encoder(tiny_config(steps=1, warmup_steps=0), toy, tokenizer, tmp_path / "auto")
    assert auto.attention == "eager"
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny_config(attention="flash")
