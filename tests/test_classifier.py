"""Downstream classifier: training on real + extra data, buckets, long-tail losses, mixing, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genaug.artefacts import DatasetWriter
from genaug.cli import main
from genaug.errors import DataError
from genaug.evaluate.classifier import (ClassifierConfig, Images, MixedSampler, adjusted_logits, bucket_of, ci95,
                                        score, train_classifier)
from test_retrieve import CLASSES, draw

COUNTS = [30, 12, 6, 3, 2, 1]  # a long tail over the six toy classes


def write(root, split, counts, seed, extra_meta=None):
    rng = np.random.default_rng(seed)
    with DatasetWriter(root, CLASSES, split=split) as writer:
        for label, n in enumerate(counts):
            for j in range(n):
                meta = extra_meta(label, j) if extra_meta else {}
                writer.add(f"{split}-{label}-{j}", draw(CLASSES[label], rng), label, **meta)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    real = write(root / "real", "train", COUNTS, 1)
    write(real, "test", [6] * 6, 2)
    synth = write(root / "synth", "train", [4] * 6, 3,
                  lambda label, j: {"source": f"train-{label}-0", "sample_weight": 0.5})
    return {"root": root, "real": real, "synth": synth}


def cfg(data, out, **kw):
    base = dict(real_data=str(data["real"]), output=str(out), epochs=3, min_steps=6, batch_size=16,
                many_threshold=20, few_threshold=5, progress=False, device="cpu", checkpoint_every=1)
    base.update(kw)
    return ClassifierConfig(**base)


def test_trains_and_writes_a_complete_run_folder(data, tmp_path, monkeypatch):
    result = train_classifier(cfg(data, tmp_path / "run", extra_data=[str(data["synth"])]))
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["accuracy"] == result.test_accuracy and 0 <= result.test_accuracy <= 1
    assert final["train_images"] == {"real": sum(COUNTS), "extra": 24}
    # Buckets by real training count: 30 > 20 many; 12, 6 medium; 3, 2, 1 few.
    assert final["bucket_sizes"] == {"many": 1, "medium": 2, "few": 3}
    lines = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,test_accuracy") and len(lines) == 4
    for name in ("config.yaml", "versions.json", "metrics.json", "model.safetensors"):
        assert (tmp_path / "run" / name).is_file()
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    # A rerun of the finished run does no work; one asking for something else trains again.
    import genaug.evaluate.classifier as module

    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    monkeypatch.setattr(module, "_train_locked", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = train_classifier(cfg(data, tmp_path / "run", extra_data=[str(data["synth"])]))
    monkeypatch.undo()
    assert (again.test_accuracy, again.steps, again.history) == (result.test_accuracy, result.steps, result.history)
    longer = train_classifier(cfg(data, tmp_path / "run", extra_data=[str(data["synth"])], epochs=4))
    assert longer.steps > result.steps and (tmp_path / "run" / "model.safetensors").read_bytes() != weights


def test_killed_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    train_classifier(cfg(data, tmp_path / "whole", loss="balanced_softmax", sampler="class_balanced"))
    import genaug.evaluate.classifier as module

    calls = {"n": 0}
    original = module.score

    def crash_after_two_epochs(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third epoch's evaluation: its checkpoint was never written
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "score", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg(data, tmp_path / "killed", loss="balanced_softmax", sampler="class_balanced"))
    assert (tmp_path / "killed" / "checkpoint.safetensors").is_file()
    monkeypatch.setattr(module, "score", original)
    train_classifier(cfg(data, tmp_path / "killed", loss="balanced_softmax", sampler="class_balanced"))
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "killed" / "model.safetensors").read_bytes()
    assert (tmp_path / "whole" / "summary.csv").read_text() == (tmp_path / "killed" / "summary.csv").read_text()


def test_pretrained_backbone_loads_and_a_frozen_one_stays_as_loaded(data, tmp_path):
    """DA-Fusion's few-shot classifier: pretrained weights, new head, only the head trained."""
    from safetensors.torch import load_file, save_file

    from genaug.errors import DataError
    from genaug.evaluate.classifier import (create_classifier, head_parameter_names, input_normalization,
                                            load_classifier)
    from genaug.pretrain.data import CLIP_MEAN

    torch.manual_seed(5)
    source = create_classifier("genaug_cnn_small", 10, 32)  # "pretrained" on another task with 10 classes
    source_weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(source_weights, str(tmp_path / "backbone.safetensors"))
    (tmp_path / "hub-repo").mkdir()
    save_file(source_weights, str(tmp_path / "hub-repo" / "model.safetensors"))

    result = train_classifier(cfg(data, tmp_path / "probe", arch="genaug_cnn_small",
                                  pretrained=str(tmp_path / "hub-repo"), freeze_backbone=True))
    trained = load_file(str(tmp_path / "probe" / "model.safetensors"))
    head = head_parameter_names(create_classifier("genaug_cnn_small", 6, 32))
    assert head == {"fc.weight", "fc.bias"} and trained["fc.weight"].shape[0] == 6
    for k, v in trained.items():  # the backbone, BatchNorm statistics included, is exactly the checkpoint's
        if k not in head:
            assert torch.equal(v, source_weights[k]), k
    assert 0 <= result.test_accuracy <= 1
    loaded = load_classifier(tmp_path / "probe")
    assert loaded.mean.flatten().tolist() == pytest.approx(list(CLIP_MEAN))  # genaug_cnn_small's own statistics
    # Fine-tuning from the file moves the backbone too.
    train_classifier(cfg(data, tmp_path / "tuned", arch="genaug_cnn_small", pretrained=str(tmp_path / "backbone.safetensors")))
    tuned = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert any(not torch.equal(tuned[k], source_weights[k]) for k in tuned if k not in head)
    # A checkpoint's own normalization: timm's ImageNet statistics for a resnet.
    resnet = create_classifier("resnet18", 6, 32)
    assert input_normalization(resnet, ClassifierConfig(pretrained="x"))[0] == pytest.approx([0.485, 0.456, 0.406])
    assert input_normalization(resnet, ClassifierConfig())[0] == pytest.approx(list(CLIP_MEAN))

    with pytest.raises(ValueError, match="needs pretrained"):
        ClassifierConfig(freeze_backbone=True)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(tmp_path / "resnet.safetensors"))
    (tmp_path / "backbone.pth").write_bytes(b"not read")
    for path, message in [(tmp_path / "resnet.safetensors", "do not fit this architecture"),
                          (tmp_path / "backbone.pth", "must be a .safetensors file"),
                          (tmp_path / "absent.safetensors", "not found")]:
        with pytest.raises(DataError, match=message):
            train_classifier(cfg(data, tmp_path / "bad", arch="genaug_cnn_small", pretrained=str(path)))
        assert not (tmp_path / "bad").exists()  # nothing written


