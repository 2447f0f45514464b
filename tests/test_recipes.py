import json

import pytest

from genaug.artefacts import load_hf_dataset
from genaug.errors import ConfigError
from genaug.recipes import RecipeConfig, run_recipe

MODEL_STAGE = """
  - name: model
    command: kit
    config: {arch: sd15, output: "${output}/model"}"""

RECIPE = """
name: tiny
stages:""" + MODEL_STAGE + """
  - name: synth
    command: synth
    config:
      model: ${output}/model
      output: ${output}/data
      class_names: [a, b]
      images_per_class: 2
      num_inference_steps: 2
      device: cpu
"""


def test_recipe_runs_then_caches_then_reruns_downstream(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    first = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in first.stages] == [False, False]
    assert len(load_hf_dataset(out / "data")["train"]) == 4
    second = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in second.stages] == [True, True]
    # The terminal summary: a line per stage, not every stage's full result.
    summary = second.summary().splitlines()
    assert len(summary) == 5 and summary[-1].strip() == f"synth (synth): cached -> {out / 'data'}"
    # Changing a stage reruns it and everything after it, not what came before.
    recipe.write_text(RECIPE.replace("images_per_class: 2", "images_per_class: 3"))
    third = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in third.stages] == [True, False]
    assert third.stages[1].result["generated"] == 2  # the 4 earlier images were kept
    assert json.loads((out / "run" / "metrics.json").read_text())["stages"]
    # A stage whose output was deleted is rerun, even though its config did not change.
    import shutil

    shutil.rmtree(out / "data")
    fourth = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in fourth.stages] == [True, False]
    assert len(load_hf_dataset(out / "data")["train"]) == 6


def test_an_option_added_later_and_keys_from_before_keep_stages_cached(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    import genaug.generate.synth as synth
    from genaug.config import config_to_dict, option

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    dry = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), dry_run=True))
    assert [s.cached for s in dry.stages] == [False, False] and "would run" in dry.summary()
    assert not out.exists()  # a dry run writes nothing
    first = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    # Keys as genaug wrote them before 2026-12-01 (every field hashed, defaults too): still current,
    # and rewritten in today's form.
    chain, new_keys = hashlib.sha256(b"genaug-recipe"), {}
    for stage in first.stages:
        cache = out / ".stages" / f"{stage.name}.json"
        record = json.loads(cache.read_text())
        new_keys[stage.name] = record["key"]
        chain.update(json.dumps({"command": stage.command, "config": record["config"], "inputs": {}},
                                sort_keys=True).encode())
        cache.write_text(json.dumps({**record, "key": chain.hexdigest()}))
    again = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in again.stages] == [True, True]
    assert {s.name: json.loads((out / ".stages" / f"{s.name}.json").read_text())["key"]
            for s in again.stages} == new_keys

    # A later genaug adds a synth option whose default keeps the old behaviour: nothing reruns.
    @dataclasses.dataclass
    class LaterSynthConfig(synth.SynthConfig):
        added_later: int = option(0, "an option a later genaug adds")

    monkeypatch.setattr(synth, "SynthConfig", LaterSynthConfig)
    later = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in later.stages] == [True, True]
    recipe.write_text(RECIPE.replace("device: cpu", "device: cpu\n      added_later: 1"))
    dry = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), dry_run=True))
    assert [s.cached for s in dry.stages] == [True, False]  # ... but setting it is a change
    assert "added_later" in config_to_dict(LaterSynthConfig(model="m", class_names=["a"], images_per_class=1))


