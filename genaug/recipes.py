"""Declarative recipes: a YAML/TOML list of stages that ``genaug run`` executes in order.

A recipe names each stage, the command it runs and that command's config; ``${output}`` in any
string is the recipe's output folder. A stage's cache key is the hash of its command, the
settings of its resolved config that differ from the defaults, and the keys of every stage before
it: an unchanged stage is not rerun, a changed one reruns everything downstream, and an option
added to genaug later (at a default that keeps the old behaviour) leaves every cache valid.

    name: quickstart
    output: runs/quickstart
    stages:
      - name: model
        command: kit
        config: {arch: sd15, output: "${output}/model"}

A stage with ``foreach: {k: [1, 4], trial: [0, 1]}`` runs once per combination, with ``${k}`` and
``${trial}`` in its config; its instances are named ``<name>-k1-trial0`` and so on.

A recipe may declare ``variables: {data: null, model: embedded}``: ``${data}`` and ``${model}`` in
its configs, set with ``genaug run RECIPE --set data=/path/to/data``; a null default must be set.

Inputs from outside the recipe's output folder (the user's data, a model folder) enter the cache
key by a fingerprint of their files (names, sizes, modification times), so editing a dataset in
place reruns the stages that read it.

``genaug run RECIPE --jobs N`` runs up to N stages at once, each in its own process with its share
of the CPU threads and its output in ``<output>/.stages/<name>.log``. A stage waits for every
earlier stage whose output folder its config names (``${output}/world`` inside
``${output}/world/bench``); a stage without an ``output`` waits for everything before it, and
everything after waits for it. One ``genaug run`` at a time may use an output folder (a lock file
in ``.stages/`` says which process holds it); ``--dry-run`` lists which stages are cached and which
would run, without the lock and without writing anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .artefacts import atomic_write_json
from .config import config_from_dict, config_to_dict, explicit_settings, option, read_config_file
from .errors import ConfigError
from .runs import RunRecord

_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RECIPE_DIRS = (Path("pipelines"), Path(__file__).resolve().parent.parent / "pipelines")


@dataclass
class RecipeConfig:
    """Run a recipe from pipelines/ (by name or path)."""

    recipe: str = option("quickstart", "recipe name (a file in pipelines/) or a path to a YAML/TOML recipe",
                         positional=True)
    output: str | None = option(None, "output folder (default: the recipe's own `output`)")
    force: bool = option(False, "rerun every stage even if its cached result is current")
    only: list[str] = option(help="run only these stages (names), with their inputs cached", factory=list)
    set: list[str] = option(help="recipe variables as NAME=VALUE (e.g. data=/path/to/imagenet-lt), used as "
                                 "${NAME} in the recipe", factory=list)
    jobs: int = option(1, "stages to run at once, each in its own process with an equal share of the CPU "
                          "threads; a stage starts once every stage whose output it reads has finished")
    dry_run: bool = option(False, "list which stages are cached and which would run, and run nothing")

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        for item in self.set:
            if "=" not in item or not _VARIABLE.match(item.split("=", 1)[0]):
                raise ValueError(f"--set takes NAME=VALUE, got {item!r}")


@dataclass
class StageOutcome:
    name: str
    command: str
    cached: bool
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeResult:
    recipe: str
    output: Path
    stages: list[StageOutcome]
    seconds: float
    dry_run: bool = False

    def summary(self) -> str:
        """One line per stage for the terminal (each stage's full result is in its own run folder)."""
        lines = [f"  recipe: {self.recipe}", f"  output: {self.output}",
                 f"  stages: {len(self.stages)} in {self.seconds:.0f} s"]
        for s in self.stages:
            state = "cached" if s.cached else "would run" if self.dry_run else f"{s.seconds:.1f} s"
            lines.append(f"    {s.name} ({s.command}): {state}" + (f" -> {s.result['output']}"
                                                                    if s.result.get("output") else ""))
        return "\n".join(lines)


def find_recipe(recipe: str) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path
    for folder in RECIPE_DIRS:
        for suffix in (".yaml", ".yml", ".toml"):
            candidate = folder / f"{recipe}{suffix}"
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.y*ml")})
    raise ConfigError(f"recipe {recipe!r} not found", fix=f"give a path or one of: {', '.join(known) or 'none'}")


def _interpolate(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, val in variables.items():
            value = value.replace("${" + key + "}", val)
        return value
    if isinstance(value, list):
        return [_interpolate(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, variables) for k, v in value.items()}
    return value


def _recipe_variables(declared: Any, given: list[str], path: Path) -> dict[str, str]:
    """The recipe's declared variables with their defaults, overridden by ``--set NAME=VALUE``."""
    if declared is None:
        declared = {}
    if not isinstance(declared, dict) or not all(isinstance(k, str) and _VARIABLE.match(k) for k in declared):
        raise ConfigError("`variables` maps names to default values (null: must be set)", where=str(path))
    values = {k: None if v is None else str(v) for k, v in declared.items()}
    for item in given:
        name, value = item.split("=", 1)
        if name not in values:
            raise ConfigError(f"--set {name}: the recipe has no variable {name!r}", where=str(path),
                              fix=f"its variables are {sorted(values) or 'none'}")
        values[name] = value
    unset = sorted(k for k, v in values.items() if v is None)
    if unset:
        raise ConfigError(f"the recipe needs a value for {unset[0]!r}", where=str(path),
                          fix=f"rerun with --set {unset[0]}=...")
    return values  # type: ignore[return-value]


def _config_strings(settings: dict[str, Any]) -> Iterator[str]:
    """Every string in a stage's settings (nested lists and dicts included) but its own ``output``."""
    stack = [v for k, v in settings.items() if k != "output"]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())


def _path_values(settings: dict[str, Any], output: Path) -> list[str]:
    """Strings in a stage's settings that name existing files or folders outside the recipe's output."""
    found: list[str] = []
    for value in _config_strings(settings):
        if value and len(value) < 4096:
            path = Path(value)
            try:
                if path.exists() and not path.resolve().is_relative_to(output.resolve()):
                    found.append(value)
            except (OSError, ValueError):
                pass
    return sorted(set(found))


def fingerprint(path: Path, max_files: int = 500_000) -> str:
    """A hash of the names, sizes and modification times of the files under ``path``."""
    digest = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]
    count = 0
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            count += 1
            if count >= max_files:  # a huge pool: its first files stand for it
                return digest.hexdigest()[:16] + "+"
    return digest.hexdigest()[:16]