def _images(labels, ids=None, sources=None, weights=None):
    n = len(labels)
    return Images(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(),
                  torch.tensor(labels), torch.tensor(weights or [1.0] * n), ids or [f"r{i}" for i in range(n)],
                  sources or [None] * n)


def test_zero_init_last_reaches_the_residual_blocks_and_older_runs_are_retrained(data, tmp_path, monkeypatch):
    from genaug.errors import ConfigError
    from genaug.evaluate.backbones import BasicBlock
    from genaug.evaluate.classifier import create_classifier

    def last_bn_gammas(model):
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock) or type(m).__name__ == "BasicBlock"]
        return torch.cat([b.bn2.weight.detach().flatten() for b in blocks])

    assert bool((last_bn_gammas(create_classifier("genaug_cnn_small", 6, 32)) == 1).all())  # the default
    assert bool((last_bn_gammas(create_classifier("genaug_cnn_small", 6, 32, zero_init_last=True)) == 0).all())
    assert bool((last_bn_gammas(create_classifier("resnet18", 6, 32)) == 1).all())  # timm's own default is zero
    assert bool((last_bn_gammas(create_classifier("resnet18", 6, 32, zero_init_last=True)) == 0).all())
    with pytest.raises(ConfigError, match="does not apply"):
        create_classifier("vit_tiny_patch16_224", 6, 32, zero_init_last=True)

    # A run finished before the option existed started its blocks at zero: it is not a run of the
    # new default, so it is trained again (and reported, not retrained, once it asks for the old start).
    train_classifier(cfg(data, tmp_path / "run"))
    final_path = tmp_path / "run" / "final.json"
    final = json.loads(final_path.read_text())
    del final["config"]["zero_init_last"]
    final_path.write_text(json.dumps(final))
    import genaug.evaluate.classifier as classifier

    retrained = []
    monkeypatch.setattr(classifier, "_train_locked",
                        lambda cfg, *a: retrained.append(cfg.zero_init_last) or "retrained")
    assert train_classifier(cfg(data, tmp_path / "run")) == "retrained"
    assert train_classifier(cfg(data, tmp_path / "run", zero_init_last=True)).test_accuracy == final["accuracy"]
    assert retrained == [False]


