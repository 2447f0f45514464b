import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from genaug.models.loading import load_pipeline, pipeline_family
from genaug.models.tokenizer import build_clip_tokenizer


def test_tokenizer_matches_open_clip(tmp_path):
    import open_clip

    tok = build_clip_tokenizer(tmp_path / "tok")
    text = "a photo of a red striped triangle, dim light!"
    ids = tok(text).input_ids
    ref = open_clip.tokenize([text])[0]
    assert ids == ref[: len(ids)].tolist()
    assert len(tok) == 49408


@pytest.mark.parametrize("arch,cls,family", [
    ("sd15", "StableDiffusionPipeline", "sd"),
    ("unclip", "StableUnCLIPImg2ImgPipeline", "unclip"),
    ("sdxl", "StableDiffusionXLPipeline", "sdxl"),
])
def test_kit_arch_saves_loads_and_generates(kit, arch, cls, family):
    path = kit(arch)
    assert (path / "model_index.json").is_file()
    assert not list(path.rglob("*.bin")), "weights must be safetensors"
    pipe = load_pipeline(str(path), device="cpu")
    assert type(pipe).__name__ == cls and pipeline_family(pipe) == family
    kwargs = dict(prompt=["a red circle", "a blue square"], num_inference_steps=2, height=32, width=32,
                  output_type="np", generator=[torch.Generator().manual_seed(i) for i in range(2)])
    if arch == "unclip":
        kwargs["image"] = Image.new("RGB", (32, 32), (200, 10, 10))
    images = pipe(**kwargs).images
    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all()
    # Seeded: the same call gives the same pixels.
    kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    np.testing.assert_allclose(pipe(**kwargs).images, images, atol=1e-6)


def test_kit_folder_is_plain_from_pretrained(kit):
    pipe = DiffusionPipeline.from_pretrained(str(kit("sd15")), use_safetensors=True)
    assert pipe.tokenizer("a photo").input_ids[0] == 49406


def test_kit_clip_dual_encoder(kit):
    from transformers import CLIPModel, CLIPTokenizer

    path = kit("clip")
    model = CLIPModel.from_pretrained(str(path))
    tok = CLIPTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        text = model.get_text_features(**tok(["a red circle"], return_tensors="pt", padding=True))
        image = model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
    text = getattr(text, "pooler_output", text)
    image = getattr(image, "pooler_output", image)
    assert text.shape[-1] == image.shape[-1] == 32
