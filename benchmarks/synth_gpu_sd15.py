"""GPU variant of the synthesis benchmark: genaug's batched sampler vs the stock pipeline, SD 1.5 architecture.

Builds the same random-weight SD 1.5-architecture modules as ``../shared/bench/stock_diffusers_sd15.py``
(the real model's compute; nothing downloaded) and, per batch size, times text-to-image with the
stock ``StableDiffusionPipeline`` and with genaug's ``Sampler`` on the same prompt embeddings and
per-image generators, checking that their images agree. Run it beside the stock script on the GPU;
``--tiny`` checks the script on a CPU.

    python benchmarks/synth_gpu_sd15.py --batches 1,8,32 --steps 25
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def sd15_modules(tiny: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if tiny:
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=4, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=1000, max_position_embeddings=77))
        return unet, vae, text, 16, 32
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                                attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, vocab_size=49408, max_position_embeddings=77))
    return unet, vae, text, 512, 768


def main() -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from genaug.generate.sampler import Conditioning, Sampler

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", default="1,8,32")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    unet, vae, text, res, dim = sd15_modules(a.tiny)
    unet, vae, text = (m.to(dev, dtype) for m in (unet, vae, text))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sampler = Sampler(pipe)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for b in [int(s) for s in a.batches.split(",")]:
        pe = torch.randn(b, 77, dim, device=dev, dtype=dtype)
        ne = torch.randn(b, 77, dim, device=dev, dtype=dtype)
        seeds = list(range(b))
        times = {}
        images = {}
        for name in ("stock", "genaug"):
            for rep in range(2):  # warm-up, then timed
                sync()
                t0 = time.perf_counter()
                generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
                if name == "stock":
                    out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=a.steps,
                               guidance_scale=7.5, height=res, width=res, generator=generators,
                               output_type="np").images
                    out = np.round(out * 255).astype(np.uint8)
                else:
                    out = sampler.sample(Conditioning(pe, ne), generators, size=res, num_steps=a.steps,
                                         guidance_scale=7.5)
                sync()
                times[name] = time.perf_counter() - t0
                images[name] = out
        diff = int(np.abs(images["stock"].astype(int) - images["genaug"].astype(int)).max())
        print(json.dumps({"figure": "t2i", "device": dev, "batch": b, "steps": a.steps, "res": res,
                          "stock_images_per_s": round(b / times["stock"], 3),
                          "genaug_images_per_s": round(b / times["genaug"], 3),
                          "ratio": round(times["stock"] / times["genaug"], 3), "max_pixel_difference": diff}),
              flush=True)


if __name__ == "__main__":
    main()
