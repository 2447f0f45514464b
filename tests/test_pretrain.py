"""End to end: a tiny world, a tiny model family, its figures and cards, and resume by stage."""

import json

import pytest
import torch

from genaug.models.loading import load_pipeline
from genaug.pretrain.run import PretrainConfig, pretrain
from genaug.world import WorldConfig, build_world

TINY = dict(
    clip={"steps": 3, "batch_size": 16, "vision_width": 32, "text_width": 32, "vision_layers": 1, "text_layers": 1,
          "projection_dim": 16, "warmup_steps": 1},
    generator={"vae_steps": 2, "vae_batch_size": 8, "unet_steps": 3, "unet_batch_size": 8, "unet_channels": [32, 32],
               "vae_channels": [16, 16], "warmup_steps": 1, "checkpoint_every": 2,
               "latent_normalization": "channel",  # the default, as in configs/pretrain_embedded.yaml
               "unet_storage_dtype": "float16"},
    oracle={"epochs": 1, "batch_size": 16, "arch": "genaug_cnn_tiny"},
    holdout=20, eval_images_per_class=1, eval_steps=2, progress=False,
)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    build_world(WorldConfig(output=str(root), pool_size=120, train_max=6, train_min=2, test_per_class=2,
                            val_per_class=2, fewshot_k=[1], fewshot_trials=1, fewshot_candidates=2,
                            oracle_per_class=3, novel_refs=3, novel_pair_images=1, workers=0, progress=False))
    return root


