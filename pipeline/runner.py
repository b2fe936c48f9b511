"""Stage orchestration: run directory, lock, resolved config.yaml, done.json skip / rerun, summary.

A stage is skipped when its done.json holds the same config hash (its recipe sections plus its input stages'
config hashes) and the same input fingerprints (its input stages' done.json) and its outputs still exist.
Otherwise it reruns, and since its done.json changes, so does every stage that reads it. done.json is
written last and atomically, so nothing half-written is ever marked done. Only the main process writes.

Before any stage runs, `preflight` checks what the planned stages will read (data sources, evaluation texts,
the teacher spec, a DeepSpeed JSON), so a typo fails in a second instead of after the teacher loads.
With `extend=True` a finished training stage whose config differs only in `<stage>.train.steps` (raised)
continues from its last checkpoint instead of starting over (see `Runner.extension`).
Every attempt at a stage appends its seconds to `<stage>/attempts.jsonl`; done.json's `wall_seconds` is
their sum, so a stage interrupted and resumed reports all the time it took.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipeline import checkpoint as ckpt
from pipeline.errors import ConfigError, PipelineError, StageError
from pipeline.provenance import code_version
from pipeline.recipe import did_you_mean, diff_keys, recipe_to_dict, recipe_to_yaml, stable_hash, to_plain
from pipeline.schema import Recipe, TrainConfig
from pipeline.stages import SPECS, STAGE_ORDER, StageContext, StageResult, get_stage

LOG = logging.getLogger("spikedistill")


# ----------------------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temp file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_done(stage_dir: Path) -> dict | None:
    """The stage's done.json as a dict, or None when absent or unreadable (then the stage is not done)."""
    done = _read_json(Path(stage_dir) / "done.json")
    return done if done is not None and "config_hash" in done else None


def done_fingerprint(done: dict) -> str:
    """Identity of one finished run of a stage: changes whenever that stage reruns."""
    return stable_hash({k: done.get(k) for k in ("config_hash", "inputs", "outputs", "finished_at", "run_id")})


# ------------------------------------------------------------------------------------------------ lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file `run_dir/lock` holding "pid host"; a lock left by a dead local pid is taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "lock"
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return
        raise PipelineError(f"{self.path}: could not take the run lock; remove the file if no run is active")

    def _take_over_if_stale(self) -> None:
        try:
            pid_text, _, host = self.path.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            raise PipelineError(f"{self.path}: unreadable lock file; remove it if no run is active") from None
        if host == socket.gethostname() and not _pid_alive(pid):
            LOG.warning("taking over a stale lock %s left by dead pid %d", self.path, pid)
            self.path.unlink(missing_ok=True)
            return
        raise PipelineError(f"{self.path.parent} is in use by pid {pid} on {host}; wait for that run to end, "
                            f"or delete {self.path} if it is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------------------- accelerator
def _deepspeed_dict(recipe: Recipe, train: TrainConfig | None) -> dict:
    path = Path(recipe.distributed.deepspeed_config or "")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"distributed.deepspeed_config: cannot read {path} as JSON ({exc.__class__.__name__}); "
                          "point it at recipes/deepspeed/zero2.json or similar") from None
    if train is not None:
        # DeepSpeed needs these numbers itself; "auto" is resolved from the stage's train section
        fill = {"train_micro_batch_size_per_gpu": train.batch_size,
                "gradient_accumulation_steps": train.grad_accum, "gradient_clipping": train.optim.grad_clip}
        for key, value in fill.items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
        if ds.get("train_batch_size") == "auto":
            ds.pop("train_batch_size")  # derived by DeepSpeed from micro batch x accumulation x world
    return ds