@pytest.mark.parametrize("text,msg", [
    ("stages: []", "non-empty"),
    ("stages: [{command: nope}]", "unknown command 'nope'"),
    ("stages: [{command: kit, config: {archh: sd15}}]", "unknown key 'archh'"),
    ("stagez: []", "unknown recipe key"),
])
def test_bad_recipes_fail_before_running_anything(tmp_path, text, msg):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        run_recipe(RecipeConfig(recipe=str(recipe), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_shipped_recipes_validate():
    from genaug.recipes import RECIPE_DIRS

    from genaug.config import read_config_file

    recipes = sorted(RECIPE_DIRS[1].glob("*.yaml"))
    assert {"quickstart", "embedded-fewshot", "embedded-longtail", "imagenet-lt", "dafusion-fewshot"} <= \
        {r.stem for r in recipes}
    for recipe in recipes:
        # Templates need their paths; --only with an unknown stage fails after validation, so nothing runs.
        needed = [f"{k}=/data/{k}" for k, v in (read_config_file(recipe).get("variables") or {}).items() if v is None]
        with pytest.raises(ConfigError, match="unknown stage"):
            run_recipe(RecipeConfig(recipe=str(recipe), only=["__none__"], set=needed))


def test_foreach_expands_a_stage_per_combination(tmp_path):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text("""
name: grid
stages:
  - name: model
    command: kit
    config: {arch: sd15, output: "${output}/model"}
  - name: synth
    command: synth
    foreach: {n: [1, 2], seed: [0, 5]}
    config:
      model: ${output}/model
      output: ${output}/data-${n}-${seed}
      class_names: [a]
      images_per_class: ${n}
      seed: ${seed}
      num_inference_steps: 1
      device: cpu
""")
    result = run_recipe(RecipeConfig(recipe=str(recipe), output=str(tmp_path / "out")))
    names = [s.name for s in result.stages]
    assert names == ["model", "synth-n1-seed0", "synth-n1-seed5", "synth-n2-seed0", "synth-n2-seed5"]
    assert len(load_hf_dataset(tmp_path / "out" / "data-2-5")["train"]) == 2
    recipe.write_text(recipe.read_text().replace("foreach: {n: [1, 2], seed: [0, 5]}", "foreach: {n: []}"))
    with pytest.raises(ConfigError, match="non-empty lists"):
        run_recipe(RecipeConfig(recipe=str(recipe), output=str(tmp_path / "out2")))


VARIABLE_RECIPE = """
name: on-user-data
variables: {data: null, per_real: 1}
stages:""" + MODEL_STAGE + """
  - name: synth
    command: synth
    config:
      model: ${output}/model
      real_data: ${data}
      output: ${output}/synth
      per_real: ${per_real}
      num_inference_steps: 2
      device: cpu
"""


def test_variables_and_edited_user_data_rerun_the_stages_that_read_it(tmp_path, shape_images):
    recipe = tmp_path / "user.yaml"
    recipe.write_text(VARIABLE_RECIPE)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="needs a value for 'data'"):
        run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    with pytest.raises(ConfigError, match="no variable 'dta'"):
        run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), set=[f"dta={shape_images}"]))
    first = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), set=[f"data={shape_images}"]))
    assert first.stages[1].result["generated"] == 4
    again = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), set=[f"data={shape_images}"]))
    assert [s.cached for s in again.stages] == [True, True]
    # The user adds an image to their folder: the config is the same, the input is not.
    import shutil

    shutil.copy(shape_images / "0.png", shape_images / "4.png")
    edited = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), set=[f"data={shape_images}"]))
    assert [s.cached for s in edited.stages] == [True, False]
    assert edited.stages[1].result["generated"] == 1  # only the new image's synthetic twin
    with pytest.raises(ValueError, match="NAME=VALUE"):
        RecipeConfig(recipe=str(recipe), set=["oops"])


def test_only_runs_just_the_named_stages(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    first = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), only=["model"]))
    assert [(s.name, s.cached) for s in first.stages] == [("model", False)]
    assert (out / "model").is_dir() and not (out / "data").exists()  # synth was neither cached nor asked for
    second = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), only=["synth"]))
    assert [(s.name, s.cached) for s in second.stages] == [("model", True), ("synth", False)]


PARALLEL_RECIPE = """
name: parallel
stages:""" + MODEL_STAGE + """
  - name: synth-a
    command: synth
    config: {model: "${output}/model", output: "${output}/data-a", class_names: [a, b], images_per_class: 2,
             num_inference_steps: 2, device: cpu}
  - name: synth-b
    command: synth
    config: {model: "${output}/model", output: "${output}/data-b", class_names: [c], images_per_class: 3,
             num_inference_steps: 2, device: cpu, seed: 3}
"""


def test_jobs_run_stages_in_worker_processes_with_the_same_results(tmp_path):
    import numpy as np

    recipe = tmp_path / "parallel.yaml"
    recipe.write_text(PARALLEL_RECIPE)
    serial = run_recipe(RecipeConfig(recipe=str(recipe), output=str(tmp_path / "serial")))
    out = tmp_path / "parallel"
    parallel = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), jobs=2))
    assert [(s.name, s.cached) for s in parallel.stages] == [("model", False), ("synth-a", False), ("synth-b", False)]
    for name in ("data-a", "data-b"):
        a, b = load_hf_dataset(tmp_path / "serial" / name)["train"], load_hf_dataset(out / name)["train"]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            # Workers run with their share of the threads: sums in another order, so rounding may differ.
            diff = np.abs(np.asarray(x["image"], dtype=int) - np.asarray(y["image"], dtype=int)).max()
            assert x["id"] == y["id"] and diff <= 2
    assert [s.result["generated"] for s in parallel.stages[1:]] == [s.result["generated"] for s in serial.stages[1:]]
    # Each stage's own output went to its log; the results were cached like a serial run's.
    assert "synth" in (out / ".stages" / "synth-b.log").read_text()
    again = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), jobs=2))
    assert all(s.cached for s in again.stages)