def test_pretrain_tiny_family_end_to_end(tiny_world, tmp_path):
    out = tmp_path / "family"
    result = pretrain(PretrainConfig(world=str(tiny_world), output=str(out), **TINY))
    assert result.stages_run == ["clip", "generator", "oracle", "evaluate"]
    figures = json.loads((out / "figures.json").read_text())
    for key in ("zero_shot_top1_all_classes", "text_to_image_recall_at_10"):
        assert 0.0 <= figures["dual_encoder"][key] <= 1.0
    gen = figures["generator"]
    for key in ("text_oracle_accuracy_drawable", "image_conditioned_class_retention", "fid_vs_test", "kid_vs_test"):
        assert key in gen
    assert (out / "generator" / "MODEL_CARD.md").is_file() and (out / "samples" / "all-classes.png").is_file()
    pipe = load_pipeline(str(out / "generator"), device="cpu")
    assert type(pipe).__name__ == "StableUnCLIPImg2ImgPipeline"
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    # The precision the towers and the oracle actually trained at (bf16 only where native) is on record.
    clip_precision = json.loads((out / "clip" / "genaug_dual_encoder.json").read_text())["result"]["precision"]
    oracle_precision = json.loads((out / "oracle" / "config.json").read_text())["precision"]
    assert {clip_precision, oracle_precision} <= {"float32", "bfloat16"}
    assert f"| training precision | {clip_precision} |" in (out / "clip" / "MODEL_CARD.md").read_text()
    generator_record = json.loads((out / "generator" / "genaug_generator.json").read_text())
    assert generator_record["precision"] in {"float32", "bfloat16"}
    assert generator_record["attention"] == "eager"  # `attention: auto` on the CPU
    assert f"| training precision | {generator_record['precision']} |" in \
        (out / "generator" / "MODEL_CARD.md").read_text()
    assert pipe.vae.config.scaling_factor == 1.0  # channel-normalized latents need no scaling
    assert "| latents | each channel centred" in (out / "generator" / "MODEL_CARD.md").read_text()
    # The UNet's file holds float16 weights (half the bytes), and the pipeline loads them as float32.
    from safetensors import safe_open
    with safe_open(str(out / "generator" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert pipe.unet.dtype == torch.float32
    assert "| UNet weights stored as | float16 " in (out / "generator" / "MODEL_CARD.md").read_text()
    # The shipped UNet keeps diffusers' default processors; eager attention was for training only.
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}

    # A rerun finds every model stage complete and only re-measures.
    again = pretrain(PretrainConfig(world=str(tiny_world), output=str(out), **TINY))
    assert again.stages_run == ["evaluate"]


def test_pretrain_rejects_bad_sub_configs(tiny_world, tmp_path):
    from genaug.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        pretrain(PretrainConfig(world=str(tiny_world), output=str(tmp_path / "x"), clip={"stepz": 1}))
    with pytest.raises(ValueError, match="unknown stage"):
        PretrainConfig(stages=["nope"])


def test_autoencoder_trains_at_any_step_count():
    # OneCycleLR divides by pct_start * total_steps - 1, which the default warmup made 0 at 20 steps.
    import torch

    from genaug.pretrain.data import ImageSplit
    from genaug.pretrain.diffusion import GeneratorConfig, train_vae

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    pool = ImageSplit(images, torch.zeros(8, dtype=torch.long), [""] * 8, ["a"], [{}] * 8)
    for steps, normalization in ((1, "global"), (20, "global"), (20, "channel")):
        cfg = GeneratorConfig(vae_steps=steps, vae_batch_size=2, vae_channels=[8, 8],
                              latent_normalization=normalization)
        vae = train_vae(cfg, pool, progress=False)
        assert torch.isfinite(torch.tensor(vae.config.scaling_factor))
        assert (vae.config.scaling_factor == 1.0) == (normalization == "channel")


def test_unet_eager_attention_computes_what_sdpa_does():
    # The CPU trains the UNet with diffusers' AttnProcessor (faster backward there); same gradients.
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from genaug.pretrain.diffusion import GeneratorConfig, build_unet

    torch.manual_seed(0)
    sdpa = build_unet(GeneratorConfig(unet_channels=[32, 32]), 8, 16, 8)
    eager = build_unet(GeneratorConfig(unet_channels=[32, 32]), 8, 16, 8)
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_processor(AttnProcessor())
    g = torch.Generator().manual_seed(1)
    x, text, labels = (torch.randn(shape, generator=g) for shape in ((3, 4, 8, 8), (3, 5, 16), (3, 16)))
    for unet in (sdpa, eager):
        out = unet(x, torch.tensor([1, 500, 999]), encoder_hidden_states=text, class_labels=labels).sample
        out.square().mean().backward()
    for (name, a), (_, b) in zip(sdpa.named_parameters(), eager.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    with pytest.raises(ValueError, match="attention must be one of"):
        GeneratorConfig(attention="flash")


def test_pooled_text_embedding_conditions_every_block_and_loads_as_a_stock_unet(tmp_path):
    # With the option, the prompt reaches the time embedding: the output still depends on it when every
    # cross-attention layer is silenced; without it, it does not. The saved UNet is a stock diffusers one.
    import torch
    from diffusers import UNet2DConditionModel

    from genaug.pretrain.diffusion import GeneratorConfig, build_unet

    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 16, generator=g)
    prompts = torch.randn(2, 5, 16, generator=g)
    for pooled in (False, True):  # the pooled UNet, last, is the one saved below
        torch.manual_seed(0)
        unet = build_unet(GeneratorConfig(unet_channels=[32, 32], pooled_text_embedding=pooled), 8, 16, 8).eval()
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_out.0"):
                    module.weight.zero_()
                    module.bias.zero_()
            a, b = (unet(x, torch.tensor([500]), encoder_hidden_states=p[None], class_labels=labels).sample
                    for p in prompts)
        assert (not torch.allclose(a, b)) == pooled
    unet.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.addition_embed_type == "text"
    with torch.no_grad():
        args = (x, torch.tensor([500]))
        kwargs = dict(encoder_hidden_states=prompts[:1], class_labels=labels)
        assert torch.equal(unet(*args, **kwargs).sample, reloaded(*args, **kwargs).sample)


def test_unet_stored_in_float16_halves_the_file_and_loads_as_float32(tmp_path):
    from diffusers import UNet2DConditionModel

    from genaug.pretrain.diffusion import GeneratorConfig, build_unet, store_unet

    torch.manual_seed(0)
    unet = build_unet(GeneratorConfig(unet_channels=[32, 32]), 8, 16, 8).eval()
    for dtype in ("float32", "float16"):
        store_unet(unet, tmp_path / dtype, dtype)
    assert unet.dtype == torch.float32  # storing a copy leaves the model as it was
    size = {d: (tmp_path / d / "diffusion_pytorch_model.safetensors").stat().st_size for d in ("float32", "float16")}
    assert 0.45 < size["float16"] / size["float32"] < 0.55
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "float16").eval()
    assert reloaded.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    x, labels, prompt = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 16, generator=g), torch.randn(1, 5, 16)
    with torch.no_grad():
        a, b = (m(x, torch.tensor([500]), encoder_hidden_states=prompt, class_labels=labels).sample
                for m in (unet, reloaded))
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-2)  # float16 rounding, nothing more
    with pytest.raises(ValueError, match="unet_storage_dtype"):
        GeneratorConfig(unet_storage_dtype="bfloat16")


