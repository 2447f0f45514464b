import json

import numpy as np
import torch
import pytest

from genaug.artefacts import load_hf_dataset, read_dataset
from genaug.errors import ConfigError
from genaug.generate.synth import SynthConfig, class_budget, synthesize


def _cfg(kit, out, **kw):
    base = dict(model=str(kit("sd15")), output=str(out), class_names=["red circle", "blue square"],
                images_per_class=3, num_inference_steps=2, batch_size=4, device="cpu", seed=0)
    base.update(kw)
    return SynthConfig(**base)


def assert_same_images(a, b, in_order: bool = False) -> None:
    """The same image ids (in the same order, if asked), each image within 2 levels per pixel."""
    ids = [r["id"] for r in a.records]
    assert (ids == [r["id"] for r in b.records]) if in_order else sorted(ids) == sorted(r["id"] for r in b.records)
    by_id = {r["id"]: i for i, r in enumerate(b.records)}
    for i, item_id in enumerate(ids):
        diff = np.abs(np.asarray(a.image(i), dtype=int) - np.asarray(b.image(by_id[item_id]), dtype=int))
        assert diff.max() <= 2, item_id


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
    assert_same_images(read_dataset(tmp_path / "b1"), read_dataset(tmp_path / "b4"))
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
    (dict(workers=-1), "workers must not be negative"),
    (dict(workers=2, worker_kind="processes", shard="0/2"), "leave shard and merge_shards unset"),
    (dict(worker_kind="fibres"), "worker_kind must be threads or processes"),
    (dict(workers=2, compile=True), "compiled UNet draws in one thread"),
])
def test_config_checks(kw, msg):
    base = dict(model="m", class_names=["a"])
    base.update(kw)
    with pytest.raises(ValueError, match=msg):
        SynthConfig(**base)


def test_unknown_method(kit, tmp_path):
    with pytest.raises(ConfigError, match="unknown synthesis method"):
        synthesize(_cfg(kit, tmp_path / "x", method="nope"))


@pytest.fixture
def real_data(kit, tmp_path):
    """A small real dataset: 2 classes x 2 images (made by the text method, which is all we need here)."""
    synthesize(_cfg(kit, tmp_path / "real", images_per_class=2, num_inference_steps=1))
    return tmp_path / "real"


@pytest.mark.parametrize("arch,method,extra", [
    ("sd15", "img2img", dict(strength_choices=[0.25, 0.5, 0.75])),
    ("unclip", "img2img", {}),
    ("sd15", "spectrum", dict(spectrum_levels=[0.0, 0.5, 1.0])),
    ("unclip", "diagen", dict(strength=0.7)),
    ("unclip", "augcond", dict(augcond_mode="cutmix+dropout")),
    ("unclip", "augcond", dict(augcond_mode="pixel_mixup+embed_mixup+embed_cutmix+img2img")),
])
def test_image_methods_record_provenance_and_batch_invariance(kit, real_data, tmp_path, arch, method, extra):
    def run(out, batch_size, **kw):
        return synthesize(_cfg(kit, out, model=str(kit(arch)), method=method, real_data=str(real_data),
                               images_per_class=0, per_real=3, class_names=[], batch_size=batch_size, **extra, **kw))

    result = run(tmp_path / "a", 4)
    assert result.generated == 12  # 3 per real image, 4 real images
    ds = read_dataset(tmp_path / "a")
    real_ids = {r["id"] for r in read_dataset(real_data).records}
    assert all(r["source"] in real_ids and r["method"] == method for r in ds.records)
    if method == "img2img":
        assert {r["strength"] for r in ds.records} <= set(extra.get("strength_choices", [0.5]))
    if method == "spectrum":
        levels = [r["image_guidance"] for r in ds.records]
        assert set(levels) == {0.0, 0.5, 1.0} and all(r["strength"] == 1 - r["image_guidance"] for r in ds.records)
        # Every level of one real image before the next image.
        first = [r for r in ds.records if r["label"] == 0]
        assert [r["source"] for r in first[:3]] == [first[0]["source"]] * 3
    if method == "augcond":
        row = ds.records[0]
        assert {"partner", "mix_lambda", "augcond_mode"} <= set(row) and 0 <= row["mix_lambda"] <= 1
    assert len(load_hf_dataset(tmp_path / "a")["train"]) == 12
    run(tmp_path / "b", 1, workers=1)
    assert_same_images(ds, read_dataset(tmp_path / "b"))
    # Two threads drawing batches from one pipeline write the one-thread dataset, line for line.
    run(tmp_path / "c", 1, workers=2)
    assert read_dataset(tmp_path / "c").records == read_dataset(tmp_path / "b").records
    assert_same_images(read_dataset(tmp_path / "b"), read_dataset(tmp_path / "c"), in_order=True)


