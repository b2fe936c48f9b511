"""The `spikedistill` command (also `python -m pipeline`).

    spikedistill run RECIPE.yaml [key=value ...] [--stages a,b] [--run-dir DIR] [--resume] [--force] [--extend]
                     [--debug]
    spikedistill study FOLDER [--out DIR] [--only a,b] [--report-only] [--jobs N] [--archive DIR]
                       [--cache-all-cores] [key=value ...]
    spikedistill export MODEL_DIR --out DIR [--dtype fp32|bf16|fp16] [--tokenizer SPEC]
    spikedistill import-spikegpt CKPT.pth --out DIR [--tokenizer SPEC] [--float-embedding]
    spikedistill eval | generate | energy | leaderboard ...   (from eval/cli.py)

Project errors and bad options print one line to stderr and exit 2; --debug shows the traceback instead.
Numeric options are range-checked by the shared argparse types of eval/argtypes.py. A finished `run` prints its
stage table, its headline numbers, where its outputs are and the commands to run next; Ctrl-C (exit 130) and
SIGTERM (exit 143) print what was saved and the command that resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from eval.argtypes import OneLineParser, int_range
from pipeline import launch
from pipeline.errors import PipelineError

EXIT_USER_ERROR = 2


def _project_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input is wrong', not 'the code is wrong'.

    Only packages already imported are looked at: an error from one of them means it was imported, and
    importing the others here would cost seconds of torch start-up.
    """
    found: list[type[BaseException]] = [PipelineError]
    for module, names in (("teachers", ("TeacherError", "DataError", "CacheError")), ("eval", ("EvalError",)),
                          ("students", ("StudentError",))):
        mod = sys.modules.get(module)
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.runner import default_run_dir, format_summary, run_pipeline

    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(recipe)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    try:
        rows = run_pipeline(recipe, run_dir=run_dir, stages=stages, resume=args.resume, force=args.force,
                            extend=args.extend)
    except KeyboardInterrupt:
        _report_stop(run_dir, args, "interrupted")
        return 130
    except SystemExit as exc:
        if exc.code == 143:  # the trainer's SIGTERM exit, after its checkpoint
            _report_stop(run_dir, args, "stopped by SIGTERM")
        raise
    if os.environ.get("RANK", "0") == "0":  # one summary per run, not one per rank
        print(format_summary(rows))
        print(format_outputs(recipe, run_dir, args))
    return 0


