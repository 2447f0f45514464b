import numpy as np
import pytest

from genaug.artefacts import load_hf_dataset, read_dataset
from genaug.errors import ConfigError
from genaug.generate.synth import SynthConfig, class_budget, synthesize


def _cfg(kit, out, **kw):
    base = dict(model=str(kit("sd15")), output=str(out), class_names=["red circle", "blue square"],
                images_per_class=3, num_inference_steps=2, batch_size=4, device="cpu", seed=0)
    base.update(kw)
    return SynthConfig(**base)


def test_text_method_writes_a_loadable_dataset(kit, tmp_path):
    result = synthesize(_cfg(kit, tmp_path / "syn"))
    assert result.generated == 6 and result.planned == 6
    ds = read_dataset(tmp_path / "syn")
    assert ds.class_names == ["red circle", "blue square"]
    assert sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    row = ds.records[0]
    for key in ["prompt", "negative_prompt", "seed", "method", "guidance_scale", "model", "sample_weight"]:
        assert key in row
    assert (tmp_path / "syn" / "run" / "config.yaml").is_file()
    assert (tmp_path / "syn" / "run" / "versions.json").is_file()
    hf = load_hf_dataset(tmp_path / "syn")["train"]
    assert len(hf) == 6 and set(hf["method"]) == {"text"}


def test_same_images_across_batch_sizes_and_resume(kit, tmp_path):
    synthesize(_cfg(kit, tmp_path / "b1", batch_size=1))
    synthesize(_cfg(kit, tmp_path / "b4", batch_size=4))
    a, b = read_dataset(tmp_path / "b1"), read_dataset(tmp_path / "b4")
    by_id = {r["id"]: i for i, r in enumerate(b.records)}
    for i, r in enumerate(a.records):
        diff = np.abs(np.asarray(a.image(i), dtype=int) - np.asarray(b.image(by_id[r["id"]]), dtype=int))
        assert diff.max() <= 2, r["id"]
    # A rerun skips everything; a larger budget only adds the missing images.
    again = synthesize(_cfg(kit, tmp_path / "b4", batch_size=4))
    assert again.generated == 0 and again.skipped_existing == 6
    more = synthesize(_cfg(kit, tmp_path / "b4", images_per_class=4))
    assert more.generated == 2 and len(read_dataset(tmp_path / "b4")) == 8


def test_budgets_from_real_data(kit, tmp_path):
    synthesize(_cfg(kit, tmp_path / "real", images_per_class=0, class_names=["a", "b"], batch_size=8,
                    num_inference_steps=1) if False else _cfg(kit, tmp_path / "real", images_per_class=2))
    real = read_dataset(tmp_path / "real")
    cfg = SynthConfig(model="m", real_data=str(tmp_path / "real"), per_real=3)
    assert class_budget(cfg, real.class_names, real) == [6, 6]
    cfg = SynthConfig(model="m", real_data=str(tmp_path / "real"), balance_to=5)
    assert class_budget(cfg, real.class_names, real) == [3, 3]


@pytest.mark.parametrize("kw,msg", [
    (dict(images_per_class=-1), "must not be negative"),
    (dict(images_per_class=2, per_real=2), "only one budget"),
    (dict(per_real=2, class_names=["a"]), "need real_data"),
    (dict(class_names=[]), "real_data or class_names"),
    (dict(prompt_templates=["no slot"]), "has no"),
    (dict(resolution=30), "multiple of 8"),
])
def test_config_checks(kw, msg):
    base = dict(model="m", class_names=["a"])
    base.update(kw)
    with pytest.raises(ValueError, match=msg):
        SynthConfig(**base)


def test_unknown_method(kit, tmp_path):
    with pytest.raises(ConfigError, match="unknown synthesis method"):
        synthesize(_cfg(kit, tmp_path / "x", method="nope"))
