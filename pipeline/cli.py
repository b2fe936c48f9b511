"""The `spikedistill` command (also `python -m pipeline`).

    spikedistill run RECIPE.yaml [key=value ...] [--stages a,b] [--run-dir DIR] [--resume] [--force] [--debug]
    spikedistill study FOLDER [--out DIR] [--only a,b] [--report-only] [key=value ...]
    spikedistill eval | generate | energy | leaderboard ...   (from eval/cli.py)

Project errors print one line to stderr and exit 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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
    from pipeline.runner import format_summary, run_pipeline

    recipe = load_recipe(args.recipe, args.overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    rows = run_pipeline(recipe, run_dir=args.run_dir, stages=stages, resume=args.resume, force=args.force)
    print(format_summary(rows))
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe's stages (skips those already done and unchanged)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. distill.train.steps=200")
    p.add_argument("--stages", help="comma-separated subset, e.g. prepare,align (default: every enabled stage)")
    p.add_argument("--run-dir", help="run directory (default: <run.runs_dir>/<run.name>)")
    p.add_argument("--resume", action="store_true", help="continue a run directory whose config differs")
    p.add_argument("--force", action="store_true", help="rerun the stages even when done and unchanged")
    p.set_defaults(func=_cmd_run)


def _cmd_study(args: argparse.Namespace) -> int:
    from eval.cli import print_leaderboard
    from pipeline.study import run_study

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    print_leaderboard(run_study(args.folder, args.out, only=only, report_only=args.report_only,
                                overrides=args.overrides))
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run every recipe of a folder (resumable), then one report with plots")
    p.add_argument("folder", help="folder of arm recipes, e.g. recipes/study (_*.yaml are shared bases)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every arm")
    p.add_argument("--out", help="report folder (default: <runs_dir>/leaderboard)")
    p.add_argument("--only", help="comma-separated arm names (recipe file stems) to run")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.set_defaults(func=_cmd_study)


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
    parser = argparse.ArgumentParser(prog="spikedistill", description="Distill a HF causal LM into a spiking LM.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_study(sub)
    _add_eval_commands(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


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