def test_spectrum_level_one_is_the_real_image_through_the_vae(kit, real_data, tmp_path):
    synthesize(_cfg(kit, tmp_path / "s", method="spectrum", real_data=str(real_data), images_per_class=0,
                    per_real=1, class_names=[], spectrum_levels=[1.0]))
    ds = read_dataset(tmp_path / "s")
    assert all(r["strength"] == 0.0 for r in ds.records)
    # Strength 0 runs no denoising step: the output is the VAE reconstruction of the source.
    assert len(ds) == 4


def test_image_methods_need_what_they_condition_on(kit, real_data, tmp_path):
    from genaug.errors import ModelError

    with pytest.raises(ValueError, match="needs real_data"):
        SynthConfig(model="m", class_names=["a"], method="img2img")
    with pytest.raises(ValueError, match="unknown augcond_mode"):
        SynthConfig(model="m", real_data="x", method="augcond", augcond_mode="cutmix+sparkles")
    with pytest.raises(ModelError, match="unCLIP-style"):
        synthesize(_cfg(kit, tmp_path / "x", method="augcond", real_data=str(real_data), images_per_class=1,
                        class_names=[]))
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_diagen_noise_changes_the_class_tokens_only(kit, real_data, tmp_path):
    from genaug.generate.synth import SynthItem, encode_with_token_noise
    from genaug.models.loading import load_pipeline

    pipe = load_pipeline(str(kit("sd15")), device="cpu")
    items = [SynthItem(f"i{i}", 0, "red circle", "a photo of a red circle", seed=i) for i in range(2)]
    clean = encode_with_token_noise(pipe, items, 0.0)
    noisy = encode_with_token_noise(pipe, items, 0.5)
    ids = pipe.tokenizer("a photo of a red circle", padding="max_length",
                         max_length=pipe.tokenizer.model_max_length).input_ids
    first = next(i for i, t in enumerate(ids) if t in set(pipe.tokenizer("red circle",
                                                                         add_special_tokens=False).input_ids))
    # Causal attention: positions before the class name are untouched, later ones change.
    assert torch.allclose(clean[:, :first], noisy[:, :first])
    assert not torch.allclose(clean[:, first], noisy[:, first])
    assert not torch.allclose(noisy[0], noisy[1])  # each item its own noise
    assert torch.equal(encode_with_token_noise(pipe, items, 0.5), noisy)  # seeded
    result = synthesize(_cfg(kit, tmp_path / "d", method="diagen", real_data=str(real_data), images_per_class=0,
                             per_real=1, class_names=[], strength=0.7))
    assert result.generated == 4
    assert {r["embedding_noise_std"] for r in read_dataset(tmp_path / "d").records} == {0.01}


@pytest.mark.parametrize("arch,method,extra", [
    ("sd15", "img2img", dict(strength_choices=[0.25, 0.5, 1.0])),  # the active rows change within a batch
    ("unclip", "augcond", dict(augcond_mode="embed_mixup+dropout")),
])
def test_the_traced_unet_draws_the_eager_images_bit_for_bit(kit, real_data, tmp_path, arch, method, extra):
    def run(out, **kw):
        synthesize(_cfg(kit, out, model=str(kit(arch)), method=method, real_data=str(real_data), images_per_class=0,
                        per_real=2, class_names=[], batch_size=3, **extra, **kw))
        ds = read_dataset(out)
        return [ds.image_path(i).read_bytes() for i in range(len(ds))]

    assert run(tmp_path / "traced") == run(tmp_path / "eager", trace_unet=False)


