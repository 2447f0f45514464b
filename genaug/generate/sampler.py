"""One batched DDIM sampler over diffusers components, shared by every synthesis method.

Stock pipelines take one strength, one guidance scale and one kind of conditioning per call.
Synthesis wants more in one batch: each image has its own seed, its own img2img strength
(DA-Fusion draws it at random), and — on unCLIP-style models — its own image embedding or
none. This sampler runs the UNet of an SD-family or unCLIP-family pipeline directly:

* per-item generators: image ``i`` depends only on its own seed, never on its batch-mates;
* per-item strength: an item joins the denoising loop at its own start step (SDEdit), and the
  UNet runs only on the items already active;
* unCLIP conditioning: the noise-augmented CLIP image embedding enters through the UNet's class
  embedding; the null condition is all zeros, as in ``StableUnCLIPImg2ImgPipeline``'s
  classifier-free guidance, which makes text-only sampling of unCLIP models possible;
* delayed adapters (FastComposer's delayed subject conditioning): the first steps run the base UNet on a
  prompt without the concept, then the adapters join;
* optionally the UNet as a TorchScript trace (``traced_unet``): the same aten ops, without diffusers' Python
  around each of them.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..models.loading import pipeline_family


@dataclass
class Conditioning:
    """Encoded conditions of a batch: positive and negative text, optional class labels (unCLIP)."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    class_labels: torch.Tensor | None = None
    negative_class_labels: torch.Tensor | None = None


@dataclass
class DelayedAdapters:
    """FastComposer's delayed subject conditioning (Xiao et al. 2023), for LoRA and textual-inversion adapters:
    the first ``steps`` denoising steps run the base UNet (its LoRA layers off) on ``cond``, the prompt with the
    class word in place of the concept's words. The early, high-noise steps lay out the scene as the base model
    does; the adapters then draw the concept into it."""

    steps: int
    cond: Conditioning


class PipelineStateLock:
    """Lets several threads draw batches from one pipeline at once (``synth --workers N``).

    A drawing thread holds it (``held``) while it prepares a batch: tokenizers, a text-encoder hook and adapter
    switches are state that the threads share. The sampler lets go of it (``released``) while it denoises and
    decodes, most of a batch's time, which only reads the weights (each batch has its own scheduler). In a thread
    that does not hold it, ``released`` does nothing, so one-thread runs never touch it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._local.held = True
            try:
                yield
            finally:
                self._local.held = False

    @contextmanager
    def released(self) -> Iterator[None]:
        if not getattr(self._local, "held", False):
            yield
            return
        self._local.held = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._local.held = True


PIPELINE_STATE = PipelineStateLock()


_TRACES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_TRACE_LOCK = threading.Lock()


class _UNetCall(torch.nn.Module):
    """The UNet's call as the sampler makes it, in the positional form ``torch.jit.trace`` records."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, text, *class_labels):
        return self.unet(sample, timestep, encoder_hidden_states=text,
                         class_labels=class_labels[0] if class_labels else None, return_dict=False)[0]


def traced_unet(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                labels: torch.Tensor | None):
    """``unet`` as a TorchScript trace for calls shaped like this one, or None where tracing fails (the caller runs
    it eagerly).

    A small UNet on a CPU spends a good share of each call in diffusers' Python between the ops; the trace runs the
    same aten ops (the same outputs, bit for bit) from C++, and without holding the GIL, so sampling threads overlap
    better. One trace per latent shape, text shape, conditioning kind, dtype and device; the batch dimension stays
    free (tests check several sizes), except that diffusers' upsampler changes memory layout from 64 rows on. The
    trace records the UNet as it is, adapters included: callers that switch adapters between calls must not use it.
    """
    key = (tuple(sample.shape[1:]), tuple(text.shape[1:]), labels is None, sample.dtype, sample.device.type,
           sample.shape[0] >= 64)
    with _TRACE_LOCK:  # one trace per key, even when several threads reach it at once
        traces = _TRACES.setdefault(unet, {})
        if key not in traces:
            inputs = (sample, timestep, text) + ((labels,) if labels is not None else ())
            try:
                with warnings.catch_warnings():
                    # diffusers' shape checks (batch size >= 64, output size) run once at trace time; see the key
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    # torch >= 2.9 marks jit.trace deprecated (torch.compile's cold start is 44 s here, the trace's
                    # half a second); should it go, the except below samples eagerly
                    warnings.filterwarnings("ignore", "`torch.jit.trace", FutureWarning)
                    traces[key] = torch.jit.trace(_UNetCall(unet).eval(), inputs, check_trace=False)
            except Exception as exc:  # noqa: BLE001 - an untraceable UNet still samples, eagerly
                warnings.warn(f"the UNet could not be traced ({type(exc).__name__}: {exc}); sampling eagerly",
                              stacklevel=2)
                traces[key] = None
        return traces[key]


