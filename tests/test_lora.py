import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from genaug.artefacts import read_adapter_config, read_safetensors
from genaug.personalize.adapters import load_lora
from genaug.personalize.lora import LoraTrainConfig, train_lora


def _cfg(kit, data, out, **kw):
    base = dict(model=str(kit("sd15")), instance_data=str(data), output=str(out), max_train_steps=6,
                train_batch_size=2, learning_rate=1e-2, device="cpu", seed=0)
    base.update(kw)
    return LoraTrainConfig(**base)


def test_lora_trains_saves_and_stock_diffusers_loads_it(kit, shape_images, tmp_path):
    result = train_lora(_cfg(kit, shape_images, tmp_path / "lora", kohya_export=True))
    tensors, _ = read_safetensors(result.weights)
    assert tensors and all(k.startswith("unet.") for k in tensors)
    assert any(".to_q." in k for k in tensors) and any("lora" in k for k in tensors)
    config = read_adapter_config(tmp_path / "lora")
    assert config["rank"] == 4 and config["steps"] == 6
    kohya, _ = read_safetensors(tmp_path / "lora" / "kohya_lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".alpha") for k in kohya) and any(k.endswith(".lora_down.weight") for k in kohya)

    pipe = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a photo of sks object", num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4


def test_killed_and_resumed_equals_uninterrupted(kit, shape_images, tmp_path):
    full = train_lora(_cfg(kit, shape_images, tmp_path / "full", max_train_steps=8))
    # "Kill" after step 4: a run that stops there, leaving its checkpoint, then a resume to 8.
    train_lora(_cfg(kit, shape_images, tmp_path / "resumed", max_train_steps=5, checkpointing_steps=4))
    resumed = train_lora(_cfg(kit, shape_images, tmp_path / "resumed", max_train_steps=8, checkpointing_steps=4))
    assert resumed.resumed_from == 4
    a, _ = read_safetensors(full.weights)
    b, _ = read_safetensors(resumed.weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_prior_preservation_draws_class_images(kit, shape_images, tmp_path):
    result = train_lora(_cfg(kit, shape_images, tmp_path / "pp", with_prior_preservation=True, num_class_images=3,
                             class_prompt="a photo of a circle", max_train_steps=2))
    assert (tmp_path / "pp" / "class_images" / "train" / "metadata.jsonl").is_file()
    assert result.steps == 2


def test_missing_instance_data_is_clear(kit, tmp_path):
    from genaug.errors import DataError

    with pytest.raises(DataError, match="not found"):
        train_lora(_cfg(kit, tmp_path / "nothing", tmp_path / "o"))


def test_lora_on_the_unclip_layout_loads_in_stock_diffusers(kit, shape_images, tmp_path):
    """The embedded generator has SD 2.1-unCLIP's layout: LoRA trains on it text-only (null image condition)."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    result = train_lora(_cfg(kit, shape_images, tmp_path / "lora", model=str(kit("unclip")),
                             validation_prompt="a photo of sks object", validation_steps=6,
                             num_validation_images=2))
    assert (tmp_path / "lora" / "validation" / "step-0000006.png").is_file()
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(str(kit("unclip")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    image = np.full((32, 32, 3), 128, np.uint8)
    from PIL import Image

    call = dict(image=Image.fromarray(image), prompt="a photo of sks object", num_inference_steps=2,
                output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4 and result.weights.is_file()


def test_text_encoder_lora_trains_and_loads(kit, shape_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = train_lora(_cfg(kit, shape_images, tmp_path / "te", train_text_encoder=True, max_train_steps=3))
    tensors, _ = read_safetensors(result.weights)
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    pipe = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    pipe.load_lora_weights(str(tmp_path / "te"))
    assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())


def test_locon_adapter_on_every_unet_layer_loads_whole_in_stock_diffusers(kit, shape_images, tmp_path):
    # unet_targets="all" adapts the convolutions too. Every layer in the file must come back on load:
    # keys half-converted to the classic names would be dropped with only a warning.
    result = train_lora(_cfg(kit, shape_images, tmp_path / "lora", unet_targets="all", max_train_steps=3,
                             kohya_export=True))
    tensors, _ = read_safetensors(result.weights)
    layers = {k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}
    assert len(layers) == len(tensors) // 2
    assert any(k.endswith("resnets.0.conv1") for k in layers) and any(k.endswith("attn2.to_k") for k in layers)
    assert read_adapter_config(tmp_path / "lora")["unet_target_modules"][-1] == "conv_out"
    kohya, _ = read_safetensors(tmp_path / "lora" / "kohya_lora.safetensors")
    assert any("_resnets_0_conv1.lora_down.weight" in k for k in kohya) and all(k.startswith("lora_unet_") for k in kohya)

    pipe = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a photo of sks object", num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = {name for name, module in pipe.unet.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    assert {layer.removeprefix("unet.") for layer in layers} == loaded
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() > 1e-4
    with pytest.raises(ValueError, match="unet_targets must be one of"):
        _cfg(kit, shape_images, tmp_path / "x", unet_targets="convs")


def test_dora_adapter_loads_with_its_magnitudes_in_stock_diffusers(kit, shape_images, tmp_path):
    # DoRA learns a magnitude per output channel beside the low-rank direction; stock diffusers must
    # restore both, or it draws with a plain LoRA.
    result = train_lora(_cfg(kit, shape_images, tmp_path / "dora", unet_targets="all", use_dora=True,
                             max_train_steps=3))
    tensors, _ = read_safetensors(result.weights)
    magnitudes = {k.removesuffix(".lora_magnitude_vector"): v for k, v in tensors.items()
                  if k.endswith(".lora_magnitude_vector")}
    assert magnitudes and len(magnitudes) == sum(".lora_A." in k for k in tensors)

    for loader in ("stock", "genaug"):  # genaug's own loader hands diffusers a bare state dict
        pipe = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
        if loader == "stock":
            pipe.load_lora_weights(str(tmp_path / "dora"), adapter_name="dora")
        else:
            load_lora(pipe, tmp_path / "dora", read_adapter_config(tmp_path / "dora"), "dora")
        loaded = {f"unet.{name}": module.lora_magnitude_vector["dora"].weight
                  for name, module in pipe.unet.named_modules()
                  if hasattr(module, "lora_magnitude_vector") and "dora" in module.lora_magnitude_vector}
        assert loaded.keys() == magnitudes.keys(), loader
        for name, value in magnitudes.items():
            torch.testing.assert_close(loaded[name], value)
    with pytest.raises(ValueError, match="use_dora works on the UNet alone"):
        _cfg(kit, shape_images, tmp_path / "x", use_dora=True, kohya_export=True)


def test_masked_loss_sees_only_the_mask():
    from genaug.personalize.lora import masked_mse

    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:7] = 1
    masked_mse(pred, target, mask).backward()
    assert pred.grad[:, :, mask[0, 0] == 0].abs().max() == 0 and pred.grad[:, :, 2:5, 3:7].abs().min() > 0
    full = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(masked_mse(pred, target, full), torch.nn.functional.mse_loss(pred, target))


def _write_masks(folder, boxes):
    from PIL import Image, ImageDraw

    folder.mkdir()
    for i, box in enumerate(boxes):
        im = Image.new("L", (32, 32), 0)
        ImageDraw.Draw(im).rectangle(box, fill=255)
        im.save(folder / f"{i}.png")
    return folder


def test_instance_masks_restrict_the_loss_to_the_concept(kit, shape_images, tmp_path):
    from genaug.errors import DataError

    plain = train_lora(_cfg(kit, shape_images, tmp_path / "plain"))
    whole = _write_masks(tmp_path / "whole", [(0, 0, 31, 31)] * 4)
    same = train_lora(_cfg(kit, shape_images, tmp_path / "whole-mask", instance_mask_data=str(whole)))
    part = _write_masks(tmp_path / "part", [(4, 4, 20, 20)] * 4)
    masked = train_lora(_cfg(kit, shape_images, tmp_path / "part-mask", instance_mask_data=str(part)))
    a, _ = read_safetensors(plain.weights)
    b, _ = read_safetensors(same.weights)
    c, _ = read_safetensors(masked.weights)
    for k in a:  # a mask over the whole frame is the plain loss
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4
    with pytest.raises(DataError, match="3 masks for 4 instance images"):
        train_lora(_cfg(kit, shape_images, tmp_path / "o1",
                        instance_mask_data=str(_write_masks(tmp_path / "three", [(0, 0, 9, 9)] * 3))))
    with pytest.raises(DataError, match="mask 1 is empty"):
        train_lora(_cfg(kit, shape_images, tmp_path / "o2", instance_mask_data=str(
            _write_masks(tmp_path / "empty", [(0, 0, 9, 9), (40, 40, 41, 41), (0, 0, 9, 9), (0, 0, 9, 9)]))))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # refused before writing anything


def test_background_term_holds_the_prediction_outside_the_mask_to_the_base_models(kit, shape_images, tmp_path):
    from genaug.personalize.lora import latent_masks, load_masks

    part = _write_masks(tmp_path / "part", [(4, 4, 20, 20)] * 4)
    pipe = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    torch.manual_seed(0)
    latents = torch.randn(1, pipe.unet.config.in_channels, 8, 8)
    cond = pipe.text_encoder(pipe.tokenizer(["a photo of sks object"], padding="max_length", max_length=
                                            pipe.tokenizer.model_max_length, return_tensors="pt").input_ids)[0]
    outside = 1 - latent_masks(load_masks(str(part), 32, "masks")[:1], (8, 8))
    with torch.no_grad():
        base = pipe.unet(latents, torch.tensor([500]), cond).sample
    drift = {}
    for weight in (0.0, 10.0):
        out = tmp_path / f"w{weight}"
        train_lora(_cfg(kit, shape_images, out, instance_mask_data=str(part), mask_background_weight=weight,
                        max_train_steps=12))
        adapted = StableDiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
        adapted.load_lora_weights(str(out))
        with torch.no_grad():
            pred = adapted.unet(latents, torch.tensor([500]), cond).sample
        drift[weight] = float(((pred - base).abs() * outside).sum() / outside.sum())
    assert drift[10.0] < 0.5 * drift[0.0], drift
    with pytest.raises(ValueError, match="needs instance_mask_data"):
        _cfg(kit, shape_images, tmp_path / "x", mask_background_weight=1.0)


def _captioned(folder, images, captions):
    from PIL import Image

    from genaug.artefacts import DatasetWriter

    with DatasetWriter(folder, ["concept"]) as writer:
        for i, (path, caption) in enumerate(zip(sorted(images.iterdir()), captions)):
            writer.add(f"img-{i}", Image.open(path).convert("RGB"), 0, caption=caption)
    return folder


def test_caption_column_trains_each_image_on_its_own_prompt(kit, shape_images, tmp_path):
    from genaug.errors import DataError

    prompt = "a photo of sks object on red"
    same = _captioned(tmp_path / "same", shape_images, [prompt] * 4)
    by_prompt = train_lora(_cfg(kit, same, tmp_path / "by-prompt", instance_prompt=prompt))
    by_caption = train_lora(_cfg(kit, same, tmp_path / "by-caption", caption_column="caption"))
    mixed = _captioned(tmp_path / "mixed", shape_images,
                       [prompt, "a photo of sks object on blue", "sks object in the sky", "a sks object on grass"])
    by_mixed = train_lora(_cfg(kit, mixed, tmp_path / "by-mixed", caption_column="caption"))
    a, _ = read_safetensors(by_prompt.weights)
    b, _ = read_safetensors(by_caption.weights)
    c, _ = read_safetensors(by_mixed.weights)
    for k in a:  # captions that all say the instance prompt are the instance prompt
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4
    # The text encoder's LoRA trains through each image's own prompt as well.
    assert train_lora(_cfg(kit, mixed, tmp_path / "te", caption_column="caption", train_text_encoder=True,
                           max_train_steps=2)).steps == 2
    with pytest.raises(DataError, match="has no 'caption' caption"):  # a flat folder has no metadata
        train_lora(_cfg(kit, shape_images, tmp_path / "flat", caption_column="caption"))
    assert not (tmp_path / "flat").exists()


def test_class_caption_column_regularizes_on_captioned_images(kit, shape_images, tmp_path):
    from genaug.errors import DataError

    prompt = "a photo of a circle"
    same = _captioned(tmp_path / "same", shape_images, [prompt] * 4)
    common = dict(with_prior_preservation=True, class_data=str(same), num_class_images=4)
    by_prompt = train_lora(_cfg(kit, shape_images, tmp_path / "by-prompt", class_prompt=prompt, **common))
    by_caption = train_lora(_cfg(kit, shape_images, tmp_path / "by-caption", class_caption_column="caption", **common))
    mixed = _captioned(tmp_path / "mixed", shape_images, [prompt, "a red circle on grass", "a circle in the sky", "x"])
    by_mixed = train_lora(_cfg(kit, shape_images, tmp_path / "by-mixed", class_caption_column="caption",
                               **{**common, "class_data": str(mixed)}))
    a, _ = read_safetensors(by_prompt.weights)
    b, _ = read_safetensors(by_caption.weights)
    c, _ = read_safetensors(by_mixed.weights)
    for k in a:  # class captions that all read the class prompt are the class prompt
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4
    with pytest.raises(DataError, match="4 class images, 6 asked for"):  # captioned class images are never drawn
        train_lora(_cfg(kit, shape_images, tmp_path / "few", class_caption_column="caption",
                        **{**common, "num_class_images": 6}))
    with pytest.raises(ValueError, match="needs with_prior_preservation and class_data"):
        _cfg(kit, shape_images, tmp_path / "x", class_caption_column="caption", with_prior_preservation=True)


def test_composites_keep_the_concept_and_take_the_scene_from_the_backgrounds():
    from genaug.personalize.lora import composite_on_backgrounds

    g = torch.Generator().manual_seed(0)
    instance, backgrounds = torch.rand(2, 3, 8, 8, generator=g), torch.rand(5, 3, 8, 8, generator=g)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 1:5] = 1
    composites, picks = composite_on_backgrounds(instance, masks, backgrounds, 3, seed=0)
    assert composites.shape == (6, 3, 8, 8) and picks.shape == (6,)
    for j in range(6):
        inside = masks[j // 3].bool().expand(3, -1, -1)
        assert torch.equal(composites[j][inside], instance[j // 3][inside])
        assert torch.equal(composites[j][~inside], backgrounds[picks[j]][~inside])
    assert all(len(set(picks[i * 3:(i + 1) * 3].tolist())) == 3 for i in range(2))  # distinct while there are enough
    again, same_picks = composite_on_backgrounds(instance, masks, backgrounds, 3, seed=0)
    assert torch.equal(again, composites) and torch.equal(same_picks, picks)
    _, more = composite_on_backgrounds(instance, masks, backgrounds, 7, seed=0)  # more than there are: repeats
    assert more.shape == (14,) and int(more.max()) < 5


def _backgrounds(folder, colours, phrases):
    from PIL import Image

    from genaug.artefacts import DatasetWriter

    with DatasetWriter(folder, ["background"]) as writer:
        for i, (colour, phrase) in enumerate(zip(colours, phrases)):
            writer.add(f"bg-{i}", Image.new("RGB", (32, 32), colour), 0, caption=phrase)
    return folder


def test_background_data_trains_on_composites_named_by_their_scenes(kit, shape_images, tmp_path):
    from genaug.errors import DataError
    from genaug.personalize.lora import _add_composites, _load_images, load_masks

    part = _write_masks(tmp_path / "part", [(4, 4, 20, 20)] * 4)
    scenes = _backgrounds(tmp_path / "scenes", [(200, 180, 120), (40, 90, 170), (90, 90, 90)],
                          ["on sand", "on water", "against a wall"])
    cfg = _cfg(kit, shape_images, tmp_path / "bg", instance_mask_data=str(part), background_data=str(scenes),
               background_caption_column="caption", backgrounds_per_image=2, max_train_steps=4)
    instance, masks = _load_images(str(shape_images), None, 32, "i"), load_masks(str(part), 32, "m")
    pixels, prompts = _add_composites(cfg, instance, [cfg.instance_prompt] * 4, masks, 32)
    assert pixels.shape[0] == 4 * 3 and torch.equal(pixels[:4], instance)  # the originals, then 2 composites each
    assert prompts[:4] == [cfg.instance_prompt] * 4
    head = cfg.instance_prompt + " "
    assert all(p.startswith(head) and p[len(head):] in ("on sand", "on water", "against a wall") for p in prompts[4:])
    with_scenes = train_lora(cfg)
    masked = train_lora(_cfg(kit, shape_images, tmp_path / "masked", instance_mask_data=str(part), max_train_steps=4))
    a, _ = read_safetensors(with_scenes.weights)
    b, _ = read_safetensors(masked.weights)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4
    assert read_adapter_config(tmp_path / "bg")["config"]["background_data"] == str(scenes)

    with pytest.raises(ValueError, match="background_data needs instance_mask_data"):
        _cfg(kit, shape_images, tmp_path / "x", background_data=str(scenes))
    with pytest.raises(ValueError, match="drop mask_background_weight"):
        _cfg(kit, shape_images, tmp_path / "x", instance_mask_data=str(part), background_data=str(scenes),
             mask_background_weight=1.0)
    with pytest.raises(DataError, match="background folder not found"):
        train_lora(_cfg(kit, shape_images, tmp_path / "o1", instance_mask_data=str(part),
                        background_data=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="no 'scene' caption"):
        train_lora(_cfg(kit, shape_images, tmp_path / "o2", instance_mask_data=str(part), background_data=str(scenes),
                        background_caption_column="scene"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # refused before writing anything