def test_one_trace_serves_every_batch_size(kit):
    from genaug.generate import sampler as sampler_module
    from genaug.generate.sampler import Conditioning, Sampler
    from genaug.models.loading import load_pipeline

    pipe = load_pipeline(str(kit("unclip")), device="cpu")
    images = {}
    for trace in (False, True):
        pipe.genaug_trace_unet = trace
        for batch in (1, 3, 5):
            sampler = Sampler(pipe)
            generators = [torch.Generator().manual_seed(i) for i in range(batch)]
            pos, neg = sampler.encode_text(["a red circle"] * batch)
            cond = Conditioning(pos, neg, sampler.class_labels(None, 0, generators, batch))
            images[trace, batch] = sampler.sample(cond, generators, size=32, num_steps=2, guidance_scale=3.0)
    traces = list(sampler_module._TRACES[pipe.unet].values())
    assert len(traces) == 1 and traces[0] is not None  # traced once, for the first batch size
    for batch in (1, 3, 5):
        assert np.array_equal(images[True, batch], images[False, batch])


def test_augcond_without_augmentation_equals_the_stock_unclip_pipeline(kit, real_data, tmp_path):
    """The engine's image-conditioned path is the stock diffusers StableUnCLIPImg2ImgPipeline, batched."""
    from genaug.models.loading import default_resolution, load_pipeline

    cfg = _cfg(kit, tmp_path / "ac", model=str(kit("unclip")), method="augcond", augcond_mode="none",
               real_data=str(real_data), images_per_class=0, per_real=1, class_names=[], guidance_scale=3.0,
               num_inference_steps=3)
    synthesize(cfg)
    ours = read_dataset(tmp_path / "ac")
    real = read_dataset(real_data)
    pipe = load_pipeline(str(kit("unclip")), device="cpu")
    size = default_resolution(pipe)
    by_id = {r["id"]: i for i, r in enumerate(real.records)}
    for i, row in enumerate(ours.records):
        source = real.image(by_id[row["source"]]).resize((size, size))
        stock = pipe(image=source, prompt=row["prompt"], num_inference_steps=3, guidance_scale=3.0,
                     noise_level=0, generator=torch.Generator().manual_seed(row["seed"]), output_type="np").images[0]
        stock = np.round(stock * 255).astype(int)
        assert np.abs(np.asarray(ours.image(i), dtype=int) - stock).max() <= 2, row["id"]


def test_shards_merge_into_the_unsharded_dataset(kit, tmp_path):
    from genaug.errors import ConfigError as Cfg

    whole = synthesize(_cfg(kit, tmp_path / "whole", images_per_class=3))
    for i in range(2):
        part = synthesize(_cfg(kit, tmp_path / "sharded", images_per_class=3, shard=f"{i}/2"))
        assert part.planned == 3
    merged = synthesize(_cfg(kit, tmp_path / "sharded", images_per_class=3, merge_shards=2))
    assert merged.generated == whole.generated == 6
    assert_same_images(read_dataset(tmp_path / "whole"), read_dataset(tmp_path / "sharded"), in_order=True)
    with pytest.raises(Cfg, match="in no shard"):
        synthesize(_cfg(kit, tmp_path / "partial", images_per_class=3, merge_shards=3))
    with pytest.raises(ValueError, match="i/N"):
        SynthConfig(model="m", class_names=["a"], shard="2")
    with pytest.raises(ValueError, match=r"\[0, N\)"):
        SynthConfig(model="m", class_names=["a"], shard="2/2")