def test_sampler_rules():
    real = _images([0] * 90 + [1] * 10)
    balanced = MixedSampler(real, None, ClassifierConfig(sampler="class_balanced"), 2)
    _, labels, _ = balanced.draw(4000, torch.Generator().manual_seed(0))
    assert abs(float(labels.float().mean()) - 0.5) < 0.05  # classes equally often despite 90/10
    plain = MixedSampler(real, None, ClassifierConfig(sampler="random"), 2)
    _, labels, _ = plain.draw(4000, torch.Generator().manual_seed(0))
    assert abs(float(labels.float().mean()) - 0.1) < 0.03
    # replace: a drawn real image is swapped for an extra image made from it (by source id).
    real = _images([0, 1], ids=["a", "b"])
    extra = _images([0, 0, 1], ids=["x", "y", "z"], sources=["a", "a", None], weights=[0.25, 0.25, 0.5])
    sampler = MixedSampler(real, extra, ClassifierConfig(mix="replace", synthetic_prob=1.0), 2)
    pixels, labels, weights = sampler.draw(200, torch.Generator().manual_seed(1))
    values = pixels[:, 0, 0, 0].tolist()
    assert set(values) <= {0, 1, 2}  # extra images only (pixel value = index in extra)
    assert all((v in (0, 1)) == (label == 0) for v, label in zip(values, labels.tolist()))
    assert set(weights.tolist()) == {0.25, 0.5}
    union = MixedSampler(real, extra, ClassifierConfig(mix="union"), 2)
    assert union.num_pool == 5 and union.train_counts.tolist() == [3, 2]


