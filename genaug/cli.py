"""``genaug``: one command-line entry with a subcommand per stage.

Each subcommand is a config dataclass plus a function ``run(config) -> result``; flags are made
from the dataclass fields, so ``--help`` lists every setting with its type and default. Only the
chosen subcommand's module is imported, which keeps ``genaug --help`` instant.

Errors the user can fix print as one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import DiskFullError, GenaugError, close_progress_bars, unexpected_error


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function(config) -> result"


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("world", "generate the procedural world: pretraining pool, benchmark, few-shot and novel-concept sets",
            "genaug.world:WorldConfig", "genaug.world:build_world"),
    Command("pretrain", "train, measure and card the embedded model family on a world",
            "genaug.pretrain.run:PretrainConfig", "genaug.pretrain.run:pretrain"),
    Command("kit", "build a tiny random model (sd15, unclip, sdxl, clip) as a diffusers folder",
            "genaug.models.kit:KitConfig", "genaug.models.kit:save_kit_model"),
    Command("train-lora", "DreamBooth-LoRA: fine-tune a LoRA adapter on a few images of a concept",
            "genaug.personalize.lora:LoraTrainConfig", "genaug.personalize.lora:train_lora"),
    Command("train-ti", "textual inversion: learn new token embeddings for a concept (optionally with a LoRA: "
            "pivotal tuning)", "genaug.personalize.textual_inversion:TextualInversionConfig",
            "genaug.personalize.textual_inversion:train_textual_inversion"),
    Command("eval-personalization", "score adapters on their concept: CLIP-I, CLIP-T, feature similarity, oracle "
            "accuracy, against the base model", "genaug.personalize.evaluate:EvalPersonalizationConfig",
            "genaug.personalize.evaluate:evaluate_personalization"),
    Command("train-multiconcept", "DisenDiff: several concepts from one image, modifier tokens + cross-attention "
            "K/V with attention calibration", "genaug.personalize.multiconcept:MultiConceptConfig",
            "genaug.personalize.multiconcept:train_multiconcept"),
    Command("merge-lora", "merge LoRA adapters: exact weighted sum (linear) or ZipLoRA's learned per-column merge",
            "genaug.personalize.merge:MergeLoraConfig", "genaug.personalize.merge:merge_lora"),
    Command("synth", "generate a synthetic training set with a diffusion model",
            "genaug.generate.synth:SynthConfig", "genaug.generate.synth:synthesize"),
    Command("index", "embed an image pool and index it with faiss (`genaug index build`, `genaug index info`)",
            "genaug.retrieve.index:IndexConfig", "genaug.retrieve.index:build_index"),
    Command("retrieve", "retrieve per-class images from an indexed pool (the retrieval baseline)",
            "genaug.retrieve.retrieve:RetrieveConfig", "genaug.retrieve.retrieve:retrieve"),
    Command("train-classifier", "train a classifier on real (+ synthetic/retrieved) data; score overall, per "
            "class and per many/medium/few bucket", "genaug.evaluate.classifier:ClassifierConfig",
            "genaug.evaluate.classifier:train_classifier"),
    Command("fewshot", "k-shot protocol: a classifier per (k, trial) split, test accuracy mean and 95% CI per k",
            "genaug.evaluate.protocols:FewShotConfig", "genaug.evaluate.protocols:run_fewshot"),
    Command("kshot", "draw k-shot training splits (k images per class, several trials) from a dataset",
            "genaug.evaluate.protocols:KShotConfig", "genaug.evaluate.protocols:make_kshot_splits"),
    Command("filter", "score a synthetic dataset (CLIP score, classifier confidence, test near-duplicates); keep "
            "and weight", "genaug.generate.filtering:FilterConfig", "genaug.generate.filtering:filter_dataset"),
    Command("report", "compare methods side by side: long-tail and few-shot tables with intervals, plots, samples, "
            "generation metrics (Markdown + one self-contained HTML page)", "genaug.evaluate.report:ReportConfig",
            "genaug.evaluate.report:build_report"),
    Command("run", "run a recipe (pipelines/*.yaml) stage by stage, reusing unchanged stages",
            "genaug.recipes:RecipeConfig", "genaug.recipes:run_recipe"),
]}


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line plus a pointer to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def build_command_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    from .config import add_config_arguments

    command = COMMANDS[name]
    parser = OneLineParser(prog=prog or f"genaug {name}", description=command.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    add_config_arguments(parser, _load(command.config))
    return parser


def parse_command_args(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    args = build_command_parser(name, prog).parse_args(argv)
    args.command = name
    return args


def summarize(result: Any) -> str:
    if callable(getattr(result, "summary", None)):
        return result.summary()
    if dataclasses.is_dataclass(result):
        data = dataclasses.asdict(result)
    else:
        data = {"result": result}
    return "\n".join(f"  {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
                     for k, v in data.items())


def run_command(name: str, args: argparse.Namespace) -> int:
    """Resolve the config, run the stage, print its result; one-line errors unless --debug."""
    from .config import config_from_args

    command = COMMANDS[name]
    debug = getattr(args, "debug", False)
    try:
        config = config_from_args(_load(command.config), args)
        result = _load(command.run)(config)
    except GenaugError as exc:
        if debug:
            raise
        close_progress_bars()  # a bar left open mid-line would swallow the start of the error
        sys.stderr.write(f"genaug {name}: error: {exc.one_line()}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        close_progress_bars()
        sys.stderr.write(f"genaug {name}: interrupted; rerun the same command to resume\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: still one line, traceback on --debug
        if debug:
            raise
        close_progress_bars()
        error = unexpected_error(exc)
        if isinstance(error, DiskFullError):  # every stage resumes: a full disk is the user's to fix
            sys.stderr.write(f"genaug {name}: error: {error.one_line()}\n")
        else:
            sys.stderr.write(f"genaug {name}: {error.one_line()} (rerun with --debug for the traceback)\n")
        return error.exit_code
    print(f"genaug {name}: done")
    print(summarize(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = OneLineParser(prog="genaug", description="Diffusion-based generative data augmentation and personalization.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="commands:\n" + "\n".join(f"  {c.name:<14} {c.help}" for c in COMMANDS.values())
                        + "\n\nRun 'genaug <command> --help' for a command's settings.")
    top.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="command")
    top.add_argument("--version", action="store_true", help="print genaug's version")
    top.add_argument("--allow-pickle", action="store_true",
                     help="also load pickle checkpoints (.bin/.pt/.ckpt), through torch.load(weights_only=True); "
                          "by default genaug loads safetensors only")
    # Only the first token picks the command; the rest belongs to the command's own parser.
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    head, rest = argv[: split + 1], argv[split + 1 :]
    ns = top.parse_args(head)
    if ns.version:
        from . import __version__

        print(__version__)
        return 0
    if ns.command is None:
        top.print_help()
        return 0 if not argv else 2
    args = parse_command_args(ns.command, rest)
    if not ns.allow_pickle:
        return run_command(ns.command, args)
    from .artefacts import ALLOW_PICKLE_ENV

    previous = os.environ.get(ALLOW_PICKLE_ENV)
    os.environ[ALLOW_PICKLE_ENV] = "1"  # seen by every loader, and by recipe stages run in this process
    try:
        return run_command(ns.command, args)
    finally:
        if previous is None:
            os.environ.pop(ALLOW_PICKLE_ENV, None)
        else:
            os.environ[ALLOW_PICKLE_ENV] = previous


def script_entry(name: str, argv: Sequence[str] | None = None) -> int:
    """For the thin top-level scripts (train_lora.py, synth.py)."""
    return run_command(name, parse_command_args(name, argv, prog=Path(sys.argv[0]).name))


if __name__ == "__main__":
    sys.exit(main())