def test_worker_threads_write_in_plan_order_and_stop_at_the_first_failure(kit, tmp_path, monkeypatch):
    import genaug.generate.synth as synth_module
    from genaug.errors import ModelError

    synthesize(_cfg(kit, tmp_path / "whole", images_per_class=4, batch_size=1, workers=1))
    whole = read_dataset(tmp_path / "whole")
    threads = synthesize(_cfg(kit, tmp_path / "threads", images_per_class=4, batch_size=1, workers=2))
    assert threads.generated == 8 and read_dataset(tmp_path / "threads").records == whole.records
    metrics = json.loads((tmp_path / "threads" / "run" / "metrics.json").read_text())
    assert (metrics["workers"], metrics["worker_kind"]) == (2, "threads")
    assert metrics["threads_per_worker"] == max(1, torch.get_num_threads() // 2)

    # Batch 3 fails: its error reaches the caller; the batches claimed before it finish and are written, in plan
    # order; the rest are left for the rerun.
    real_method = synth_module.create_method("text")
    calls = []

    def generate(pipe, items, cfg, size, real):
        calls.append(items[0].id)
        if items[0].id == whole.records[3]["id"]:
            raise ModelError("the generator broke", where="test", fix="none")
        return real_method.generate(pipe, items, cfg, size, real)

    failing = synth_module.SynthMethod("text", real_method.plan, generate, real_method.help)
    monkeypatch.setattr(synth_module, "create_method", lambda name: failing)
    own_threads = torch.get_num_threads()
    with pytest.raises(ModelError, match="the generator broke"):
        synthesize(_cfg(kit, tmp_path / "failed", images_per_class=4, batch_size=1, workers=2))
    assert torch.get_num_threads() == own_threads  # given back after the failure
    written = read_dataset(tmp_path / "failed").records
    assert written == whole.records[:3] and 4 <= len(calls) <= 5
    monkeypatch.undo()
    resumed = synthesize(_cfg(kit, tmp_path / "failed", images_per_class=4, batch_size=1, workers=2))
    assert resumed.generated == 8 - len(written)
    assert read_dataset(tmp_path / "failed").records == whole.records


def test_pipeline_state_lock_lets_go_only_while_sampling():
    import threading

    from genaug.generate.sampler import PipelineStateLock

    lock, order = PipelineStateLock(), []
    with lock.released():  # a thread that does not hold it: nothing to let go
        order.append("alone")

    def other():
        with lock.held():
            order.append("other")

    with lock.held():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.2)
        assert thread.is_alive()  # blocked while this thread holds it
        with lock.released():
            thread.join(5)
            order.append("sampled")
        assert not thread.is_alive()
    assert order == ["alone", "other", "sampled"]


def test_workers_write_the_one_process_dataset(kit, tmp_path):
    from genaug.errors import ModelError

    synthesize(_cfg(kit, tmp_path / "whole", images_per_class=3))
    two = synthesize(_cfg(kit, tmp_path / "two", images_per_class=3, workers=2, worker_kind="processes"))
    assert (two.planned, two.generated) == (6, 6)
    whole_ds, two_ds = read_dataset(tmp_path / "whole"), read_dataset(tmp_path / "two")
    assert_same_images(whole_ds, two_ds, in_order=True)
    assert two_ds.records == whole_ds.records  # the same metadata, line for line
    assert not (tmp_path / "two" / "shards").exists()  # merged, then removed
    metrics = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["generated"] == 6 and metrics["seconds"] == two.seconds
    # A grown budget: the workers draw only the new images; a rerun draws nothing (and starts no process).
    more = synthesize(_cfg(kit, tmp_path / "two", images_per_class=4, workers=2, worker_kind="processes"))
    assert (more.generated, more.skipped_existing) == (2, 6)
    synthesize(_cfg(kit, tmp_path / "whole", images_per_class=4))
    assert_same_images(read_dataset(tmp_path / "whole"), read_dataset(tmp_path / "two"), in_order=True)
    again = synthesize(_cfg(kit, tmp_path / "two", images_per_class=4, workers=2, worker_kind="processes"))
    assert again.generated == 0
    # A killed run (here with more workers) left 3 images in a worker folder: they count as drawn, and the merge
    # keeps their bytes.
    from genaug.artefacts import DatasetWriter
    from genaug.generate.synth import worker_folder

    whole = read_dataset(tmp_path / "whole")
    with DatasetWriter(worker_folder(tmp_path / "resumed", 5), whole.class_names) as writer:
        for i in (1, 4, 6):
            row = whole.records[i]
            writer.add(row["id"], whole.image(i), row["label"],
                       **{k: v for k, v in row.items() if k not in ("file_name", "id", "label", "class_name")})
    resumed = synthesize(_cfg(kit, tmp_path / "resumed", images_per_class=4, workers=2, worker_kind="processes"))
    assert (resumed.generated, resumed.skipped_existing) == (5, 3)
    resumed_ds = read_dataset(tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "shards").exists()
    # (whole grew from 3 to 4 per class, so its rows are in the order they were drawn, not plan order)
    by_id = {row["id"]: i for i, row in enumerate(whole.records)}
    assert sorted(by_id) == [row["id"] for row in resumed_ds.records]  # plan order is id order here
    for row in resumed_ds.records:
        assert row == whole.records[by_id[row["id"]]]
    assert_same_images(whole, resumed_ds)
    kept = {resumed_ds.records[i]["id"]: resumed_ds.image_path(i).read_bytes() for i in range(len(resumed_ds))}
    for i in (1, 4, 6):  # the killed run's images, linked in as they were
        assert kept[whole.records[i]["id"]] == whole.image_path(i).read_bytes()
    # A worker's one-line error reaches the caller as its own class; nothing is written.
    with pytest.raises(ModelError, match="model_index.json missing"):
        synthesize(_cfg(kit, tmp_path / "bad", model=str(tmp_path), workers=2, worker_kind="processes"))
    assert not (tmp_path / "bad").exists()


