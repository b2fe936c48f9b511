"""Subcommands eval, bpb, generate, energy, leaderboard for the `spikedistill` CLI (pipeline/cli.py calls
`register`); `python -m eval.cli ...` runs them alone. Each handler returns an exit code and raises
EvalError (one line) for the caller to print with exit code 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from eval import EvalError
from eval.argtypes import OneLineParser, float_range, int_range

DEFAULT_TASKS = ["spikedistill_offline"]


class DropLogLines(logging.Filter):
    """Drop log records whose message contains one of `needles` (third-party lines the user cannot act on)."""

    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in self.needles)


# (logger, message parts) of lm-eval lines about settings that our local tasks and our call do not use
LM_EVAL_NOISE = (
    ("lm_eval.api.task", ("Custom kwargs can be passed to `--metadata`",)),
    ("lm_eval.evaluator", ("Setting verbosity through simple_evaluate is deprecated",)),
)


def quiet_logs(noise=LM_EVAL_NOISE) -> None:
    """Install a DropLogLines filter for each (logger name, message parts) once; other records pass."""
    for name, needles in noise:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLogLines) and f.needles == needles for f in logger.filters):
            logger.addFilter(DropLogLines(*needles))


def _split_tasks(values: list[str]) -> list[str]:
    return [t for v in values for t in v.split(",") if t]


def cmd_eval(args) -> int:
    from eval.harness import evaluate_tasks
    from eval.leaderboard import default_eval_dir, write_task_results
    from eval.models import model_type_of

    if Path(args.model_dir).exists():
        model_type_of(args.model_dir)  # a run folder or a non-model: one line naming the model to pass instead
    out_dir = Path(args.output) if args.output else default_eval_dir(args.model_dir)
    print(f"results go to {out_dir} (not the model folder)", flush=True)
    out = evaluate_tasks(
        args.model_dir, _split_tasks(args.tasks), out_dir, args.limit, args.batch_size, args.teacher
    )
    path = write_task_results(out_dir, args.model_dir, out, args.teacher)
    print(out["markdown"])
    print(f"wrote {', '.join([*out['files'].values(), str(path)])}")
    print(f"`spikedistill leaderboard {out_dir.resolve().parent.parent}` shows them in run {out_dir.resolve().parent.name}")
    return 0


def cmd_bpb(args) -> int:
    from eval.bpb import cut_text, evaluate_bpb, read_eval_text
    from eval.models import load_any

    texts = {spec: read_eval_text(spec) for spec in args.texts}  # a bad name fails before the model loads
    model, tok = load_any(args.model)
    for text_spec, whole in texts.items():
        text = cut_text(whole, args.max_bytes)
        res = evaluate_bpb(
            model, tok, text, args.context, args.batch_size, progress=f"bpb {Path(text_spec).name}",
            stride=args.stride, protocol=args.protocol,
        )
        scored = f"{res['bytes']:,} bytes" + (
            f" of {len(whole.encode('utf-8')):,}, cut at a line end" if len(text) < len(whole) else ""
        )
        print(
            f"{text_spec}: {res['bits_per_byte']:.4f} bits/byte, byte ppl {res['byte_perplexity']:.4f}, "
            f"word ppl {res['word_perplexity']:.2f} ({res['tokens']:,} tokens, {scored}; {res['protocol']['text']})"
        )
    return 0


def cmd_generate(args) -> int:
    from eval.generate import generate_text
    from eval.models import load_any

    model, tok = load_any(args.model_dir)
    print(args.prompt, end="", flush=True)
    generate_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                  on_text=lambda piece: print(piece, end="", flush=True), repetition_penalty=args.repetition_penalty)
    print()
    return 0


def _teacher_model(spec: str):
    """(model, tokenizer) of the teacher (a model directory or a teacher spec) with its weights: its energy
    comes from a real forward, its tokens per byte from its own tokenizer."""
    path = Path(spec)
    if path.is_dir():
        from eval.models import load_model_dir

        return load_model_dir(path)
    from teachers import load_teacher

    teacher = load_teacher(spec)
    return teacher.model.eval(), teacher.tokenizer


def cmd_energy(args) -> int:
    from eval.bpb import read_eval_text
    from eval.energy import (
        check_context,
        energy_report,
        format_energy_table,
        text_tokens_per_byte,
        write_energy_json,
    )
    from eval.models import load_model_dir

    check_context(args.context)  # before any model loads
    text = read_eval_text(args.text)
    model, tok = load_model_dir(args.model_dir)
    teacher, teacher_tok = _teacher_model(args.teacher) if args.teacher else (None, None)
    report = energy_report(
        model, args.context, tok, text, teacher, args.e_ac, args.e_mac,
        teacher_tokens_per_byte=text_tokens_per_byte(teacher_tok, text) if teacher_tok is not None else None,
    )
    print(format_energy_table(report))
    if args.json:
        write_energy_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_leaderboard(args) -> int:
    from eval.leaderboard import build_leaderboard

    print_leaderboard(build_leaderboard(args.runs_dir, args.out or Path(args.runs_dir) / "leaderboard"))
    return 0


def print_leaderboard(out: dict) -> None:
    """Print a build_leaderboard result: its markdown table and the files written."""
    print(Path(out["files"]["markdown"]).read_text())
    print(f"wrote {', '.join(out['files'].values())}")


def register(subparsers) -> None:
    """Add eval, bpb, generate, energy and leaderboard to an argparse subparsers object (sets args.func)."""
    p = subparsers.add_parser("eval", help="lm-eval tasks on a model (and its teacher): JSON + markdown")
    p.add_argument("model_dir")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=DEFAULT_TASKS,
        help="lm-eval task or group names, space or comma separated (local: spikedistill_offline, "
        "spikedistill_mc, spikedistill_ppl_persuasion, ...; online: bispikclm_zeroshot8)",
    )
    p.add_argument("--output", help="where to write results (default: <run>/eval for a run's exported model, "
                   "else runs/<model folder name>/eval; never the model folder)")
    p.add_argument("--teacher", help="teacher spec scored with lm-eval's hf model beside the student")
    p.add_argument("--limit", type=int_range(1), help="score only the first N documents of each task")
    p.add_argument("--batch-size", type=int_range(1), default=8)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("bpb", help="bits/byte and perplexity of a model on texts")
    p.add_argument("model", help="model directory or teacher spec")
    p.add_argument("texts", nargs="+", help="bundled text names (persuasion, hamlet) or UTF-8 text files")
    p.add_argument(
        "--context",
        type=int_range(1),
        default=1024,
        help="tokens per window (windows protocol) or per chunk (stream)",
    )
    p.add_argument("--batch-size", type=int_range(1), default=1)
    p.add_argument(
        "--max-bytes",
        type=int_range(1),
        help="score only the first N UTF-8 bytes of each text, cut at a line end (as evaluate.max_text_bytes)",
    )
    p.add_argument("--stride", type=int_range(1), help="windows advance by this many tokens (default: half a window)")
    p.add_argument(
        "--protocol",
        choices=["windows", "stream"],
        default="windows",
        help="windows: any model, each window led by BOS (the tables' protocol); stream: the student's one "
        "pass through its recurrent state",
    )
    p.set_defaults(func=cmd_bpb)

    p = subparsers.add_parser("generate", help="stream a continuation of a prompt")
    p.add_argument("model_dir", help="model directory or teacher spec")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int_range(1), default=50)
    p.add_argument("--temperature", type=float_range(0), default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int_range(0), default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float_range(0, 1, lo_open=True), default=1.0,
                   help="sample within the smallest set of tokens of probability >= p (1 = all)")
    p.add_argument("--repetition-penalty", type=float_range(0, lo_open=True), default=1.0,
                   help="> 1 discourages tokens already in the prompt or the text (e.g. 1.3; 1 = off, the default)")
    p.add_argument("--seed", type=int_range(0, 2**63 - 1), help="makes a sample reproducible")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "energy", help="energy per token: compute only, memory-inclusive, quantised ANN; ratio to a teacher"
    )
    p.add_argument("model_dir")
    p.add_argument("--teacher", help="teacher spec or model directory (counted from one real forward, all MAC)")
    p.add_argument("--context", type=int_range(1), default=512,
                   help="tokens of context the energy is counted at (longer than eval.energy.MAX_CONTEXT is refused)")
    p.add_argument("--text", default="persuasion",
                   help="held-out text to measure firing rates and tokens per byte on (the whole text)")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--e-ac", type=float_range(0, lo_open=True), default=0.9,
                   help="pJ per accumulate (45 nm: 0.9)")
    p.add_argument("--e-mac", type=float_range(0, lo_open=True), default=4.6,
                   help="pJ per multiply-accumulate (45 nm: 4.6)")
    p.set_defaults(func=cmd_energy)

    p = subparsers.add_parser("leaderboard", help="one table + plots over runs/*/evaluate/results.json")
    p.add_argument("runs_dir")
    p.add_argument("--out", help="output directory (default: RUNS_DIR/leaderboard)")
    p.set_defaults(func=cmd_leaderboard)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m eval.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    quiet_logs()
    from students.ops.threads import configure_threads

    try:
        configure_threads()  # OMP_NUM_THREADS, else the allowed cores, adapted to other processes' load
    except ValueError as exc:  # a bad OMP_NUM_THREADS
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