def _expand_foreach(foreach: Any, where: str) -> list[dict[str, str]]:
    """``{k: [1, 2], trial: [0, 1]}`` -> one variable binding per combination, in order (k outermost)."""
    if foreach is None:
        return [{}]
    if not isinstance(foreach, dict) or not foreach or not all(isinstance(v, list) and v for v in foreach.values()):
        raise ConfigError("`foreach` maps variable names to non-empty lists", where=where,
                          fix="e.g. foreach: {k: [1, 2, 4], trial: [0, 1]}, used as ${k} and ${trial}")
    bindings: list[dict[str, str]] = [{}]
    for key, values in foreach.items():
        bindings = [{**b, str(key): str(v)} for b in bindings for v in values]
    return bindings


def _result_dict(result: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(result):
        return json.loads(json.dumps(dataclasses.asdict(result), default=str))
    return {"result": str(result)}


def _outputs_exist(result: dict[str, Any]) -> bool:
    """A cached stage counts only while the files it reported are still there."""
    return all(Path(result[k]).exists() for k in ("output", "path", "weights") if isinstance(result.get(k), str))


def run_recipe(cfg: RecipeConfig) -> RecipeResult:
    from .cli import COMMANDS, _load

    path = find_recipe(cfg.recipe)
    recipe = read_config_file(path)
    unknown = set(recipe) - {"name", "description", "output", "stages", "variables"}
    if unknown:
        raise ConfigError(f"unknown recipe key {sorted(unknown)[0]!r}", where=str(path),
                          fix="use name, description, output, variables, stages")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("a recipe needs a non-empty `stages` list", where=str(path))
    user_variables = _recipe_variables(recipe.get("variables"), cfg.set, path)
    output = Path(cfg.output or _interpolate(str(recipe.get("output") or f"runs/{path.stem}"), user_variables))
    variables = {**user_variables, "output": str(output), "recipe_dir": str(path.parent)}

    # Validate every stage before running any, so a typo in stage 5 does not cost stages 1-4.
    planned = []
    names = set()
    for i, stage in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, dict) or set(stage) - {"name", "command", "config", "foreach"} \
                or "command" not in stage:
            raise ConfigError("each stage needs `command` and may have `name`, `config` and `foreach`", where=where)
        command = stage["command"]
        if command not in COMMANDS or command == "run":
            raise ConfigError(f"unknown command {command!r}", where=where,
                              fix=f"use one of {sorted(set(COMMANDS) - {'run'})}")
        for extra in _expand_foreach(stage.get("foreach"), where):
            name = str(stage.get("name", command)) + "".join(f"-{k}{v}" for k, v in extra.items())
            if not _STAGE_NAME.match(name):  # it names the stage's cache file
                raise ConfigError(f"stage name {name!r} is not a plain name", where=where,
                                  fix="use letters, digits, '_', '-' and '.'")
            if name in names:
                raise ConfigError(f"duplicate stage name {name!r}", where=where)
            names.add(name)
            config = config_from_dict(_load(COMMANDS[command].config),
                                      _interpolate(stage.get("config") or {}, {**variables, **extra}),
                                      source=f"{where} ({name})")
            planned.append((name, command, config))
    missing = set(cfg.only) - names
    if missing:
        raise ConfigError(f"--only names unknown stage {sorted(missing)[0]!r}", fix=f"stages are {sorted(names)}")

    if cfg.dry_run:  # read-only: no lock (a running recipe may hold it), nothing written
        done, todo = _check_caches(planned, cfg, output, rewrite_legacy_keys=False)
        for stage in todo:
            print(f"[{stage.name}] {stage.command}: would run")
        pending = {stage.name for stage in todo}
        outcomes = [done.get(name) or StageOutcome(name, command, False, 0.0)
                    for name, command, _ in planned if name in done or name in pending]
        return RecipeResult(str(path), output, outcomes, 0.0, dry_run=True)

    with _OutputLock(output):
        record = RunRecord.start(output / "run", "run", cfg)
        t0 = time.time()
        done, todo = _check_caches(planned, cfg, output, rewrite_legacy_keys=True)
        if cfg.jobs > 1 and len(todo) > 1:
            _run_parallel(todo, cfg.jobs, done)
        else:
            for stage in todo:
                print(f"[{stage.name}] {stage.command}: running")
                s0 = time.time()
                result = _load(COMMANDS[stage.command].run)(stage.config)
                done[stage.name] = stage.finish(_result_dict(result), time.time() - s0)
        outcomes = [done[name] for name, _, _ in planned if name in done]
        result = RecipeResult(str(path), output, outcomes, round(time.time() - t0, 3))
        for outcome in outcomes:
            if isinstance(outcome.result.get("html"), str):
                print(f"report: {outcome.result['html']} (Markdown: {outcome.result.get('markdown')})")
        record.finish({"stages": [dataclasses.asdict(o) for o in outcomes]})
    return result