def test_min_snr_loss_weights_each_item_by_min_snr_gamma_over_snr():
    import torch
    import torch.nn.functional as F

    from genaug.pretrain.diffusion import GeneratorConfig, diffusion_loss, noise_schedulers

    scheduler = noise_schedulers()[0]
    g = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 990])  # SNR far above 5, near 1, far below 1
    assert torch.equal(diffusion_loss(pred, noise, t, scheduler), F.mse_loss(pred, noise))
    alphas = scheduler.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    assert snr[0] > 5 > snr[2]
    per_item = (pred - noise).square().mean(dim=(1, 2, 3))
    expected = (per_item * torch.where(snr > 5, 5 / snr, torch.ones_like(snr))).mean()
    assert torch.allclose(diffusion_loss(pred, noise, t, scheduler, snr_gamma=5.0), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        GeneratorConfig(snr_gamma=0)


def test_channel_normalization_centres_the_latents_and_keeps_the_autoencoder():
    # Baked into quant_conv / post_quant_conv: same reconstructions, latents with mean 0 and std 1 per channel.
    import copy

    import torch

    from genaug.pretrain.data import to_unit
    from genaug.pretrain.diffusion import GeneratorConfig, build_vae, encode_latents, normalize_latent_channels

    torch.manual_seed(0)
    vae = build_vae(GeneratorConfig(vae_channels=[8, 8]), 16).eval()
    with torch.no_grad():  # an off-centre latent space, as a trained one has
        vae.quant_conv.bias[:4] += torch.tensor([-1.5, 0.5, 2.0, -0.3])
        vae.quant_conv.weight[:4] *= torch.tensor([0.3, 2.0, 1.0, 0.5])[:, None, None, None]
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    before = copy.deepcopy(vae)
    normalize_latent_channels(vae, images)
    assert vae.config.scaling_factor == 1.0
    latents = encode_latents(vae, images)
    assert torch.allclose(latents.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(latents.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    x = to_unit(images[:8])
    with torch.no_grad():
        old, new = before.encode(x).latent_dist, vae.encode(x).latent_dist
        assert torch.allclose(before.decode(old.mean).sample, vae.decode(new.mean).sample, atol=1e-5)
        # The posterior's spread is scaled with its mean: a sample maps to the same decoded image.
        ratio = (new.std / old.std).mean(dim=(0, 2, 3))
        std = encode_latents(before, images, scaling=1.0).std(dim=(0, 2, 3))
        assert torch.allclose(ratio, 1 / std, rtol=1e-4)
    with pytest.raises(ValueError, match="latent_normalization must be one of"):
        GeneratorConfig(latent_normalization="batch")


def test_zero_terminal_snr_schedules_end_in_pure_noise_and_sample_from_the_last_step():
    import torch

    from genaug.pretrain.diffusion import GeneratorConfig, diffusion_loss, noise_schedulers

    cfg = GeneratorConfig(prediction_type="v_prediction", zero_terminal_snr=True)
    train, sample, _ = noise_schedulers(cfg)
    assert train.alphas_cumprod[-1] < 1e-6 and train.config.prediction_type == "v_prediction"
    sample.set_timesteps(25)
    assert int(sample.timesteps[0]) == 999 and sample.config.prediction_type == "v_prediction"
    default_train, default_sample, _ = noise_schedulers()
    default_sample.set_timesteps(25)
    assert default_train.alphas_cumprod[-1] > 1e-3 and int(default_sample.timesteps[0]) == 961  # SD's, unchanged
    # Min-SNR in its velocity form stays finite where the SNR is 0.
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    loss = diffusion_loss(pred, target, torch.tensor([10, 999]), train, snr_gamma=5.0)
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        GeneratorConfig(prediction_type="sample")