def _no_deepspeed_shm_op() -> None:
    """Stop DeepSpeed JIT-compiling its shared-memory all-reduce on CPU (minutes on a small box); it then
    uses plain gloo collectives."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_accelerator(recipe: Recipe, train: TrainConfig | None = None):
    """An Accelerator for the recipe's distributed section (CPU + gloo when CUDA is absent).

    strategy auto/ddp/none take what the launcher set up; deepspeed passes the recipe's JSON (with "auto"
    fields filled from `train`); fsdp is applied by the trainer (FSDP2) unless `accelerate launch` set it up.
    """
    import torch
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    dist = recipe.distributed
    cuda = torch.cuda.is_available()
    # a process group only exists under a multi-process launcher; asking for a backend without one fails
    backend = (dist.backend or (None if cuda else "gloo")) if _world()[1] > 1 else None
    kwargs: dict[str, Any] = {
        "cpu": not cuda,
        "mixed_precision": dist.mixed_precision,
        "kwargs_handlers": [InitProcessGroupKwargs(backend=backend)] if backend else None,
    }
    if dist.strategy == "deepspeed":
        # Each stage brings its own DeepSpeed config (micro batch, accumulation, clipping), and accelerate
        # refuses a second Accelerator with a deepspeed_plugin in one process: stages run one after the other,
        # so the previous stage's state goes (the process group, held by PartialState, stays).
        AcceleratorState._reset_state()
        GradientState._reset_state()
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=_deepspeed_dict(recipe, train))
        kwargs["cpu"] = False  # accelerate drops the DeepSpeed plugin under cpu=True; without CUDA it uses the CPU
        if not cuda:
            _no_deepspeed_shm_op()
    return Accelerator(**kwargs)


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


# ------------------------------------------------------------------------------------------------ plan
def stage_config_hash(recipe: Recipe, name: str) -> str:
    """Hash of the stage's own recipe sections and, recursively, its input stages' config hashes."""
    spec = SPECS[name]
    upstream = {need: stage_config_hash(recipe, need) for need in spec.needs(recipe)}
    return stable_hash({"stage": name, "sections": spec.sections(recipe), "upstream": upstream})


def plan_stages(recipe: Recipe, requested: list[str] | None) -> list[str]:
    """The stages to run, in pipeline order: `requested` ones, or every enabled stage."""
    if not requested:
        return [s for s in STAGE_ORDER if SPECS[s].enabled(recipe)]
    for name in requested:
        if name not in SPECS:
            raise ConfigError(f"--stages: unknown stage {name!r};{did_you_mean(name, STAGE_ORDER)} stages are "
                              f"{','.join(STAGE_ORDER)}")
        if not SPECS[name].enabled(recipe):
            key = "teacher_cache.enabled" if name == "teacher_cache" else f"{name}.enabled"
            raise ConfigError(f"--stages asks for {name} but {key} is false; set {key}=true")
    return [s for s in STAGE_ORDER if s in requested]


@dataclass
class StageSummary:
    """One row of the end-of-run summary."""

    name: str
    status: str  # "ran" or "skipped"
    reason: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


def _with_schema_defaults(old: dict, defaults: dict) -> dict:
    """A config.yaml written by an earlier version, with every key the schema gained since at its default (a key
    added with a default that keeps the old behaviour is not a change of the run's config)."""
    out = dict(old)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_schema_defaults(out[key], value)
    return out


def _check_config(run_dir: Path, recipe: Recipe, resume: bool, force: bool) -> None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8 text
        old = None
    old = _with_schema_defaults(old, to_plain(recipe_to_dict(Recipe()))) if isinstance(old, dict) else {}
    changed = diff_keys(old, to_plain(recipe_to_dict(recipe)))
    if not changed:
        return
    shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
    if not (resume or force):
        longer = ("--extend to continue training from the last checkpoint, " if
                  all(k.endswith(".train.steps") for k in changed) else "")
        raise ConfigError(f"{path}: this run directory was made with a different config (changed: {shown}); "
                          f"pass {longer}--resume to continue it with the new config (changed stages rerun), "
                          "--force to rerun every stage, or --run-dir for a new directory")
    LOG.info("config changed (%s); continuing because of %s", shown, "--force" if force else "--resume")


def _check_eval_texts(recipe: Recipe) -> None:
    from teachers.data import BUNDLED_EVAL

    for name in recipe.evaluate.texts:
        if Path(name).expanduser().is_file() or name.lower() in BUNDLED_EVAL:
            continue
        raise ConfigError(f"evaluate.texts: {name!r} is neither a file nor a bundled held-out text "
                          f"({', '.join(BUNDLED_EVAL)});{did_you_mean(name, BUNDLED_EVAL)} give a path to a UTF-8 "
                          "text file")


def _check_eval_tasks(recipe: Recipe) -> None:
    """evaluate.tasks: local names are read from eval/tasks/*.yaml (no lm-eval import); only other names are
    looked up in lm-eval's registry (seconds, but before training rather than after it)."""
    import re

    import eval as eval_package
    from eval import EvalError

    local = {m.group(1) for f in (Path(eval_package.__file__).parent / "tasks").glob("*.yaml")
             for m in re.finditer(r"^(?:task|group): *(\w+)", f.read_text(encoding="utf-8"), flags=re.MULTILINE)}
    other = [t for t in recipe.evaluate.tasks if t not in local]
    if not other:
        return
    from eval.harness import task_manager_for

    try:
        task_manager_for(other)
    except EvalError:
        hint = "".join(did_you_mean(t, local) for t in other)
        raise ConfigError(f"evaluate.tasks: unknown task(s) {', '.join(other)};{hint} local tasks: "
                          f"{', '.join(sorted(local))} (or any lm-eval task name)") from None


def _check_student_vocab(recipe: Recipe) -> None:
    """A derived student.vocab fits the teacher's tokenizer (byte-level BPE; subset:N within its size range):
    loads the teacher's tokenizer (not its weights) only then. ConfigError naming student.vocab."""
    from teachers.errors import TeacherError
    from teachers.vocab import check_size, parse_vocab

    if parse_vocab(recipe.student.vocab).is_teacher:
        return
    from pipeline.stages.prepare import load_tokenizer

    tokenizer = load_tokenizer(recipe.teacher.spec, recipe.teacher.trust_remote_code)
    try:
        check_size(tokenizer, recipe.student.vocab)
    except TeacherError as exc:
        raise ConfigError(str(exc)) from None


def preflight(recipe: Recipe, planned: list[str], prepare_runs: bool, fresh: list[str] | None = None) -> None:
    """Check, before any stage runs, the files the planned stages will read.

    prepare_runs: whether prepare will (re)run; then data.sources are checked (teachers.data.check_sources:
    every file exists and is readable as what it claims, the text field is there) and the teacher spec
    (teachers.check_spec: a path exists, a bundled alias is installed), and a derived student.vocab against the
    teacher's tokenizer. fresh: the planned stages not already done with this config (default: all); for those
    that run the teacher or train, pipeline.preflight checks the launcher, the teacher against the recipe
    (positions, width for init_from_teacher; a Hub id must be reachable or cached) and the memory they need.
    Raises ConfigError, DataError or TeacherError naming the key
    or file. evaluate.texts and evaluate.tasks are checked when evaluate is planned.
    """
    from pipeline.preflight import check_launcher, check_teacher_stages
    from teachers import check_spec
    from teachers.data import check_sources

    fresh = planned if fresh is None else fresh
    check_launcher(recipe, fresh)
    if prepare_runs:
        check_spec(recipe.teacher.spec)
        check_sources(list(recipe.data.sources), recipe.data.text_field)
        _check_student_vocab(recipe)
    check_teacher_stages(recipe, fresh)
    if "evaluate" in planned:
        _check_eval_texts(recipe)
        _check_eval_tasks(recipe)
    if recipe.distributed.strategy == "deepspeed" and any(SPECS[s].training for s in planned):
        _deepspeed_dict(recipe, None)


class Runner:
    """Runs the planned stages of one recipe in one run directory (see module docstring)."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, force: bool = False, extend: bool = False):
        self.recipe = recipe
        self.run_dir = Path(run_dir).resolve()
        self.force = force
        self.extend = extend
        self.rank, self.world = _world()
        self.is_main = self.rank == 0
        self.accelerator = None

    def upstream_of(self, name: str, planned: list[str]) -> dict[str, dict]:
        """done.json of each input stage; a missing or outdated one that is not planned is an error."""
        upstream = {}
        for need in SPECS[name].needs(self.recipe):
            done = read_done(self.run_dir / need)
            if done is None:
                raise StageError(f"stage {name} needs stage {need}, which has not run "
                                 f"({self.run_dir / need / 'done.json'} missing); add {need} to --stages "
                                 "or run without --stages")
            if need not in planned and done["config_hash"] != stage_config_hash(self.recipe, need):
                raise StageError(f"stage {name} needs stage {need}, whose done.json does not match this recipe; "
                                 f"add {need} to --stages so it reruns first")
            upstream[need] = done
        return upstream

    def decide(self, name: str, config_hash: str, inputs: dict[str, str], sections: dict) -> str | None:
        """None to skip the stage, else the reason it runs."""
        done = read_done(self.run_dir / name)
        if self.force:
            return "--force"
        if done is None:
            started = _read_json(self.run_dir / name / "stage.json")
            if started is None:
                return "not run yet"
            same = (started.get("config_hash"), started.get("inputs")) == (config_hash, inputs)
            return "resuming" if same else "config changed since the interrupted attempt; starting clean"
        keys = diff_keys(done.get("config", {}), sections)
        if keys:
            return "config changed: " + ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        changed = [n for n in inputs if done.get("inputs", {}).get(n) != inputs[n]]
        if changed:
            return "input changed: " + ", ".join(changed)
        if done["config_hash"] != config_hash:
            return "config changed: stage definition"
        missing = [k for k, p in done.get("outputs", {}).items() if not Path(p).exists()]
        if missing:
            return "output missing: " + ", ".join(missing)
        return None

    def extension(self, name: str, inputs: dict[str, str], sections: dict) -> dict | None:
        """With --extend: how a finished training stage continues, or None when it cannot.

        It can when its done.json has the same inputs and differs from `sections` only in
        `<name>.train.steps`, which grew. The trainer then resumes from the newest checkpoint (written with
        the old config) and follows the learning-rate schedule of the new step count from that step on.
        Returns {"config_hash": the old hash, "from_step", "to_step"}; ConfigError when no checkpoint is left.
        """
        done = read_done(self.run_dir / name)
        if not (self.extend and SPECS[name].training and done is not None and done.get("inputs") == inputs):
            return None
        if diff_keys(done.get("config", {}), sections) != [f"{name}.train.steps"]:
            return None
        old_steps = int(done["config"][name]["train"]["steps"])
        new_steps = getattr(self.recipe, name).train.steps
        old_recipe = copy.deepcopy(self.recipe)
        getattr(old_recipe, name).train.steps = old_steps
        if stage_config_hash(old_recipe, name) != done["config_hash"]:
            return None
        if new_steps < old_steps:
            raise ConfigError(f"--extend: {name}.train.steps went down from {old_steps} to {new_steps}; a run "
                              f"cannot be shortened from a checkpoint: rerun without --extend to train {new_steps} "
                              "steps from step 0")
        found = ckpt.list_checkpoints(self.run_dir / name / "checkpoints")
        if not found:
            raise ConfigError(f"--extend: {self.run_dir / name / 'checkpoints'} holds no checkpoint to continue "
                              f"{name} from; rerun without --extend to train it from step 0")
        return {"config_hash": done["config_hash"], "from_step": found[-1][0], "to_step": new_steps}

    def _grew(self, name: str) -> bool:
        """Whether the recipe asks a finished training stage for more steps than it ran."""
        done = read_done(self.run_dir / name) or {}
        old = done.get("config", {}).get(name, {}).get("train", {}).get("steps")
        return isinstance(old, int) and getattr(self.recipe, name).train.steps > old

    def _prepare_dir(self, name: str, started: dict) -> Path:
        """Make the stage folder ready: keep it only to resume the same config (or to extend), else start
        clean."""
        stage_dir = self.run_dir / name
        marker = stage_dir / "stage.json"
        old = _read_json(marker) or {}
        same = (old.get("config_hash"), old.get("inputs")) == (started["config_hash"], started["inputs"])
        same = same or started.get("extends") is not None
        (stage_dir / "done.json").unlink(missing_ok=True)
        if stage_dir.exists() and (self.force or not same):
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, started)
        return stage_dir

    def check_resume_world(self, planned: list[str]) -> None:
        """StageError, before anything is written, when a planned training stage would resume a checkpoint
        written by another number of processes (pipeline.trainer.world_mismatch). A stage that will be
        skipped (done with this config) or start over (its checkpoints are of another config) is not
        resuming anything."""
        from pipeline.trainer import world_mismatch

        for name in (s for s in planned if SPECS[s].training and not self.force):
            current = stage_config_hash(self.recipe, name)
            done = read_done(self.run_dir / name) or {}
            if done.get("config_hash") == current:
                continue
            found = ckpt.load_latest(self.run_dir / name / "checkpoints")
            resumable = {current, done.get("config_hash")} if self.extend else {current}
            if found is None or found.trainer_state.get("config_hash") not in resumable:
                continue
            problem = world_mismatch(found, self.world, getattr(self.recipe, name).train, name)
            if problem:
                raise StageError(problem)

    def _accelerator_for(self, name: str):
        if SPECS[name].training or self.world > 1:
            train = getattr(self.recipe, name).train if SPECS[name].training else None
            self.accelerator = make_accelerator(self.recipe, train)
        return self.accelerator if SPECS[name].training else None

    def run_stage(self, name: str, planned: list[str]) -> StageSummary:
        """Skip or run one stage; on success the main process writes its done.json last."""
        upstream = self.upstream_of(name, planned)
        config_hash = stage_config_hash(self.recipe, name)
        inputs = {n: done_fingerprint(d) for n, d in upstream.items()}
        sections = to_plain(SPECS[name].sections(self.recipe))
        reason = self.decide(name, config_hash, inputs, sections)
        if reason is None:
            done = read_done(self.run_dir / name) or {}
            LOG.info("[%s] skipped: done and unchanged", name)
            return StageSummary(name, "skipped", "unchanged", 0.0, done.get("metrics", {}))
        extends = None if self.force else self.extension(name, inputs, sections)
        if extends is not None:
            reason = (f"--extend: continuing from step {extends['from_step']} to {extends['to_step']} "
                      "(learning-rate schedule of the new step count)")
        elif reason == "resuming":  # an interrupted extension keeps accepting the checkpoints it started from
            extends = (_read_json(self.run_dir / name / "stage.json") or {}).get("extends")
        elif SPECS[name].training and reason == f"config changed: {name}.train.steps" and self._grew(name):
            reason += " (from step 0; --extend continues from the last checkpoint instead)"
        LOG.info("[%s] running (%s)", name, reason)
        accelerator = self._accelerator_for(name)
        stage_dir = self.run_dir / name
        if self.is_main:
            started = {"stage": name, "config_hash": config_hash, "inputs": inputs,
                       "started_at": _now(), "extends": extends}
            stage_dir = self._prepare_dir(name, started)
        _barrier()
        ctx = StageContext(recipe=self.recipe, run_dir=self.run_dir, stage_dir=stage_dir, upstream=upstream,
                           accelerator=accelerator, is_main=self.is_main,
                           log=logging.getLogger(f"spikedistill.{name}"),
                           accept_checkpoints=(extends["config_hash"],) if extends else ())
        t0 = time.perf_counter()
        try:
            result = get_stage(name)(ctx) if (SPECS[name].training or self.is_main) else None
        except OSError as exc:  # disk full, quota, permissions: one line, and the stage stays not done
            where = exc.filename or stage_dir
            raise StageError(f"stage {name}: {exc.strerror or exc} on {where}; free disk space or fix the path "
                             "or its permissions, then rerun the same command (nothing was marked done)") from exc
        finally:
            if self.is_main:
                _log_attempt(stage_dir, time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        _barrier()
        if self.is_main:
            self._finish(name, stage_dir, result, config_hash, inputs, sections, seconds)
        _barrier()
        return StageSummary(name, "ran", reason, seconds, dict(result.metrics) if result else {})

    def _finish(self, name: str, stage_dir: Path, result: StageResult | None, config_hash: str,
                inputs: dict, sections: dict, seconds: float) -> None:
        if not isinstance(result, StageResult):
            raise StageError(f"stage {name} returned {type(result).__name__}, not a StageResult (a bug in "
                             f"pipeline/stages/{name}.py)")
        outputs = {k: str(Path(v).resolve()) for k, v in result.outputs.items()}
        missing = [k for k, p in outputs.items() if not Path(p).exists()]
        if missing:
            raise StageError(f"stage {name} reported outputs that do not exist ({', '.join(missing)}); "
                             "nothing was marked done")
        metrics = to_plain(result.metrics)
        if not SPECS[name].training:
            with open(stage_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"stage": name, "seconds": round(seconds, 3), **metrics}) + "\n")
        done = {"stage": name, "config_hash": config_hash, "inputs": inputs, "outputs": outputs,
                "metrics": metrics, "config": sections, "seconds": round(seconds, 3),
                "wall_seconds": round(attempt_seconds(stage_dir), 3), "finished_at": _now(),
                "run_id": uuid.uuid4().hex, "code": code_version()}
        write_json_atomic(stage_dir / "done.json", done)

    def fresh(self, planned: list[str]) -> list[str]:
        """The planned stages not already done with this recipe's config (they will run, or may)."""
        if self.force:
            return list(planned)
        return [s for s in planned if (read_done(self.run_dir / s) or {}).get("config_hash")
                != stage_config_hash(self.recipe, s)]

    def prepare_runs(self, planned: list[str]) -> bool:
        """Whether the prepare stage is planned and will not be skipped."""
        if "prepare" not in planned:
            return False
        sections = to_plain(SPECS["prepare"].sections(self.recipe))
        return self.decide("prepare", stage_config_hash(self.recipe, "prepare"), {}, sections) is not None

    def run(self, requested: list[str] | None = None, *, resume: bool = False) -> list[StageSummary]:
        """Check the recipe's inputs and the run directory, take the lock (main process), write config.yaml,
        run the stages."""
        planned = plan_stages(self.recipe, requested)
        preflight(self.recipe, planned, self.prepare_runs(planned), self.fresh(planned))
        lock = RunLock(self.run_dir)
        # every rank checks, so all stop together
        _check_config(self.run_dir, self.recipe, resume or self.extend, self.force)
        self.check_resume_world(planned)
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire()
            except OSError as exc:  # no permission, a path under a file, a read-only file system
                raise PipelineError(f"{self.run_dir}: not writable ({exc.strerror or exc}); pass --run-dir DIR or "
                                    "set run.runs_dir to a folder you can write") from None
        try:
            if self.is_main:
                write_text_atomic(self.run_dir / "config.yaml", recipe_to_yaml(self.recipe))
            return [self.run_stage(name, planned) for name in planned]
        finally:
            lock.release()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_run_dir(recipe: Recipe) -> Path:
    """runs_dir/name from the recipe's run section."""
    return Path(recipe.run.runs_dir) / recipe.run.name


def run_pipeline(recipe: Recipe, *, run_dir: str | Path | None = None, stages: list[str] | None = None,
                 resume: bool = False, force: bool = False, extend: bool = False) -> list[StageSummary]:
    """Run (or skip) the recipe's stages in `run_dir` (default runs_dir/name); returns the summary rows.

    extend: continue finished training stages whose only change is a larger `train.steps` from their last
    checkpoint (implies resume for the changed config.yaml); see Runner.extension.
    """
    runner = Runner(recipe, Path(run_dir) if run_dir else default_run_dir(recipe), force=force, extend=extend)
    return runner.run(stages, resume=resume)


ATTEMPTS_FILE = "attempts.jsonl"


def _log_attempt(stage_dir: Path, seconds: float) -> None:
    """Append one attempt's seconds to <stage>/attempts.jsonl (also when the attempt failed or was stopped)."""
    if Path(stage_dir).is_dir():
        with open(Path(stage_dir) / ATTEMPTS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"seconds": round(seconds, 3), "ended_at": _now()}) + "\n")