def _check_caches(planned: list[tuple[str, str, Any]], cfg: RecipeConfig, output: Path,
                  rewrite_legacy_keys: bool) -> tuple[dict[str, StageOutcome], list["_PendingStage"]]:
    """Split the planned stages into cached ones (with their recorded results) and ones to run."""
    done: dict[str, StageOutcome] = {}
    todo: list[_PendingStage] = []
    chain = hashlib.sha256(b"genaug-recipe-explicit")
    # Keys written before 2026-12-01 hashed every field, defaults included; still accepted (and
    # rewritten) while the fields are the same, so that older runs stay cached.
    legacy_chain = hashlib.sha256(b"genaug-recipe")
    produced: list[Path] = []  # earlier stages' outputs: in the key through their configs, not their files
    for name, command, config in planned:
        settings = config_to_dict(config)
        inputs = {value: fingerprint(Path(value)) for value in _path_values(settings, output)
                  if not any(Path(value).resolve().is_relative_to(p) for p in produced)}
        if isinstance(settings.get("output"), str) and settings["output"].strip("/"):
            produced.append(Path(settings["output"]).resolve())
        explicit = {"command": command, "config": explicit_settings(config), "inputs": inputs}
        if hasattr(config, "delegated_settings"):  # stages that run another command's config (fewshot)
            explicit["delegated"] = config.delegated_settings()
        chain.update(json.dumps(explicit, sort_keys=True).encode())
        legacy_chain.update(json.dumps({"command": command, "config": settings, "inputs": inputs},
                                       sort_keys=True).encode())
        key = chain.hexdigest()
        cache_file = output / ".stages" / f"{name}.json"
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() else None
        skip = cfg.only and name not in cfg.only
        current = cached is not None and cached.get("key") in (key, legacy_chain.hexdigest()) \
            and _outputs_exist(cached.get("result", {}))
        if current and cached["key"] != key and rewrite_legacy_keys:
            atomic_write_json(cache_file, {**cached, "key": key})
        if (not cfg.force and current) or (skip and cached):
            done[name] = StageOutcome(name, command, True, 0.0, cached.get("result", {}))
            print(f"[{name}] {command}: cached")
        elif skip:  # not asked for and never run: leave it (a stage that needs it reports what is missing)
            print(f"[{name}] {command}: skipped (not in --only)")
        else:
            todo.append(_PendingStage(name, command, config, key, cache_file))
    return done, todo


