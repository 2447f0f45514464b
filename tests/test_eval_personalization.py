"""eval-personalization: adapters load (LoRA, TI, both), samples are scored against references and base."""

from __future__ import annotations

import json

import pytest

from genaug.errors import ConfigError
from genaug.personalize.evaluate import EvalPersonalizationConfig, evaluate_personalization
from genaug.personalize.lora import LoraTrainConfig, train_lora
from genaug.personalize.textual_inversion import TextualInversionConfig, train_textual_inversion
from genaug.pretrain.oracle import OracleConfig, train_oracle
from test_pretrain_clip import toy_split


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    train_oracle(OracleConfig(arch="genaug_cnn_tiny", epochs=1, batch_size=16, progress=False),
                 toy_split(per_class=4, seed=0), toy_split(per_class=1, seed=1), out)
    return out


def test_scores_lora_and_ti_against_the_base(kit, shape_images, oracle_dir, tmp_path):
    common = dict(model=str(kit("sd15")), instance_data=str(shape_images), max_train_steps=3, train_batch_size=2,
                  device="cpu")
    train_lora(LoraTrainConfig(output=str(tmp_path / "lora"), instance_prompt="a photo of sks object", **common))
    train_textual_inversion(TextualInversionConfig(output=str(tmp_path / "ti"), placeholder_token="<toy>",
                                                   num_vectors=2, **common))
    cfg = EvalPersonalizationConfig(model=str(kit("sd15")), adapters=[str(tmp_path / "lora"), str(tmp_path / "ti")],
                                    adapter_weights=[0.8, 1.0], references=str(shape_images),
                                    prompts=["a photo of <toy> sks", "a <toy> sks on the beach"],
                                    placeholder="<toy> sks", class_word="object", oracle_class="large red square",
                                    clip_model=str(kit("clip")), oracle=str(oracle_dir), images_per_prompt=2,
                                    num_inference_steps=2, output=str(tmp_path / "report"), device="cpu")
    result = evaluate_personalization(cfg)
    assert set(result.scores) == {"adapted", "base"}
    for scores in result.scores.values():
        assert -1 <= scores["clip_i"] <= 1 and -1 <= scores["clip_t"] <= 1 and 0 <= scores["oracle_accuracy"] <= 1
        assert len(scores["per_prompt_oracle_accuracy"]) == 2
        per_prompt = scores["per_prompt_clip_t"]  # keyed by the prompt CLIP-T reads, the class word in place
        assert list(per_prompt) == ["a photo of object", "a object on the beach"]
        assert abs(sum(per_prompt.values()) / 2 - scores["clip_t"]) < 2e-4  # equal samples per prompt
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["scores"] == result.scores
    assert (tmp_path / "report" / "samples-adapted.png").is_file() and (tmp_path / "report" / "report.md").is_file()
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| prompt | CLIP-T adapted | CLIP-T base | oracle acc. adapted | oracle acc. base |" in markdown
    adapted, base = result.scores["adapted"], result.scores["base"]
    row = [adapted["per_prompt_clip_t"]["a object on the beach"], base["per_prompt_clip_t"]["a object on the beach"],
           adapted["per_prompt_oracle_accuracy"]["a <toy> sks on the beach"],
           base["per_prompt_oracle_accuracy"]["a object on the beach"]]
    assert "| a <toy> sks on the beach | " + " | ".join(map(str, row)) + " |" in markdown
    # The adapters change the samples (same seeds, different pictures).
    assert (tmp_path / "report" / "samples-adapted.png").read_bytes() != \
        (tmp_path / "report" / "samples-base.png").read_bytes()


def test_bad_requests_fail_clearly(kit, shape_images, oracle_dir, tmp_path):
    with pytest.raises(ValueError, match="one adapter weight per adapter"):
        EvalPersonalizationConfig(prompts=["x"], adapters=["a", "b"], adapter_weights=[1.0])
    with pytest.raises(ConfigError, match="no class"):
        evaluate_personalization(EvalPersonalizationConfig(
            model=str(kit("sd15")), references=str(shape_images), prompts=["x"], oracle_class="unicorn",
            clip_model=str(kit("clip")), oracle=str(oracle_dir), output=str(tmp_path / "r"), device="cpu"))


def test_delayed_adapters_start_from_the_base_models_layout(kit, shape_images, tmp_path):
    """FastComposer's delayed subject conditioning: the first steps are the base model's on the class-word prompt."""
    import torch

    from genaug.models.loading import load_pipeline
    from genaug.personalize.evaluate import load_adapters, sample_prompts

    train_lora(LoraTrainConfig(model=str(kit("sd15")), instance_data=str(shape_images), output=str(tmp_path / "lora"),
                               instance_prompt="a photo of sks object", max_train_steps=3, train_batch_size=2,
                               learning_rate=1e-2, train_text_encoder=True, device="cpu"))
    adapted, plain = ["a sks object on the beach"], ["a object on the beach"]

    def draw(pipe, prompts, start, early=None):
        cfg = EvalPersonalizationConfig(prompts=prompts, placeholder="sks object", class_word="object",
                                        adapter_start=start, num_inference_steps=4, device="cpu")
        return sample_prompts(pipe, prompts, 2, cfg, early)

    base = draw(load_pipeline(str(kit("sd15")), device="cpu", dtype="float32"), plain, 0.0)
    pipe = load_pipeline(str(kit("sd15")), device="cpu", dtype="float32")
    load_adapters(pipe, [str(tmp_path / "lora")], [])
    full = draw(pipe, adapted, 0.0)
    assert not torch.equal(full, base)
    # Every step delayed: the base model on the class-word prompt (the UNet's and text encoder's LoRA both off).
    assert torch.equal(draw(pipe, adapted, 0.99, plain), base)
    half = draw(pipe, adapted, 0.5, plain)
    assert not torch.equal(half, base) and not torch.equal(half, full)
    assert torch.equal(draw(pipe, adapted, 0.0), full)  # the adapters are back on afterwards
    with pytest.raises(ValueError, match="adapter_start must be in"):
        EvalPersonalizationConfig(prompts=["x"], placeholder="x", adapter_start=1.0)
    with pytest.raises(ValueError, match="needs placeholder"):
        EvalPersonalizationConfig(prompts=["x"], adapter_start=0.5)