def test_long_tail_helpers():
    logits = torch.zeros(2, 3)
    prior = torch.tensor([0.7, 0.2, 0.1]).log()
    assert torch.allclose(adjusted_logits(logits, prior, 1.0), prior.expand(2, 3))
    assert torch.equal(adjusted_logits(logits, None, 1.0), logits)
    assert [bucket_of(c, 100, 20) for c in (500, 101, 100, 20, 19, 5)] == ["many", "many", "medium", "medium",
                                                                            "few", "few"]
    result = score(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), ["a", "b", "c"],
                   torch.tensor([200, 50, 3]), 100, 20)
    assert result["accuracy"] == 0.75 and result["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.5}
    assert result["buckets"] == {"many": 1.0, "medium": 1.0, "few": 0.5}
    mean, half = ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert ci95([0.4]) == (0.4, 0.0)


def test_bad_inputs_fail_clearly(data, tmp_path, capsys):
    with pytest.raises(ValueError, match="loss must be one of"):
        ClassifierConfig(loss="focal")
    wrong = write(tmp_path / "wrong", "train", [1], 5)
    (tmp_path / "wrong" / "genaug.json").write_text(
        (tmp_path / "wrong" / "genaug.json").read_text().replace("red circle", "purple hexagon"))
    with pytest.raises(DataError, match="classes the real data lacks"):
        train_classifier(cfg(data, tmp_path / "x", extra_data=[str(wrong)]))
    code = main(["train-classifier", "--real-data", str(data["synth"]), "--output", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "no 'test' split" in err[0]


def test_fewshot_protocol_aggregates_trials_and_reuses_finished_runs(tmp_path, monkeypatch):
    from genaug.evaluate.protocols import FewShotConfig, run_fewshot

    world = tmp_path / "world"
    for k in (1, 2):
        for trial in range(2):
            write(world / "fewshot" / f"k{k}-trial{trial}", "train", [k] * 6, 10 * k + trial)
            write(tmp_path / "synth" / f"k{k}-t{trial}", "train", [2] * 6, 100 + 10 * k + trial)
    write(world / "bench", "test", [4] * 6, 3)
    config = FewShotConfig(world=str(world), ks=[1, 2], trials=2, output=str(tmp_path / "fs"),
                           extra_patterns=[str(tmp_path / "synth" / "k{k}-t{trial}")],
                           classifier={"epochs": 2, "min_steps": 4, "batch_size": 8, "progress": False,
                                       "device": "cpu"})
    result = run_fewshot(config)
    table = json.loads((tmp_path / "fs" / "fewshot.json").read_text())["table"]
    assert set(table) == {"1", "2"} and all(len(row["trials"]) == 2 for row in table.values())
    mean, half = ci95(table["1"]["trials"])
    assert table["1"]["mean"] == pytest.approx(mean, abs=1e-5) and table["1"]["ci95"] == pytest.approx(half, abs=1e-5)
    assert result.table == table and "± " in (tmp_path / "fs" / "fewshot.md").read_text()
    import genaug.evaluate.classifier as classifier

    monkeypatch.setattr(classifier, "_train_locked", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert run_fewshot(config).table == table
    # A run finished by an older genaug, before an option existed, still counts while that option is
    # at its default; a run that asked for something else does not.
    final_path = tmp_path / "fs" / "k1-trial0" / "final.json"
    final = json.loads(final_path.read_text())
    del final["config"]["rotate90"]  # default False in this config
    final_path.write_text(json.dumps(final))
    assert run_fewshot(config).table == table
    final["config"]["epochs"] = 3
    final_path.write_text(json.dumps(final))
    retrained = []
    monkeypatch.setattr(classifier, "_train_locked",
                        lambda cfg, *a: retrained.append(cfg.output) or type("R", (), {"test_accuracy": 0.5})())
    run_fewshot(config)
    assert retrained == [str(tmp_path / "fs" / "k1-trial0")]
    with pytest.raises(DataError, match="missing"):
        run_fewshot(FewShotConfig(world=str(world), ks=[4], trials=1, output=str(tmp_path / "fs2")))


def test_kshot_splits_are_seeded_per_trial_and_refuse_short_classes(data, tmp_path):
    from genaug.artefacts import read_dataset
    from genaug.evaluate.protocols import KShotConfig, make_kshot_splits

    result = make_kshot_splits(KShotConfig(data=str(data["real"]), output=str(tmp_path / "k"), ks=[1], trials=3))
    assert result.splits == {f"k1-trial{t}": 6 for t in range(3)}
    draws = [[r["source"] for r in read_dataset(tmp_path / "k" / f"k1-trial{t}").records] for t in range(3)]
    assert sorted(read_dataset(tmp_path / "k" / "k1-trial0").labels.tolist()) == list(range(6))
    assert len({tuple(d) for d in draws}) > 1  # trials differ
    again = make_kshot_splits(KShotConfig(data=str(data["real"]), output=str(tmp_path / "k2"), ks=[1], trials=3))
    assert [[r["source"] for r in read_dataset(again.output / f"k1-trial{t}").records] for t in range(3)] == draws
    with pytest.raises(DataError, match="fewer than k=2"):  # the last class has one image
        make_kshot_splits(KShotConfig(data=str(data["real"]), output=str(tmp_path / "k3"), ks=[2], trials=1))
    assert not (tmp_path / "k3").exists()


def test_streaming_from_disk_trains_exactly_like_in_memory(data, tmp_path, capsys):
    kw = dict(extra_data=[str(data["synth"])], mix="replace", synthetic_prob=0.5, checkpoint_every=0)
    memory = train_classifier(cfg(data, tmp_path / "memory", **kw))
    streamed = train_classifier(cfg(data, tmp_path / "streamed", max_memory_gb=1e-6, **kw))
    assert "streaming it from disk" in capsys.readouterr().out
    assert (tmp_path / "memory" / "model.safetensors").read_bytes() == \
        (tmp_path / "streamed" / "model.safetensors").read_bytes()
    assert streamed.per_class == memory.per_class and streamed.test_accuracy == memory.test_accuracy