# ---------------------------------------------------------------------------- running stages
@dataclass
class _PendingStage:
    name: str
    command: str
    config: Any
    key: str
    cache_file: Path

    @property
    def outputs(self) -> list[str]:
        value = getattr(self.config, "output", None)
        return [value.rstrip("/")] if isinstance(value, str) and value.strip("/") else []

    def reads(self, folder: str) -> bool:
        """Whether any string in this stage's config (its own output aside) names ``folder`` or a path
        in it; strings are split at ',', ';', '=' and spaces (report specs read "name=path,path"). A
        pattern such as ``datasets/text-k{k}-t{trial}`` (fewshot's extra_patterns) names every folder
        it can expand to."""
        target = Path(folder).resolve()
        for value in _config_strings(config_to_dict(self.config)):
            for piece in re.split(r"[,;=\s]+", value):
                if piece and len(piece) < 4096:
                    try:
                        path = Path(piece).resolve()
                        if path.is_relative_to(target) or (_FIELD.search(piece) and _expands_into(path, target)):
                            return True
                    except (OSError, ValueError):
                        pass
        return False

    def finish(self, result: dict[str, Any], seconds: float) -> StageOutcome:
        """Record the stage as current (its cache file), and return its outcome."""
        atomic_write_json(self.cache_file, {"key": self.key, "command": self.command,
                                            "config": config_to_dict(self.config), "result": result})
        return StageOutcome(self.name, self.command, False, round(seconds, 3), result)


_FIELD = re.compile(r"\{\w+\}")


def _expands_into(pattern: Path, folder: Path) -> bool:
    """Whether some expansion of ``pattern`` (each ``{name}`` any text within one path part) is
    ``folder`` or a path inside it."""
    if len(pattern.parts) < len(folder.parts):
        return False
    for part, wanted in zip(pattern.parts, folder.parts):
        regex = "[^/]*".join(re.escape(text) for text in _FIELD.split(part))
        if not re.fullmatch(regex, wanted):
            return False
    return True


def stage_dependencies(stages: list[_PendingStage]) -> dict[str, set[str]]:
    """For each stage, the earlier stages it must wait for: those whose output folder its config
    names. A stage without an output is a barrier: it waits for all earlier ones, all later wait for it."""
    needs: dict[str, set[str]] = {}
    for i, stage in enumerate(stages):
        earlier = stages[:i]
        if not stage.outputs:
            needs[stage.name] = {s.name for s in earlier}
            continue
        needs[stage.name] = {s.name for s in earlier
                             if not s.outputs or any(stage.reads(folder) for folder in s.outputs)}
    return needs


