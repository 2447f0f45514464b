"""merge-lora: the linear merge is exact (equals loading both adapters), ZipLoRA learns and loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from genaug.artefacts import read_safetensors
from genaug.personalize.lora import LoraTrainConfig, train_lora
from genaug.personalize.merge import DOWN, UP, MergeLoraConfig, merge_lora


@pytest.fixture(scope="module")
def two_loras(kit, tmp_path_factory):
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("merge")
    folders = []
    for i, colour in enumerate([(220, 30, 30), (30, 60, 220)]):
        data = root / f"data{i}"
        data.mkdir()
        for j in range(3):
            im = Image.new("RGB", (32, 32), (255, 255, 255))
            ImageDraw.Draw(im).rectangle([4 + j, 4, 24, 24 + j], fill=colour)
            im.save(data / f"{j}.png")
        out = root / f"lora{i}"
        train_lora(LoraTrainConfig(model=str(kit("sd15")), instance_data=str(data), output=str(out),
                                   instance_prompt=f"a photo of sks{i} object", max_train_steps=4,
                                   train_batch_size=2, learning_rate=5e-2, device="cpu", seed=i))
        folders.append(out)
    return folders


def test_linear_merge_equals_loading_both_adapters(kit, two_loras, tmp_path):
    result = merge_lora(MergeLoraConfig(adapters=[str(f) for f in two_loras], weights=[0.5, 1.0],
                                        output=str(tmp_path / "merged")))
    merged, _ = read_safetensors(result.weights)
    a, _ = read_safetensors(two_loras[0] / "pytorch_lora_weights.safetensors")
    b, _ = read_safetensors(two_loras[1] / "pytorch_lora_weights.safetensors")
    layer = next(k[: -len(DOWN)] for k in a if k.endswith(DOWN))
    expected = 0.5 * a[layer + UP] @ a[layer + DOWN] + b[layer + UP] @ b[layer + DOWN]
    assert torch.allclose(merged[layer + UP] @ merged[layer + DOWN], expected, atol=1e-6)

    call = dict(prompt="a photo of sks0 object", num_inference_steps=2, height=32, width=32, output_type="np")
    both = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    both.set_progress_bar_config(disable=True)
    both.load_lora_weights(str(two_loras[0]), adapter_name="a")
    both.load_lora_weights(str(two_loras[1]), adapter_name="b")
    both.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    one = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    one.set_progress_bar_config(disable=True)
    one.load_lora_weights(str(tmp_path / "merged"))
    x = both(**call, generator=torch.Generator().manual_seed(0)).images
    y = one(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(x - y).max() < 1e-4


def test_ziplora_learns_coefficients_and_loads(kit, two_loras, tmp_path):
    result = merge_lora(MergeLoraConfig(adapters=[str(f) for f in two_loras], method="ziplora",
                                        model=str(kit("sd15")), steps=12, samples_per_adapter=2,
                                        learning_rate=5e-2, output=str(tmp_path / "zip"), device="cpu"))
    assert len(result.history) == 12 and result.history[-1] < result.history[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    pipe.load_lora_weights(str(tmp_path / "zip"))
    linear = merge_lora(MergeLoraConfig(adapters=[str(f) for f in two_loras], output=str(tmp_path / "lin")))
    z, _ = read_safetensors(result.weights)
    lin, _ = read_safetensors(linear.weights)
    assert set(z) == set(lin) and any(not torch.allclose(z[k], lin[k]) for k in z)


def test_merge_needs_loras(two_loras, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        MergeLoraConfig(adapters=[str(two_loras[0])])
    with pytest.raises(ValueError, match="exactly two"):
        MergeLoraConfig(adapters=["a", "b", "c"], method="ziplora")


def test_merge_rejects_a_locon_adapter_in_one_line(kit, two_loras, tmp_path):
    from genaug.errors import ConfigError

    locon = tmp_path / "locon"
    train_lora(LoraTrainConfig(model=str(kit("sd15")), instance_data=str(two_loras[0].parent / "data0"),
                               output=str(locon), unet_targets="all", max_train_steps=1, train_batch_size=2,
                               device="cpu"))
    with pytest.raises(ConfigError, match="attention-only LoRAs") as err:
        merge_lora(MergeLoraConfig(adapters=[str(two_loras[0]), str(locon)], output=str(tmp_path / "merged")))
    assert "\n" not in str(err.value) and not (tmp_path / "merged").exists()


def test_merge_rejects_a_dora_adapter_in_one_line(kit, two_loras, tmp_path):
    from genaug.errors import ConfigError

    dora = tmp_path / "dora"
    train_lora(LoraTrainConfig(model=str(kit("sd15")), instance_data=str(two_loras[0].parent / "data0"),
                               output=str(dora), use_dora=True, max_train_steps=1, train_batch_size=2, device="cpu"))
    with pytest.raises(ConfigError, match="this one is DoRA") as err:
        merge_lora(MergeLoraConfig(adapters=[str(two_loras[0]), str(dora)], output=str(tmp_path / "merged")))
    assert "\n" not in str(err.value) and not (tmp_path / "merged").exists()