def test_stage_dependencies_follow_the_folders_a_config_names(tmp_path):
    from dataclasses import dataclass, field

    from genaug.recipes import _PendingStage, stage_dependencies

    @dataclass
    class Cfg:
        output: str | None = None
        data: str = ""
        specs: list = field(default_factory=list)

    def stage(name, **kw):
        return _PendingStage(name, "x", Cfg(**kw), "", tmp_path / f"{name}.json")

    o = f"{tmp_path}/out"
    stages = [stage("world", output=f"{o}/world"),
              stage("world2", output=f"{o}/world2"),  # a prefix of the name is not a parent folder
              stage("synth", output=f"{o}/text", data=f"{o}/world/bench"),
              stage("train", output=f"{o}/clf", data=f"{o}/world2/../world/bench/", specs=[f"+text={o}/text"]),
              stage("barrier"),  # no output: waits for all before, all after wait for it
              stage("report", output=f"{o}/report", specs=[f"real={o}/clf,{o}/clf"]),
              # A pattern names every folder it expands to (fewshot's extra_patterns), and no other.
              stage("text-k1-t0", output=f"{o}/datasets/text-k1-t0"),
              stage("text-k16-t3", output=f"{o}/datasets/text-k16-t3"),
              stage("img-k1-t0", output=f"{o}/datasets/img-k1-t0"),
              stage("fewshot-text", output=f"{o}/fewshot/text", specs=[f"{o}/datasets/text-k{{k}}-t{{trial}}"])]
    needs = stage_dependencies(stages)
    assert {name: needs[name] for name in ("world", "world2", "synth", "train", "barrier", "report")} == {
        "world": set(), "world2": set(), "synth": {"world"}, "train": {"world", "synth"},
        "barrier": {"world", "world2", "synth", "train"}, "report": {"train", "barrier"}}
    assert needs["fewshot-text"] == {"barrier", "text-k1-t0", "text-k16-t3"}


def test_a_failing_stage_stops_new_stages_and_keeps_the_error_class(tmp_path, capsys):
    from genaug.errors import ModelError

    recipe = tmp_path / "fails.yaml"
    recipe.write_text(PARALLEL_RECIPE.replace('model: "${output}/model", output: "${output}/data-a"',
                                              'model: "${output}/no-model", output: "${output}/data-a"'))
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=r"stage synth-a \(synth\) failed: .*no-model.*synth-a\.log"):
        run_recipe(RecipeConfig(recipe=str(recipe), output=str(out), jobs=2))
    # synth-a reads no stage's output, so it started beside model. model, already running, finished and
    # is cached for the rerun. synth-b waits for model: whether it started depends on which of model and
    # synth-a ended first, but no stage may start once the failure is seen.
    assert json.loads((out / ".stages" / "model.json").read_text())["key"]
    assert not (out / ".stages" / "synth-a.json").exists()
    printed = capsys.readouterr().out.splitlines()
    after_failure = printed[next(i for i, line in enumerate(printed) if line.startswith("[synth-a] failed")):]
    assert not any(": running" in line for line in after_failure), printed
    synth_b_started = any(line.startswith("[synth-b] synth: running") for line in printed)
    assert (out / ".stages" / "synth-b.log").exists() == synth_b_started


def test_one_run_at_a_time_per_output_folder(tmp_path):
    import fcntl

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    (out / ".stages").mkdir(parents=True)
    with open(out / ".stages" / "lock", "w") as held:
        held.write("pid 4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=r"another `genaug run` \(pid 4242\) is using"):
            run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert not (out / "model").exists()
    with pytest.raises(ValueError, match="jobs"):
        RecipeConfig(recipe=str(recipe), jobs=0)


def test_a_stage_reading_an_earlier_stages_output_outside_the_recipe_folder_is_cached(tmp_path):
    # The model folder lies outside ${output}: it is keyed by the kit stage's config, not fingerprinted
    # (it does not exist when the first run plans its stages, and does on the second).
    recipe = tmp_path / "outside.yaml"
    recipe.write_text(RECIPE.replace('"${output}/model"', f'"{tmp_path}/shared-model"')
                      .replace("model: ${output}/model", f"model: {tmp_path}/shared-model"))
    out = tmp_path / "out"
    first = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in first.stages] == [False, False] and (tmp_path / "shared-model").is_dir()
    again = run_recipe(RecipeConfig(recipe=str(recipe), output=str(out)))
    assert [s.cached for s in again.stages] == [True, True]