def _worker_threads(jobs: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def _run_stage_in_worker(command: str, config: Any, log_path: str, threads: int) -> tuple[str, Any]:
    """A stage in a fresh process: its output (progress bars included) goes to ``log_path``.
    Returns ("ok", result dict) or ("error", (error class name, one line))."""
    import sys
    import traceback

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.setdefault("TQDM_MININTERVAL", "5")  # a bar redrawn 10x a second makes a big log
    import torch

    torch.set_num_threads(threads)
    from .cli import COMMANDS, _load
    from .errors import GenaugError, unexpected_error

    try:
        return "ok", _result_dict(_load(COMMANDS[command].run)(config))
    except GenaugError as exc:
        print(f"error: {exc.one_line()}", flush=True)
        return "error", (type(exc).__name__, exc.one_line())
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line, traceback in the log
        traceback.print_exc()
        sys.stderr.flush()
        error = unexpected_error(exc)
        return "error", (type(error).__name__, error.one_line())


def _run_parallel(todo: list[_PendingStage], jobs: int, done: dict[str, StageOutcome]) -> None:
    """Run ``todo`` on ``jobs`` worker processes, each stage once its dependencies have finished.
    On a failure no new stage starts; the running ones finish (and are cached), then the error is raised."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from . import errors

    needs = stage_dependencies(todo)
    threads = _worker_threads(jobs)
    waiting = list(todo)
    running: dict[Any, tuple[_PendingStage, float, Path]] = {}
    failure: tuple[_PendingStage, str, str, Path] | None = None
    print(f"running {len(todo)} stages, up to {jobs} at once ({threads} threads each)")
    # One process per stage (max_tasks_per_child=1): each starts with fresh memory and thread settings.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        try:
            while waiting or running:
                if failure is None:
                    for stage in list(waiting):
                        if len(running) >= jobs:
                            break
                        if needs[stage.name] <= set(done):
                            log = stage.cache_file.with_suffix(".log")
                            log.parent.mkdir(parents=True, exist_ok=True)
                            future = pool.submit(_run_stage_in_worker, stage.command, stage.config, str(log), threads)
                            running[future] = (stage, time.time(), log)
                            waiting.remove(stage)
                            print(f"[{stage.name}] {stage.command}: running (log: {log})")
                elif not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    stage, s0, log = running.pop(future)
                    try:
                        status, payload = future.result()
                    except Exception as exc:  # the worker process died (killed, out of memory)
                        status, payload = "error", ("GenaugError", f"its process died: {type(exc).__name__}: {exc}")
                    if status == "ok":
                        done[stage.name] = stage.finish(payload, time.time() - s0)
                        print(f"[{stage.name}] {stage.command}: done in {time.time() - s0:.0f} s")
                    elif failure is None:
                        failure = (stage, *payload, log)
                        wait_note = f"; waiting for {len(running)} running stage(s) to finish" if running else ""
                        print(f"[{stage.name}] failed{wait_note}")
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            for process in list(getattr(pool, "_processes", {}).values()):  # every stage resumes when rerun
                process.terminate()
            raise
    if failure is not None:
        stage, kind, line, log = failure
        cls = getattr(errors, kind, errors.GenaugError)
        if not (isinstance(cls, type) and issubclass(cls, errors.GenaugError)):
            cls = errors.GenaugError
        raise cls(f"stage {stage.name} ({stage.command}) failed: {line}", fix=f"see {log}, then rerun to resume")


class _OutputLock:
    """An exclusive lock on a recipe's output folder, so two runs never write the same stages."""

    def __init__(self, output: Path):
        self.path = output / ".stages" / "lock"
        self.handle = None

    def __enter__(self) -> "_OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            self.handle = None
            raise ConfigError(f"another `genaug run` ({holder}) is using {self.path.parent.parent}",
                              fix="wait for it to finish, or give this run another --output "
                                  "(--jobs N runs stages in parallel within one run)") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the lock
            self.handle = None
