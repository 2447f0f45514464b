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
