"""Textual inversion: only the new rows learn, the file loads in stock diffusers, pivotal tuning, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genaug.artefacts import read_adapter_config, read_safetensors
from genaug.errors import ConfigError
from genaug.personalize.textual_inversion import TextualInversionConfig, train_textual_inversion


def _cfg(kit, data, out, arch="sd15", **kw):
    base = dict(model=str(kit(arch)), instance_data=str(data), output=str(out), max_train_steps=6,
                train_batch_size=2, learning_rate=5e-2, num_vectors=2, placeholder_token="<toy>",
                initializer_token="object", device="cpu", seed=0)
    base.update(kw)
    return TextualInversionConfig(**base)


@pytest.mark.parametrize("arch", ["sd15", "unclip"])
def test_ti_trains_and_stock_diffusers_loads_it(kit, shape_images, tmp_path, arch):
    from diffusers import DiffusionPipeline
    from PIL import Image

    result = train_textual_inversion(_cfg(kit, shape_images, tmp_path / "ti", arch))
    tensors, _ = read_safetensors(result.weights)
    assert list(tensors) == ["<toy>"] and tensors["<toy>"].shape[0] == 2
    assert result.tokens == ["<toy>", "<toy>_1"]
    config = read_adapter_config(tmp_path / "ti")
    assert config["type"] == "textual_inversion" and config["prompt_text"] == "<toy> <toy>_1"

    pipe = DiffusionPipeline.from_pretrained(str(kit(arch)), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    # The learned vectors moved away from the initializer's embedding.
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.encode("object",
                                                                                  add_special_tokens=False)[0]]
    assert (tensors["<toy>"] - init).abs().max() > 1e-4
    call = dict(prompt="a photo of a <toy>", num_inference_steps=2, output_type="np")
    if arch == "unclip":
        call["image"] = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    else:
        call.update(height=32, width=32)
    pipe.load_textual_inversion(str(tmp_path / "ti"))
    # Multi-vector: diffusers expands the placeholder in prompts to all its tokens.
    assert pipe.maybe_convert_prompt("a photo of a <toy>", pipe.tokenizer) == "a photo of a <toy> <toy>_1"
    with_token = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    plain = pipe(**{**call, "prompt": "a photo of a object"}, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(with_token - plain).max() > 1e-4


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_pivotal_tuning_writes_both_adapters(kit, shape_images, tmp_path, targets):
    from diffusers import DiffusionPipeline

    result = train_textual_inversion(_cfg(kit, shape_images, tmp_path / "piv", pivotal=True, unet_targets=targets,
                                          lora_learning_rate=1e-2))
    lora, _ = read_safetensors(tmp_path / "piv" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)
    assert any(".conv1." in k for k in lora) == (targets == "all")  # LoCon adapts the convolutions too
    assert read_adapter_config(tmp_path / "piv")["lora_weights"] == "pytorch_lora_weights.safetensors"
    assert result.weights.is_file()
    # Stock diffusers loads both files, and the LoRA changes the images.
    pipe = DiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(tmp_path / "piv"))
    call = dict(prompt="a photo of a <toy>", num_inference_steps=2, output_type="np", height=32, width=32)
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "piv"))
    adapted = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(adapted - plain).max() > 1e-4


def test_resumed_run_matches_an_uninterrupted_one(kit, shape_images, tmp_path):
    full = train_textual_inversion(_cfg(kit, shape_images, tmp_path / "full", max_train_steps=6))
    train_textual_inversion(_cfg(kit, shape_images, tmp_path / "res", max_train_steps=4, checkpointing_steps=2))
    resumed = train_textual_inversion(_cfg(kit, shape_images, tmp_path / "res", max_train_steps=6,
                                           checkpointing_steps=2))
    assert resumed.resumed_from == 2
    a, _ = read_safetensors(full.weights)
    b, _ = read_safetensors(resumed.weights)
    assert torch.allclose(a["<toy>"], b["<toy>"], atol=1e-6)


def test_bad_tokens_are_refused(kit, shape_images, tmp_path):
    with pytest.raises(ConfigError, match="not one"):
        train_textual_inversion(_cfg(kit, shape_images, tmp_path / "a", initializer_token="red circle"))
    with pytest.raises(ValueError, match="without spaces"):
        TextualInversionConfig(placeholder_token="two words")


def test_per_class_inversions_feed_synthesis_da_fusion_style(kit, tmp_path):
    from PIL import Image, ImageDraw

    from genaug.artefacts import DatasetWriter, read_dataset
    from genaug.generate.synth import SynthConfig, synthesize

    names = ["red blob", "blue bar"]
    with DatasetWriter(tmp_path / "real", names) as writer:
        for label, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
            for j in range(2):
                im = Image.new("RGB", (32, 32), "white")
                ImageDraw.Draw(im).rectangle([4 + j, 4, 20 + 8 * label, 26], fill=colour)
                writer.add(f"r{label}-{j}", im, label)
    result = train_textual_inversion(_cfg(kit, tmp_path / "real", tmp_path / "ti", per_class=True, max_train_steps=2))
    assert result.classes == {"red blob": {"adapter": "red-blob", "words": "<red-blob> <red-blob>_1"},
                              "blue bar": {"adapter": "blue-bar", "words": "<blue-bar> <blue-bar>_1"}}
    assert read_adapter_config(tmp_path / "ti" / "blue-bar")["config"]["instance_class"] == "blue bar"
    synth = synthesize(SynthConfig(model=str(kit("sd15")), real_data=str(tmp_path / "real"), method="img2img",
                                   per_real=1, class_adapters=str(tmp_path / "ti"), output=str(tmp_path / "syn"),
                                   num_inference_steps=2, device="cpu"))
    assert synth.generated == 4
    prompts = {r["class_name"]: r["prompt"] for r in read_dataset(tmp_path / "syn").records}
    assert "<red-blob> <red-blob>_1" in prompts["red blob"] and "<blue-bar> <blue-bar>_1" in prompts["blue bar"]


def _three_class_data(root):
    from PIL import Image, ImageDraw

    from genaug.artefacts import DatasetWriter

    with DatasetWriter(root, ["red blob", "blue bar", "green dot"]) as writer:
        for label, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30)]):
            for j in range(2 + label):  # classes of different sizes draw different image indices
                im = Image.new("RGB", (32, 32), "white")
                ImageDraw.Draw(im).ellipse([4 + j, 4, 14 + 6 * label, 26], fill=colour)
                writer.add(f"r{label}-{j}", im, label)
    return root


def test_classes_trained_together_equal_classes_trained_alone(kit, tmp_path):
    data = _three_class_data(tmp_path / "real")
    common = dict(per_class=True, max_train_steps=6, placeholder_token="<unused>")
    alone = train_textual_inversion(_cfg(kit, data, tmp_path / "alone", class_batch=1, **common))
    grouped = train_textual_inversion(_cfg(kit, data, tmp_path / "grouped", class_batch=2, **common))
    assert grouped.classes == alone.classes
    moved = []
    for name, entry in alone.classes.items():
        token = entry["words"].split()[0]
        a, _ = read_safetensors(tmp_path / "alone" / entry["adapter"] / "learned_embeds.safetensors")
        b, _ = read_safetensors(tmp_path / "grouped" / entry["adapter"] / "learned_embeds.safetensors")
        # Same draws, own loss, own Adam moments: only float rounding of the larger batch differs.
        assert torch.allclose(a[token], b[token], atol=1e-5), (name, (a[token] - b[token]).abs().max())
        config = read_adapter_config(tmp_path / "grouped" / entry["adapter"])
        assert config["config"]["instance_class"] == name and config["prompt_text"] == entry["words"]
        assert (tmp_path / "grouped" / entry["adapter"] / "run" / "metrics.json").is_file()
        moved.append(a[token])
    assert (moved[0] - moved[1]).abs().max() > 1e-3  # each class learned its own vectors


def test_a_resumed_class_group_matches_an_uninterrupted_one(kit, tmp_path):
    data = _three_class_data(tmp_path / "real")
    common = dict(per_class=True, class_batch=3, checkpointing_steps=2)
    train_textual_inversion(_cfg(kit, data, tmp_path / "full", max_train_steps=6, **common))
    # A run stopped after step 4 keeps its step-2 checkpoint; drop the adapters it wrote and go on to 6.
    train_textual_inversion(_cfg(kit, data, tmp_path / "res", max_train_steps=4, **common))
    assert [p.name for p in (tmp_path / "res" / "checkpoints").glob("classes-*/step-*")] == ["step-0000002"]
    for adapter in ("red-blob", "blue-bar", "green-dot"):
        (tmp_path / "res" / adapter / "adapter_config.json").unlink()
    train_textual_inversion(_cfg(kit, data, tmp_path / "res", max_train_steps=6, **common))
    for adapter, token in (("red-blob", "<red-blob>"), ("green-dot", "<green-dot>")):
        a, _ = read_safetensors(tmp_path / "full" / adapter / "learned_embeds.safetensors")
        b, _ = read_safetensors(tmp_path / "res" / adapter / "learned_embeds.safetensors")
        assert torch.allclose(a[token], b[token], atol=1e-6)
