import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from genaug.generate.sampler import Conditioning, Sampler
from genaug.models.loading import load_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _gens(n=3):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def test_text_to_image_matches_the_stock_pipeline(kit):
    pipe = load_pipeline(str(kit("sd15")), device="cpu")
    stock = pipe(prompt=PROMPTS, num_inference_steps=4, height=32, width=32, generator=_gens(), output_type="np").images
    sampler = Sampler(pipe)
    pos, neg = sampler.encode_text(PROMPTS)
    ours = sampler.sample(Conditioning(pos, neg), _gens(), size=32, num_steps=4, guidance_scale=7.5)
    assert np.abs(ours.astype(int) - (stock * 255).round().astype(int)).max() <= 1


def test_img2img_matches_the_stock_pipeline_and_mixes_strengths(kit):
    pipe = load_pipeline(str(kit("sd15")), device="cpu")
    i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    stock = i2i(prompt=PROMPTS, image=(images + 1) / 2, strength=0.5, num_inference_steps=8, generator=_gens(),
                output_type="np").images
    sampler = Sampler(pipe)
    pos, neg = sampler.encode_text(PROMPTS)
    gens = _gens()
    init = sampler.encode_images(images, gens)
    ours = sampler.sample(Conditioning(pos, neg), gens, size=32, num_steps=8, guidance_scale=7.5, init_latents=init,
                          strengths=torch.tensor([0.5, 0.5, 0.5]))
    assert np.abs(ours.astype(int) - (stock * 255).round().astype(int)).max() <= 1
    # Per-item strengths in one batch equal the same items sampled alone.
    strengths = torch.tensor([0.25, 0.5, 1.0])
    gens = _gens()
    mixed = sampler.sample(Conditioning(pos, neg), gens, size=32, num_steps=8, guidance_scale=7.5,
                           init_latents=sampler.encode_images(images, gens), strengths=strengths)
    for i in range(3):
        g = [torch.Generator().manual_seed(i)]
        alone = sampler.sample(Conditioning(pos[i : i + 1], neg[i : i + 1]), g, size=32, num_steps=8,
                               guidance_scale=7.5, init_latents=sampler.encode_images(images[i : i + 1], g),
                               strengths=strengths[i : i + 1])
        assert np.abs(alone.astype(int) - mixed[i : i + 1].astype(int)).max() <= 2


def test_unclip_text_only_and_image_conditioned(kit):
    pipe = load_pipeline(str(kit("unclip")), device="cpu")
    sampler = Sampler(pipe)
    pos, neg = sampler.encode_text(PROMPTS)
    null = sampler.class_labels(None, 0, _gens(), 3)
    assert torch.count_nonzero(null) == 0
    text_only = sampler.sample(Conditioning(pos, neg, null), _gens(), size=32, num_steps=2, guidance_scale=3.0)
    embeds = sampler.image_embeddings([Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")])
    labels = sampler.class_labels(embeds, 0, _gens(), 3)
    with_image = sampler.sample(Conditioning(pos, neg, labels), _gens(), size=32, num_steps=2, guidance_scale=3.0)
    assert text_only.shape == with_image.shape == (3, 32, 32, 3)
    assert np.abs(text_only.astype(int) - with_image.astype(int)).max() > 0
