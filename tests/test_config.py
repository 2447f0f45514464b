import subprocess
import sys
from dataclasses import dataclass

import pytest

from genaug.cli import build_command_parser, parse_command_args
from genaug.config import (config_from_args, config_from_dict, config_to_dict, explicit_settings, option,
                           read_config_file, same_settings)
from genaug.errors import ConfigError
from genaug.generate.synth import SynthConfig


@dataclass
class Toy:
    steps: int = option(10, "steps")
    lr: float = option(1e-4, "learning rate")
    name: str | None = option(None, "a name")
    tags: list[str] = option(help="tags", factory=list)
    flag: bool = option(False, "a flag")

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_file_and_override_round_trip(tmp_path):
    cfg_file = tmp_path / "synth.yaml"
    cfg_file.write_text("model: m\nclass_names: [a, b]\nimages_per_class: 3\nguidance_scale: 5\nseed: 1\n")
    args = parse_command_args("synth", ["--config", str(cfg_file), "--seed", "7", "--no-xformers"])
    cfg = config_from_args(SynthConfig, args)
    assert cfg.seed == 7 and cfg.images_per_class == 3 and cfg.guidance_scale == 5.0
    assert cfg.class_names == ["a", "b"] and cfg.xformers is False
    # The resolved config written to a run folder reloads to the same object.
    again = config_from_dict(SynthConfig, config_to_dict(cfg))
    assert again == cfg


def test_settings_recorded_before_an_option_existed_still_match():
    cfg = Toy(steps=3, tags=("a",))
    recorded = config_to_dict(cfg)
    assert explicit_settings(cfg) == {"steps": 3, "tags": ["a"]}  # defaults left out, JSON-normalized
    assert same_settings(recorded, cfg)
    older = {k: v for k, v in recorded.items() if k != "flag"}  # written before `flag` was added
    assert same_settings(older, cfg)
    assert not same_settings(older, Toy(steps=3, tags=["a"], flag=True))  # ... which is now set
    assert not same_settings({**recorded, "steps": 4}, cfg)
    assert not same_settings({**recorded, "removed_since": 1}, cfg)
    assert not same_settings(None, cfg) and not same_settings({k: v for k, v in recorded.items() if k != "steps"}, cfg)


@dataclass
class ToyWithChangedBehaviour(Toy):
    # `fast` was added with a default that changed what runs do; before it, they behaved as fast=True.
    fast: bool = option(False, "a new default behaviour")
    LEGACY_SETTINGS = {"fast": True}


def test_an_option_that_changed_the_behaviour_does_not_match_older_runs():
    cfg = ToyWithChangedBehaviour(steps=3)
    # At its new default it is explicit (older cache keys must stop matching); at the legacy value it is not.
    assert explicit_settings(cfg) == {"steps": 3, "fast": False}
    assert explicit_settings(ToyWithChangedBehaviour(steps=3, fast=True)) == {"steps": 3}
    older = {k: v for k, v in config_to_dict(cfg).items() if k != "fast"}  # recorded before `fast` existed
    assert not same_settings(older, cfg)
    assert same_settings(older, ToyWithChangedBehaviour(steps=3, fast=True))
    assert same_settings(config_to_dict(cfg), cfg)


def test_repeated_list_flags_add_up(tmp_path):
    cfg_file = tmp_path / "synth.yaml"
    cfg_file.write_text("model: m\nclass_names: [from-file]\nimages_per_class: 1\n")
    args = parse_command_args("synth", ["--config", str(cfg_file), "--class-names", "a", "--class-names", "b,c",
                                        "--seed", "1", "--seed", "2"])
    cfg = config_from_args(SynthConfig, args)
    # Flags replace the file's list; repeats and commas both add; a repeated scalar keeps the last.
    assert cfg.class_names == ["a", "b", "c"] and cfg.seed == 2


def test_toml_file(tmp_path):
    f = tmp_path / "toy.toml"
    f.write_text('steps = 3\ntags = ["x", "y"]\nflag = true\n')
    cfg = config_from_dict(Toy, read_config_file(f))
    assert cfg == Toy(steps=3, tags=["x", "y"], flag=True)


@pytest.mark.parametrize("data,message", [
    ({"stepz": 3}, "unknown key 'stepz'"),
    ({"steps": "three"}, "'three' is not int"),
    ({"steps": 1.5}, "1.5 is not int"),
    ({"lr": "fast"}, "is not float"),
    ({"flag": "maybe"}, "is not bool"),
    ({"tags": 5}, "is not a list of str"),
    ({"steps": -1}, "steps must be >= 0"),
    ({"steps": None}, "null is not allowed"),
])
def test_bad_values_are_one_clear_line(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(Toy, data, source="toy.yaml")
    text = str(info.value)
    assert message in text and "toy.yaml" in text and "\n" not in text


def test_optional_accepts_null():
    assert config_from_dict(Toy, {"name": "null"}).name is None
    assert config_from_dict(Toy, {"name": None}).name is None


def test_bad_yaml_is_clear(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse config"):
        read_config_file(f)
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")


def test_every_command_has_help():
    from genaug.cli import COMMANDS

    for name in COMMANDS:
        text = build_command_parser(name).format_help()
        assert "--config" in text and "default" in text


def _genaug(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "genaug.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("model: m\nclass_names: [a]\nstepz: 3\n")
    cases = [
        (["synth", "--no-such-flag"], "unrecognized arguments"),
        (["synth", "--config", str(bad_cfg)], "unknown key 'stepz'"),
        (["synth", "--class-names", "a", "--batch-size", "two"], "'two' is not int"),
        (["synth", "--class-names", "a", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")],
         "no diffusers model here"),
        (["synth", "--real-data", str(tmp_path / "missing")], "dataset folder not found"),
        (["nosuchcommand"], "invalid choice"),
    ]
    for args, message in cases:
        proc = _genaug(*args)
        assert proc.returncode != 0, args
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (args, proc.stderr)
        assert message in lines[0], (args, lines[0])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists(), "a failed run must not leave a half-written output"


def test_cli_help_and_version():
    proc = _genaug("--help")
    assert proc.returncode == 0 and "synth" in proc.stdout and "train-lora" in proc.stdout
    proc = _genaug("train-lora", "--help")
    assert proc.returncode == 0 and "--instance-data" in proc.stdout and "--with-prior-preservation" in proc.stdout