def test_adapters_and_class_words_reach_the_prompts(kit, shape_images, tmp_path):
    from genaug.personalize.textual_inversion import TextualInversionConfig, train_textual_inversion

    train_textual_inversion(TextualInversionConfig(model=str(kit("sd15")), instance_data=str(shape_images),
                                                   output=str(tmp_path / "ti"), placeholder_token="<circ>",
                                                   num_vectors=2, max_train_steps=2, train_batch_size=2,
                                                   device="cpu"))
    cfg = _cfg(kit, tmp_path / "with", adapters=[str(tmp_path / "ti")], class_words={"red circle": "<circ>"},
               prompt_templates=["a photo of a {}"])
    synthesize(cfg)
    rows = read_dataset(tmp_path / "with").records
    assert {r["prompt"] for r in rows if r["label"] == 0} == {"a photo of a <circ>"}
    assert {r["prompt"] for r in rows if r["label"] == 1} == {"a photo of a blue square"}
    assert rows[0]["adapters"] == [str(tmp_path / "ti")]
    synthesize(_cfg(kit, tmp_path / "without", prompt_templates=["a photo of a {}"]))
    plain = read_dataset(tmp_path / "without")
    with_ti = read_dataset(tmp_path / "with")
    # The learned token changes class 0's images; class 1's prompt is untouched by it.
    assert np.asarray(with_ti.image(0)).tolist() != np.asarray(plain.image(0)).tolist()


def test_embedding_cutmix_mixes_feature_dimensions_not_batch_rows():
    from genaug.generate.synth import augment_embeddings

    own = torch.arange(3 * 10, dtype=torch.float32).view(3, 10)         # rows 0..2, distinct values
    partner = -torch.arange(1, 3 * 10 + 1, dtype=torch.float32).view(3, 10)
    out = augment_embeddings(own, partner, [0.7, 0.5, 0.2], [1, 2, 3], ["embed_cutmix"], 0.0)
    for b, lam in enumerate([0.7, 0.5, 0.2]):
        from_partner = out[b] == partner[b]
        assert torch.all(from_partner | (out[b] == own[b]))           # each feature from its own row or partner
        assert int(from_partner.sum()) == round((1 - lam) * 10)         # (1 - lambda) of the features swapped
    assert not torch.equal(out[0] == partner[0], out[1] == partner[1])  # per-item masks
    mixed = augment_embeddings(own, partner, [0.25, 0.5, 1.0], [1, 2, 3], ["embed_mixup"], 0.0)
    assert torch.allclose(mixed[0], 0.25 * own[0] + 0.75 * partner[0]) and torch.equal(mixed[2], own[2])
    dropped = augment_embeddings(own + 1, None, [1.0] * 3, [1, 2, 3], ["embed_dropout"], 0.4)
    zero = dropped == 0
    assert 0 < int(zero.sum()) < 30 and torch.allclose(dropped[~zero], (own + 1)[~zero] / 0.6)