def _shown(path: str | Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _run_command(args: argparse.Namespace, overrides: list[str] | None = None, extend: bool = False) -> str:
    """The `spikedistill run` command line of `args` (without --force, which would start over), under the
    launcher this run was started with, if any (pipeline.launch)."""
    argv = ["run", args.recipe, *(args.overrides if overrides is None else overrides)]
    if args.stages:
        argv += ["--stages", args.stages]
    if args.run_dir:
        argv += ["--run-dir", args.run_dir]
    if args.resume:
        argv.append("--resume")
    if args.extend or extend:
        argv.append("--extend")
    return shlex.join(launch.command(argv))


def _report_stop(run_dir: Path, args: argparse.Namespace, how: str) -> None:
    """Say on stderr what an interrupted run saved and the command that resumes it (main process only)."""
    from pipeline.runner import in_progress

    if os.environ.get("RANK", "0") != "0":
        return
    state = in_progress(run_dir)
    if state is None:
        saved = "no stage had started; nothing to resume"
    else:
        name, step = state["stage"], state["checkpoint_step"]
        if step is not None:
            of = f" of {state['steps']}" if state["steps"] else ""
            saved = (f"stage {name} stopped; its last checkpoint is step {step}{of} ({_shown(state['checkpoint'])}), "
                     "and training resumes from there")
        elif state["steps"]:
            saved = f"stage {name} stopped before its first checkpoint; it restarts from step 0"
        else:
            saved = f"stage {name} stopped; it starts again (teacher_cache keeps its finished shards)"
        if state["finished"]:
            saved += f"; finished stages are kept ({', '.join(state['finished'])})"
    print(f"spikedistill: {how}: {saved}", file=sys.stderr)
    print(f"resume with: {_run_command(args)}", file=sys.stderr)


def format_outputs(recipe, run_dir: Path, args: argparse.Namespace) -> str:
    """The end of a run: training tokens and validation bits/byte, where the outputs are, what to run next."""
    from pipeline.runner import read_done

    done = {s: read_done(run_dir / s) for s in ("align", "distill", "export", "evaluate")}
    lines = []
    distill = (done["distill"] or {}).get("metrics", {})
    if distill:
        align_tokens = (done["align"] or {}).get("metrics", {}).get("tokens_seen")
        tokens = f"{distill.get('tokens_seen', 0):,.0f} tokens seen in distill"
        if align_tokens:
            tokens += f" (+ {align_tokens:,.0f} in align)"
        bpb = distill.get("val_bits_per_byte")
        val = f", validation {bpb:.3f} bits/byte" if bpb is not None else ", no validation split"
        lines.append(f"\ntrained: {tokens}{val} after {distill.get('step', recipe.distill.train.steps)} steps")
    files = [("run", run_dir, "config.yaml, one folder per stage with done.json and metrics.jsonl")]
    if done["export"]:
        files.append(("model", Path(done["export"]["outputs"]["model"]), "HF format, README.md is its model card"))
    if done["evaluate"]:
        files.append(("results", Path(done["evaluate"]["outputs"]["results"]), "bits/byte, tasks, energy, sample"))
        if (run_dir / "evaluate" / "energy.md").is_file():
            files.append(("energy", run_dir / "evaluate" / "energy.md", "per-layer energy table"))
    width = max(len(_shown(p)) for _, p, _ in files)
    lines.append("outputs:")
    lines += [f"  {name:<8}{_shown(path):<{width}}  {what}" for name, path, what in files]
    lines.append("next:")
    if done["export"]:
        model = _shown(done["export"]["outputs"]["model"])
        prompt = recipe.evaluate.sample_prompt or "Once upon a time"
        generate = ["generate", model, "--prompt", prompt]
        if recipe.evaluate.sample_repetition_penalty != 1.0:  # as the evaluate stage's sample was decoded
            generate += ["--repetition-penalty", f"{recipe.evaluate.sample_repetition_penalty:g}"]
        lines.append(f"  {_single(generate)}")
        evaluate = ["eval", model, "--tasks", "spikedistill_mc", "--teacher", recipe.teacher.spec, "--limit", "100"]
        lines.append(f"  {_single(evaluate)}")
    if done["evaluate"]:
        lines.append(f"  {_single(['leaderboard', _shown(run_dir.resolve().parent)])}")
    if done["distill"]:
        key = "distill.train.steps"
        more = [o for o in args.overrides if not o.startswith(key + "=")]
        more.append(f"{key}={2 * recipe.distill.train.steps}")
        lines.append(f"  {_run_command(args, more, extend=True)}   # train longer, from the last checkpoint")
    return "\n".join(lines)


def _single(words: list[str]) -> str:
    """A one-process command of this program, as the user can type it (pipeline.launch.program_words)."""
    return shlex.join(launch.command(words, launched=False))


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe's stages (skips those already done and unchanged)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. distill.train.steps=200")
    p.add_argument("--stages", help="comma-separated subset, e.g. prepare,align (default: every enabled stage)")
    p.add_argument("--run-dir", help="run directory (default: <run.runs_dir>/<run.name>)")
    p.add_argument("--resume", action="store_true", help="continue a run directory whose config differs")
    p.add_argument("--force", action="store_true", help="rerun the stages even when done and unchanged")
    p.add_argument("--extend", action="store_true",
                   help="continue finished training stages from their last checkpoint when only their "
                   "train.steps grew (e.g. distill.train.steps=200); the learning-rate schedule becomes the one "
                   "of the new step count")
    p.set_defaults(func=_cmd_run)


def _cmd_study(args: argparse.Namespace) -> int:
    from eval.cli import print_leaderboard
    from pipeline.study import run_study

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    print_leaderboard(run_study(args.folder, args.out, only=only, report_only=args.report_only,
                                overrides=args.overrides, jobs=args.jobs, archive=args.archive,
                                cache_all_cores=args.cache_all_cores))
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run every recipe of a folder (resumable), then one report with plots")
    p.add_argument("folder", help="folder of arm recipes, e.g. recipes/study (_*.yaml are shared bases)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every arm")
    p.add_argument("--out", help="report folder (default: <runs_dir>/leaderboard)")
    p.add_argument("--only", help="comma-separated arm names (recipe file stems) to run")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--jobs", type=int_range(1), default=1,
                   help="runs trained at once, each with cores/jobs threads and its output in <run>/study.log "
                   "(shared teacher caches are built first, one at a time)")
    p.add_argument("--archive", metavar="DIR",
                   help="folder of finished runs' records (configs, done.json, metrics, evaluate results; no "
                   "weights, 30-40 kB a run) to keep in git: restored into the runs directory first, so a fresh "
                   "clone or machine goes on where the study stopped, and updated as runs finish "
                   "(make study: docs/results/runs)")
    p.add_argument("--cache-all-cores", action="store_true",
                   help="build each shared teacher cache on every core, with no run beside it: the cache is "
                   "done sooner (for a session that must also train the runs that read it); the default "
                   "builds it on one job's share while other runs train")
    p.set_defaults(func=_cmd_study)


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.stages.export import export_folder

    out = export_folder(args.model_dir, args.out, dtype=args.dtype, tokenizer=args.tokenizer)
    print(f"wrote {out} (loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True))")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="make a student folder self-contained: remote code, weights, tokenizer, card")
    p.add_argument("model_dir", help="a student folder, e.g. runs/<name>/export/model")
    p.add_argument("--out", required=True, help="the folder to write (replaced if it exists)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="weights dtype (default: as saved)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model folder's)")
    p.set_defaults(func=_cmd_export)


def _cmd_import_spikegpt(args: argparse.Namespace) -> int:
    from pipeline.stages.export import import_checkpoint

    out = import_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer,
                            binary_embedding=not args.float_embedding)
    print(f"wrote {out}")
    return 0