class Sampler:
    def __init__(self, pipe):
        from diffusers import DDIMScheduler

        self.pipe = pipe
        self.family = pipeline_family(pipe)
        if self.family not in ("sd", "unclip"):
            raise ValueError(f"the shared sampler runs SD and unCLIP layouts, not {self.family}")
        self.unet, self.vae = pipe.unet, pipe.vae
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        config = dict(pipe.scheduler.config)
        config.update(clip_sample=False, set_alpha_to_one=False)
        self.scheduler = DDIMScheduler.from_config(config)
        self.scaling = self.vae.config.scaling_factor
        # Set by synth (``SynthConfig.trace_unet``), which loads every adapter before it samples and never switches
        # them; a compiled UNet is a graph already.
        self.trace = bool(getattr(pipe, "genaug_trace_unet", False)) and not getattr(self.unet, "genaug_padded_batch",
                                                                                    None)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_text(self, prompts: list[str], negative_prompts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        negative_prompts = negative_prompts or [""] * len(prompts)
        pos, neg = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=negative_prompts)
        return pos, neg

    @property
    def image_embed_dim(self) -> int | None:
        if self.family != "unclip":
            return None
        return int(self.unet.config.projection_class_embeddings_input_dim)

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of the unCLIP model's own image encoder."""
        if not isinstance(images, torch.Tensor):
            images = self.pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
        encoder = self.pipe.image_encoder
        return encoder(images.to(self.device, encoder.dtype)).image_embeds

    @torch.no_grad()
    def class_labels(self, image_embeds: torch.Tensor | None, noise_level: int, generators: list[torch.Generator],
                     batch: int) -> torch.Tensor | None:
        """unCLIP class labels: noise-augmented embeddings + noise-level embedding; zeros when ``image_embeds`` is None."""
        if self.family != "unclip":
            return None
        if image_embeds is None:
            return torch.zeros(batch, self.image_embed_dim, device=self.device, dtype=self.dtype)
        noise = torch.stack([torch.randn(image_embeds.shape[1:], generator=g) for g in generators])
        return self.pipe.noise_image_embeddings(image_embeds.to(self.device, self.dtype), noise_level,
                                                noise=noise.to(self.device, self.dtype))

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Images in [-1, 1] (B,3,H,W) -> scaled latents, sampled from the posterior with each item's generator."""
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(dist.mean)
        return (dist.mean + dist.std * eps) * self.scaling

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling).sample
        images = (images.float().clamp(-1, 1) + 1) * 127.5
        return images.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------ sampling
    # inference_mode, not no_grad: no version counters or view tracking, ~4% less per UNet call on CPU
    # (same outputs); nothing made here reaches autograd, the images leave as numpy.
    @torch.inference_mode()
    def sample(self, cond: Conditioning, generators: list[torch.Generator], *, size: int, num_steps: int,
               guidance_scale: float | torch.Tensor, init_latents: torch.Tensor | None = None,
               strengths: torch.Tensor | None = None, delayed: DelayedAdapters | None = None) -> np.ndarray:
        """Denoise one batch; returns uint8 images (B, H, W, 3)."""
        if delayed is None or delayed.steps == 0:
            with PIPELINE_STATE.released():  # other threads' batches may denoise or be prepared meanwhile
                return self._denoise(cond, generators, size, num_steps, guidance_scale, init_latents, strengths,
                                     None)
        # Delayed adapters keep PIPELINE_STATE: switching the UNet's LoRA changes every thread's UNet.
        self.trace = False  # a trace would keep the LoRA as it was when traced
        try:  # _denoise switches the UNet's LoRA on at step delayed.steps; on again here whatever happens
            self._switch_unet_lora(False)
            return self._denoise(cond, generators, size, num_steps, guidance_scale, init_latents, strengths, delayed)
        finally:
            self._switch_unet_lora(True)

    def _switch_unet_lora(self, on: bool) -> None:
        """peft's switch for every LoRA layer of the UNet; a UNet without LoRA (textual inversion) has none."""
        if not getattr(self.unet, "_hf_peft_config_loaded", False):
            return
        if on:
            self.unet.enable_adapters()
        else:
            self.unet.disable_adapters()

    def _denoise(self, cond: Conditioning, generators: list[torch.Generator], size: int, num_steps: int,
                 guidance_scale: float | torch.Tensor, init_latents: torch.Tensor | None,
                 strengths: torch.Tensor | None, delayed: DelayedAdapters | None) -> np.ndarray:
        batch = len(generators)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (self.unet.config.in_channels, size // factor, size // factor)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)
        self.scheduler.set_timesteps(num_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        # Start index of each item: 0 for text-to-image, later for img2img with strength < 1.
        if init_latents is None:
            start = torch.zeros(batch, dtype=torch.long)
            latents = noise * self.scheduler.init_noise_sigma
        else:
            if strengths is None:
                raise ValueError("img2img sampling needs strengths")
            steps_run = torch.clamp((strengths.float() * num_steps).long(), 0, num_steps)
            start = num_steps - steps_run
            latents = init_latents.to(self.device, self.dtype).clone()
        guidance = torch.as_tensor(guidance_scale, dtype=torch.float32, device=self.device).expand(batch)
        guidance = guidance.view(-1, 1, 1, 1).to(self.dtype)
        adapted = cond
        for k, t in enumerate(timesteps):
            cond = delayed.cond if delayed is not None and k < delayed.steps else adapted
            if delayed is not None and k == delayed.steps:
                self._switch_unet_lora(True)
            joining = (start == k).nonzero().flatten()
            if len(joining) and init_latents is not None:
                j = joining.to(self.device)
                latents[j] = self.scheduler.add_noise(init_latents[j].to(self.device, self.dtype), noise[j],
                                                      t.repeat(len(j)))
            active = (start <= k).nonzero().flatten().to(self.device)
            if len(active) == 0:
                continue
            x = latents[active]
            model_in = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            text = torch.cat([cond.negative_embeds[active], cond.prompt_embeds[active]])
            labels = None
            if cond.class_labels is not None:
                negative = cond.negative_class_labels if cond.negative_class_labels is not None else torch.zeros_like(cond.class_labels)
                labels = torch.cat([negative[active], cond.class_labels[active]])
            pred = self._unet(model_in, t, text, labels)
            uncond, conditional = pred.chunk(2)
            g = guidance[active]
            eps = uncond + g * (conditional - uncond)
            latents[active] = self.scheduler.step(eps, t, x).prev_sample
        return self.decode(latents)

    def _unet(self, model_in: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
              labels: torch.Tensor | None) -> torch.Tensor:
        """One guided UNet call on [unconditional; conditional] rows. A compiled UNet (``compile_unet``) gets
        its rows padded to the next quarter of the batch, so a few static graphs serve every active set."""
        rows = model_in.shape[0] // 2
        full = getattr(self.unet, "genaug_padded_batch", None)
        target = rows
        if full and rows < full:
            quarter = -(-full // 4)
            target = min(full, -(-rows // quarter) * quarter)
        if target == rows:
            traced = traced_unet(self.unet, model_in, t, text, labels) if self.trace else None
            if traced is not None:
                return traced(model_in, t, text, *([labels] if labels is not None else []))
            return self.unet(model_in, t, encoder_hidden_states=text, class_labels=labels).sample

        def pad(x: torch.Tensor) -> torch.Tensor:  # repeat each half's first row; those outputs are dropped
            uncond, cond = x.chunk(2)
            extra = target - rows
            return torch.cat([uncond, uncond[:1].expand(extra, *x.shape[1:]),
                              cond, cond[:1].expand(extra, *x.shape[1:])])

        out = self.unet(pad(model_in), t, encoder_hidden_states=pad(text),
                        class_labels=pad(labels) if labels is not None else None).sample
        uncond, cond = out.chunk(2)
        return torch.cat([uncond[:rows], cond[:rows]])


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(im) for im in images]