@pytest.mark.parametrize("slow_disk", [False, True])
def test_image_method_resumes_after_a_crash_to_the_same_images(kit, real_data, tmp_path, monkeypatch, slow_disk):
    """Interrupted at the 5th image, a run keeps the 4 it had handed to its writer threads, even when their
    writes are still queued (slow_disk), and the rerun completes it."""
    import time

    import genaug.artefacts as artefacts
    import genaug.generate.synth as synth_module

    if slow_disk:
        write = artefacts.atomic_write_bytes
        monkeypatch.setattr(artefacts, "atomic_write_bytes", lambda path, data: (time.sleep(0.2), write(path, data)))

    def run(out):
        return synthesize(_cfg(kit, out, model=str(kit("unclip")), method="augcond", real_data=str(real_data),
                               images_per_class=0, per_real=2, class_names=[], batch_size=3))

    run(tmp_path / "whole")
    original = synth_module.DatasetWriter.add
    calls = {"n": 0}

    def crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if killed while writing the 5th image
        return original(self, *args, **kwargs)

    monkeypatch.setattr(synth_module.DatasetWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(synth_module.DatasetWriter, "add", original)
    assert len(read_dataset(tmp_path / "killed")) == 4
    again = run(tmp_path / "killed")
    assert again.generated == 4 and again.skipped_existing == 4
    assert_same_images(read_dataset(tmp_path / "whole"), read_dataset(tmp_path / "killed"))


def _img2img_mixed(kit, real_data, out, **kw):
    synthesize(_cfg(kit, out, model=str(kit("unclip")), method="img2img", real_data=str(real_data),
                    images_per_class=0, per_real=3, class_names=[], batch_size=5, num_inference_steps=4,
                    strength_choices=[0.25, 0.5, 1.0], **kw))
    return read_dataset(out)


def test_padded_unet_batches_draw_the_same_images(kit, real_data, tmp_path, monkeypatch):
    """The padding a compiled UNet gets (rows up to the next quarter of the batch) changes no image: img2img at
    mixed strengths, whose active set changes every few steps, and a last partial batch (12 = 5 + 5 + 2)."""
    import genaug.generate.synth as synth_module
    from diffusers import UNet2DConditionModel

    eager = _img2img_mixed(kit, real_data, tmp_path / "eager")
    rows = []
    original = UNet2DConditionModel.forward

    def recording_forward(self, sample, *args, **kwargs):
        rows.append(sample.shape[0])
        return original(self, sample, *args, **kwargs)

    # --compile's wiring (synth -> compile_unet(pipe, batch_size) -> padded sampler calls), with an eager UNet.
    monkeypatch.setattr(synth_module, "compile_unet", lambda pipe, batch: setattr(pipe.unet, "genaug_padded_batch", batch))
    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    padded = _img2img_mixed(kit, real_data, tmp_path / "padded", compile=True)
    assert_same_images(eager, padded, in_order=True)
    # Without padding the active sets would be 1..5 rows; padded, only quarters of 5 (2, 4, 5), times 2 for CFG.
    assert set(rows) <= {4, 8, 10} and 4 in rows and 10 in rows, sorted(set(rows))


@pytest.mark.slow  # about a minute: inductor compiles the UNet
def test_compiled_unet_draws_the_same_images(kit, real_data, tmp_path):
    """--compile: static graphs (at most one per quarter of the batch) draw what the eager UNet draws."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager = _img2img_mixed(kit, real_data, tmp_path / "eager")
    compiled = _img2img_mixed(kit, real_data, tmp_path / "compiled", compile=True)
    assert_same_images(eager, compiled, in_order=True)
    assert 1 <= counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