def _add_import_spikegpt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-spikegpt", help="convert a ridgerchu/SpikeGPT .pth checkpoint into a student folder")
    p.add_argument("checkpoint", help="CKPT.pth: the state_dict of SpikeGPT's src/model.py GPT (model_type RWKV)")
    p.add_argument("--out", required=True, help="the folder to write (replaced if it exists)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id to ship with it (e.g. GPT-NeoX's for 216M)")
    p.add_argument("--float-embedding", action="store_true",
                   help="the model was trained without the binary (Heaviside) embedding")
    p.set_defaults(func=_cmd_import_spikegpt)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    try:
        from eval.cli import register
    except ImportError as exc:
        missing = str(exc)

        def unavailable(args: argparse.Namespace) -> int:
            raise PipelineError(f"spikedistill {args.command}: the eval commands are unavailable ({missing}); "
                                "reinstall with `make venv`")

        for name in ("eval", "generate", "energy", "leaderboard"):
            sub.add_parser(name, help="(unavailable: eval/cli.py did not import)").set_defaults(func=unavailable)
        return
    register(sub)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = OneLineParser(prog="spikedistill", description="Distill a HF causal LM into a spiking LM.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_study(sub)
    _add_export(sub)
    _add_import_spikegpt(sub)
    _add_eval_commands(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors")
    return parser


# third-party log lines that the user cannot act on: (logger, message parts); lm-eval's come from eval.cli
_NOISE = (("DeepSpeed", ("Setting accelerator to CPU",)),)  # without CUDA, CPU is what we asked for


def _quiet_third_party() -> None:
    try:
        from eval.cli import LM_EVAL_NOISE, quiet_logs
    except ImportError:  # the eval commands are unavailable (see _add_eval_commands); nothing to quieten
        return
    quiet_logs(_NOISE + LM_EVAL_NOISE)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (2 for a project error)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow the options (argparse stops collecting positionals at an option)
    # (one without "=" is passed on too, so load_recipe names it and the expected form in one line)
    if args.command in ("run", "study") and all(not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _quiet_third_party()
    from students.ops.threads import configure_threads

    try:
        configure_threads()  # OMP_NUM_THREADS, else the allowed cores, adapted to other processes' load
    except ValueError as exc:
        print(f"spikedistill: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except _project_errors() as exc:
        if args.debug:
            raise
        print(f"spikedistill: error: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("spikedistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
