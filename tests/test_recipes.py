import json

import pytest

from genaug.artefacts import load_hf_dataset
from genaug.errors import ConfigError
from genaug.recipes import RecipeConfig, run_recipe

RECIPE = """
name: tiny
stages:
  - name: model
    command: kit
    config: {arch: sd15, output: "${output}/model"}
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

    for recipe in sorted(RECIPE_DIRS[1].glob("*.yaml")):
        # --only with an unknown stage fails after validation, so nothing runs.
        with pytest.raises(ConfigError, match="unknown stage"):
            run_recipe(RecipeConfig(recipe=str(recipe), only=["__none__"]))


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