def attempt_seconds(stage_dir: Path) -> float:
    """Seconds of every recorded attempt at a stage since its folder was last started clean."""
    total = 0.0
    try:
        lines = (Path(stage_dir) / ATTEMPTS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0.0
    for line in lines:
        try:
            total += float(json.loads(line)["seconds"])
        except (ValueError, KeyError, TypeError):
            continue
    return total


def in_progress(run_dir: Path) -> dict | None:
    """The stage an interrupted run was in: {"stage", "checkpoint_step", "checkpoint", "steps", "finished"}.

    The stage is the last one (in pipeline order) with a stage.json and no done.json; checkpoint_step is
    its newest checkpoint's step (None when it wrote none), steps its planned total (training stages).
    None when no stage was in progress.
    """
    run_dir = Path(run_dir)
    finished = [s for s in STAGE_ORDER if read_done(run_dir / s) is not None]
    started = [s for s in STAGE_ORDER if (run_dir / s / "stage.json").is_file() and s not in finished]
    if not started:
        return None
    name = started[-1]
    found = ckpt.list_checkpoints(run_dir / name / "checkpoints")
    steps = None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        steps = config.get(name, {}).get("train", {}).get("steps") if SPECS[name].training else None
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        pass
    return {"stage": name, "checkpoint_step": found[-1][0] if found else None,
            "checkpoint": str(found[-1][1]) if found else None, "steps": steps, "finished": finished}


# the metrics the summary table shows per stage, in order (other stages: their first scalar metrics)
_SHOWN = {
    "prepare": ("documents", "tokens.packed", "n_seqs.train", "n_seqs.val"),
    "align": ("val_loss", "loss", "tokens_seen", "tokens_per_s"),
    "distill": ("val_bits_per_byte", "val_ce", "tokens_seen", "tokens_per_s"),
    "export": ("parameters",),
}
# names as the table prints them: a stage's "loss" is its weighted objective (the sum of its weighted terms,
# per token), not a cross-entropy; val_ce is the plain next-token CE in nats per token
_LABELS = {"val_loss": "val_objective", "loss": "objective"}
_NOT_SHOWN = ("tokens", "step", "seconds", "format", "skipped")  # per-step or bookkeeping values


def format_summary(rows: list[StageSummary]) -> str:
    """A plain-text table: stage, status, seconds, reason, a few scalar metrics (a training stage's weighted
    objective is labelled `objective`, its plain cross-entropy `val_ce`)."""
    lines = [f"{'stage':<14}{'status':<9}{'time':>9}  reason / metrics"]
    for row in rows:
        flat = {f"{k}.{sub}" if isinstance(v, dict) else k: (v[sub] if isinstance(v, dict) else v)
                for k, v in row.metrics.items() for sub in (v if isinstance(v, dict) else [None])}
        scalar = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys = [k for k in _SHOWN.get(row.name, ()) if k in scalar] or [k for k in scalar if k not in _NOT_SHOWN]
        labels = _LABELS if SPECS[row.name].training else {}
        shown = [f"{labels.get(k, k)}={_fmt(scalar[k])}" for k in keys[:4]]
        detail = row.reason + (" | " + " ".join(shown) if shown else "")
        lines.append(f"{row.name:<14}{row.status:<9}{row.seconds:>8.1f}s  {detail}")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}" if isinstance(v, float) else f"{v:,}"
