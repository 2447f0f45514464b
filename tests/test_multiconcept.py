"""DisenDiff multi-concept training: attention capture is exact, the calibration terms behave, adapters load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from genaug.personalize.multiconcept import (CrossAttentionStore, MultiConceptConfig, calibration_losses,
                                             install_attention_store, load_multiconcept, soft_iou,
                                             train_multiconcept)


@pytest.fixture
def pair_image(tmp_path):
    folder = tmp_path / "pair"
    folder.mkdir()
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.ellipse([2, 8, 14, 20], fill=(220, 30, 30))
    d.rectangle([18, 8, 30, 20], fill=(30, 60, 220))
    im.save(folder / "pair.png")
    return folder


def test_storing_processor_changes_nothing_and_captures_cross_attention(kit):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(kit("sd15")), subfolder="unet").eval()
    x = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        unet.set_default_attn_processor()
        reference = unet(x, 10, text).sample
        store = install_attention_store(unet)
        captured = unet(x, 10, text).sample
    assert torch.allclose(reference, captured, atol=1e-5)
    assert store.maps and all(m.shape[0] == 2 and m.shape[-1] == 77 for ms in store.maps.values() for m in ms)
    first = next(iter(store.maps.values()))[0]
    assert torch.allclose(first.sum(-1), torch.ones_like(first.sum(-1)), atol=1e-4)  # softmax over tokens


def test_calibration_terms_reward_binding_and_separation():
    store = CrossAttentionStore()
    maps = torch.zeros(1, 4, 4, 8)
    left, right = torch.zeros(4, 4), torch.zeros(4, 4)
    left[:, :2], right[:, 2:] = 1.0, 1.0
    maps[0, :, :, 1], maps[0, :, :, 2] = left, left     # <new1> and its class word: same place
    maps[0, :, :, 4], maps[0, :, :, 5] = right, right   # <new2> and its class word: another place
    store.maps[4] = [maps]
    ids = torch.tensor([[0, 100, 7, 3, 101, 7, 0, 0]])
    good = calibration_losses(store, ids, [100, 101], 4, smooth=False)
    assert good.bind < 0.05 and good.separate < 0.1
    maps[0, :, :, 5] = left                             # both class words on the same place
    maps[0, :, :, 1] = right                            # and <new1> looking away from its class word
    bad = calibration_losses(store, ids, [100, 101], 4, smooth=False)
    assert bad.bind > good.bind + 0.4 and bad.separate > good.separate + 0.5
    assert calibration_losses(store, torch.tensor([[0, 5, 6, 7, 0, 0, 0, 0]]), [100, 101], 4) is None
    assert soft_iou(left, left) == pytest.approx(1.0)


@pytest.mark.parametrize("arch,kv", [("sd15", "full"), ("unclip", "lora")])
def test_trains_writes_and_loads_in_stock_diffusers(kit, pair_image, tmp_path, arch, kv):
    from diffusers import DiffusionPipeline

    cfg = MultiConceptConfig(model=str(kit(arch)), instance_data=str(pair_image), class_words=["circle", "square"],
                             prompt_template="a {0} beside a {1}", max_train_steps=4, train_batch_size=2, kv=kv,
                             attention_loss_weight=1.0, learning_rate=1e-2, output=str(tmp_path / "mc"),
                             device="cpu")
    result = train_multiconcept(cfg)
    assert result.prompt == "a <new1> circle beside a <new2> square"
    assert all("bind" in h for h in result.history if h)  # the attention terms were computed
    pipe = DiffusionPipeline.from_pretrained(str(kit(arch)), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=result.prompt, num_inference_steps=2, output_type="np")
    if arch == "unclip":
        call["image"] = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    else:
        call.update(height=32, width=32)
    before = pipe(**{**call, "prompt": "a circle beside a square"}, generator=torch.Generator().manual_seed(0)).images
    assert load_multiconcept(pipe, tmp_path / "mc") == ["<new1>", "<new2>"]
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4


def test_ablation_flags_remove_the_attention_terms(kit, pair_image, tmp_path):
    common = dict(model=str(kit("sd15")), instance_data=str(pair_image), class_words=["circle", "square"],
                  prompt_template="a {0} beside a {1}", max_train_steps=2, train_batch_size=2, device="cpu",
                  single_prompt_prob=0.0, attention_loss_weight=1.0)
    off = train_multiconcept(MultiConceptConfig(output=str(tmp_path / "off"), bind_loss=False, separate_loss=False,
                                                **common))
    on = train_multiconcept(MultiConceptConfig(output=str(tmp_path / "on"), **common))
    # Same seeds: the first step's diffusion loss is equal; the total differs only by the attention terms.
    assert off.history[0]["diffusion"] == on.history[0]["diffusion"]
    with pytest.raises(ValueError, match="at least two"):
        MultiConceptConfig(class_words=["circle"])


def test_concept_masks_restrict_the_diffusion_loss(kit, pair_image, tmp_path):
    from genaug.errors import DataError

    def masks(name, boxes):
        folder = tmp_path / name
        folder.mkdir()
        for i, box in enumerate(boxes):
            im = Image.new("L", (32, 32), 0)
            ImageDraw.Draw(im).rectangle(box, fill=255)
            im.save(folder / f"{i}.png")
        return str(folder)

    common = dict(model=str(kit("sd15")), instance_data=str(pair_image), class_words=["circle", "square"],
                  prompt_template="a {0} beside a {1}", max_train_steps=2, train_batch_size=2, device="cpu",
                  bind_loss=False, separate_loss=False)
    plain = train_multiconcept(MultiConceptConfig(output=str(tmp_path / "plain"), **common))
    whole = train_multiconcept(MultiConceptConfig(output=str(tmp_path / "whole"), **common,
                                                  mask_data=masks("m-whole", [(0, 0, 31, 31), (0, 0, 3, 3)])))
    part = train_multiconcept(MultiConceptConfig(output=str(tmp_path / "part"), **common,
                                                 mask_data=masks("m-part", [(2, 8, 14, 20), (18, 8, 30, 20)])))
    # A union covering the frame is the plain loss; the two objects' masks leave the background out.
    assert abs(whole.history[0]["diffusion"] - plain.history[0]["diffusion"]) < 1e-6
    assert abs(part.history[0]["diffusion"] - plain.history[0]["diffusion"]) > 1e-4
    with pytest.raises(DataError, match="1 masks for 2 concepts"):
        train_multiconcept(MultiConceptConfig(output=str(tmp_path / "o"), **common,
                                              mask_data=masks("m-one", [(0, 0, 9, 9)])))
