"""GPU check: the Triton kernels compiled, checked against their references and timed, then short bf16 distill
runs from cached teacher targets, on one CUDA GPU (sized for under 8 minutes on an H100; not yet run on one).
Results: one JSON and a markdown table.

    make gpu-check [OUT=DIR]                        # python3 -m bench.gpu_check [OUT_DIR]
    python3 -m bench.gpu_check OUT_DIR --device cpu --triton-interpret --quick   # the rehearsal on a CPU

OUT_DIR defaults to $OUT if set, else bench/gpu_check_out. Without CUDA (and without --device cpu) the check
prints one line saying it was skipped and exits 0. Sections, each in its own try/except (a failing section is
reported with its traceback, and the others still run):
  environment  versions of Python, torch, CUDA, Triton, transformers, accelerate, omegaconf and DeepSpeed, and
               where they differ from requirements/lock.txt (reported, not fatal)
  compile      every Triton kernel (LIF, WKV, SFSA, linear CE; fp32 and bf16) compiled by a first tiny call,
               timed
  parity       outputs and gradients of each Triton kernel (and of the ops composed from it on CUDA: the fused
               LIF producers, the chunked sfsa_linear) against the plain-PyTorch reference at realistic shapes
               (B 8, L 512, C 512-1024, vocabulary 49,152), fp32 and bf16; a bf16 case is compared with the
               reference run in fp32 on the same (bf16-representable) values
  timing       bench.kernels.bench_ops on the device (fwd+bwd, reference vs Triton), and the LM head + CE
               (reference vs Triton: time and peak memory)
  distill      `spikedistill run` (prepare, teacher_cache, distill) of a demo-size student from a tiny random
               Llama teacher built here (its byte-level BPE trained on the bundled Austen text), top-k targets
               cached first, then --steps distill steps with distributed.mixed_precision=bf16
  deepspeed    the same distill stage under single-GPU DeepSpeed ZeRO-2 (recipes/deepspeed/zero2.json,
               launched by torch.distributed.run), if deepspeed imports; else skipped
Exit code: 0 when every section passed or was skipped, 1 when any parity case or any section failed.
--hide-packages (rehearsal) makes the listed packages unimportable here and in the subprocesses, as on a
machine that lacks them.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PACKAGES = ("torch", "triton", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "omegaconf",
            "deepspeed", "datasets", "lm-eval")
STAGES = "prepare,teacher_cache,distill"
# parity: the share of elements of any output or gradient that may differ from the reference by more than
# rtol x (|ref| + rms(ref)) (binary tensors: that may differ at all); see gpu_cases.mismatch
TOLERANCE = {"float32": {"rtol": 1e-4, "share": 1e-4}, "bfloat16": {"rtol": 1e-2, "share": 1e-3}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or str(ROOT / "bench" / "gpu_check_out"),
                        help="folder for gpu_check.json and gpu_check.md (default $OUT, else bench/gpu_check_out)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu = the rehearsal")
    parser.add_argument("--triton-interpret", action="store_true",
                        help="run the Triton kernels in the interpreter (TRITON_INTERPRET=1; for --device cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and runs (the rehearsal)")
    parser.add_argument("--steps", type=int, default=None, help="distill steps (default 50, --quick 3)")
    parser.add_argument("--sections", default="environment,compile,parity,timing,distill,deepspeed",
                        help="comma-separated sections to run")
    parser.add_argument("--distill-kernels", choices=("auto", "triton", "cpu", "reference"),
                        help="SPIKEDISTILL_KERNELS of the distill runs (the rehearsal: triton, interpreted; slow)")
    parser.add_argument("--cases", default="", help="comma-separated parity cases to run (default: all)")
    parser.add_argument("--hide-packages", default="", help="comma-separated packages to make unimportable")
    parser.add_argument("--work", help="folder for the tiny teacher, its cache and the runs (default: a new "
                        "temporary folder)")
    parser.add_argument("--subprocess-timeout", type=int, default=300, help="seconds per pipeline run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.triton_interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton chooses compiled or interpreted kernels when it is imported: start over with the variable set
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": _pythonpath(os.environ.get("PYTHONPATH"))}
        return subprocess.run([sys.executable, "-m", "bench.gpu_check", *argv], env=env, cwd=ROOT,
                              check=False).returncode  # fmt: skip
    hidden = [p for p in args.hide_packages.split(",") if p]
    for name in hidden:
        sys.modules[name] = None  # import raises ImportError; importlib.util.find_spec returns None
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check skipped: no CUDA device here (torch {torch.__version__}); run it on a GPU machine, or "
              "rehearse with --device cpu --triton-interpret --quick")
        return 0
    check = Check(args, hidden)
    for name in args.sections.split(","):
        check.run(name.strip())
    return check.finish()


def _pythonpath(current: str | None, *first: str) -> str:
    """PYTHONPATH with `first` and the repository root in front, so subprocesses import this checkout."""
    return os.pathsep.join([*first, str(ROOT), *([current] if current else [])])


class Check:
    """Runs the sections, collects {section: {status, seconds, data | error}}, writes the JSON and markdown."""

    def __init__(self, args: argparse.Namespace, hidden: list[str]):
        import torch

        self.args, self.hidden = args, hidden
        self.device = torch.device(args.device)
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        # the teacher, its cache and the runs' checkpoints stay out of OUT (which a GPU lender copies back)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.steps = args.steps or (3 if args.quick else 50)
        self.results: dict[str, dict] = {}
        self.sections: dict[str, Callable[[], dict]] = {
            "environment": self.environment, "compile": self.compile, "parity": self.parity,
            "timing": self.timing, "distill": self.distill, "deepspeed": self.deepspeed,
        }  # fmt: skip

    def run(self, name: str) -> None:
        if name not in self.sections:
            raise SystemExit(f"gpu_check: unknown section {name!r}; choose among {sorted(self.sections)}")
        print(f"gpu-check: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            data = self.sections[name]()
            status = data.pop("status", "passed")
            result = {"status": status, "data": data}
        except Exception as exc:  # noqa: BLE001 - a failing section is reported; the others still run
            result = {"status": "failed", **_failure(exc)}
        result["seconds"] = round(time.perf_counter() - start, 2)
        self.results[name] = result
        print(f"gpu-check: {name} {result['status']} in {result['seconds']} s"
              + (f": {result['error']}" if "error" in result else ""), flush=True)  # fmt: skip

    def finish(self) -> int:
        report = {"device": describe_device(self.device), "quick": self.args.quick, "work": str(self.work),
                  "sections": self.results}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(report))
        failed = [n for n, r in self.results.items() if r["status"] == "failed"]
        print(f"gpu-check: wrote {self.out / 'gpu_check.json'} and gpu_check.md; "
              + (f"FAILED: {', '.join(failed)}" if failed else "no failures"))  # fmt: skip
        return 1 if failed else 0

    # ------------------------------------------------------------------------------------------- sections
    def environment(self) -> dict:
        import torch

        installed = {name: _version(name) for name in PACKAGES}
        locked = lock_versions(LOCK, PACKAGES)
        differ = {n: {"lock": locked[n], "installed": installed[n]} for n in PACKAGES
                  if n in locked and _base(installed[n]) != _base(locked[n])}  # fmt: skip
        return {"python": platform.python_version(), "torch_cuda": torch.version.cuda, "installed": installed,
                "differs_from_lock": differ, "hidden_packages": self.hidden,
                "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
                "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}  # fmt: skip

    def compile(self) -> dict:
        from bench import gpu_cases

        with gpu_cases.triton_backend():
            seconds = {case.name: gpu_cases.first_call(case, self.device) for case in gpu_cases.compile_cases()}
        return {"first_call_seconds": seconds}

    def parity(self) -> dict:
        from bench import gpu_cases

        rows = []
        with gpu_cases.triton_backend():
            wanted = {c.strip() for c in self.args.cases.split(",") if c.strip()}
            for case in gpu_cases.parity_cases(quick=self.args.quick):
                if wanted and case.name not in wanted:
                    continue
                for dtype in case.dtypes:
                    rows.append(self._parity_case(case, dtype))
                    print(f"  {rows[-1]['case']} {rows[-1]['dtype']}: {'ok' if rows[-1]['ok'] else 'FAILED'}",
                          flush=True)  # fmt: skip
        failed = [f"{r['case']} {r['dtype']}" for r in rows if not r["ok"]]
        return {"status": "failed" if failed else "passed", "failed": failed, "cases": rows}

    def _parity_case(self, case, dtype) -> dict:
        """One case's comparison, or its error (a case that raises fails alone)."""
        from bench import gpu_cases

        name = str(dtype).split(".")[-1]
        try:
            return gpu_cases.compare(case, dtype, self.device, TOLERANCE[name])
        except Exception as exc:  # noqa: BLE001 - reported in the case's row; the other cases still run
            return {"case": case.name, "dtype": name, "ok": False, "worst_share": 1.0, "worst_rel_l2": math.inf,
                    "shapes": [], **_failure(exc)}

    def timing(self) -> dict:
        from bench import gpu_cases
        from bench.kernels import bench_ops

        repeats = 2 if self.args.quick else 5
        shapes = gpu_cases.QUICK_OP_SHAPES if self.args.quick else None
        with gpu_cases.triton_backend():
            ops = bench_ops(repeats, str(self.device), shapes)
            linear_ce = gpu_cases.time_linear_ce(self.device, self.args.quick, repeats)
        return {"ops": [{"op": op, "impl": impl, "ms": s * 1e3} for op, impl, s in ops], "linear_ce": linear_ce}

    def distill(self) -> dict:
        return self._pipeline("bf16", launcher=[])

    def deepspeed(self) -> dict:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return {"status": "skipped", "reason": "deepspeed is not importable (no wheel in .whl?)"}
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        extra = ["distributed.strategy=deepspeed", f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero2.json'}"]
        return self._pipeline("zero2", launcher=launcher, extra=extra)

    # --------------------------------------------------------------------------------------- distill runs
    def _pipeline(self, name: str, launcher: list[str], extra: list[str] = ()) -> dict:
        from bench import gpu_cases

        teacher = gpu_cases.tiny_teacher(self.work / "teacher", quick=self.args.quick)
        run_dir = self.work / "runs" / name
        cmd = [sys.executable, *launcher, "-m", "pipeline", "run", str(ROOT / "recipes" / "demo.yaml"),
               *gpu_cases.distill_overrides(teacher, self.work / "teacher_cache", self.steps, self.args.quick),
               *extra, "--run-dir", str(run_dir), "--stages", STAGES, "--force"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": _pythonpath(os.environ.get("PYTHONPATH"), *self._hide_dir()),
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        if self.args.distill_kernels:
            env["SPIKEDISTILL_KERNELS"] = self.args.distill_kernels
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False,
                              timeout=self.args.subprocess_timeout)  # fmt: skip
        (self.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        summary = gpu_cases.distill_summary(run_dir)
        summary.update(command=" ".join(cmd), returncode=proc.returncode, wall_seconds=time.perf_counter() - start)
        done = summary.get("steps") == self.steps and summary.get("finite")
        if proc.returncode != 0 or not done:
            summary["stderr_tail"] = proc.stderr[-4000:]
            summary["status"] = "failed"
        return summary

    def _hide_dir(self) -> list[str]:
        """A folder whose sitecustomize.py hides --hide-packages in subprocesses too ([] when none are hidden)."""
        if not self.hidden:
            return []
        folder = self.work / "hide"
        folder.mkdir(exist_ok=True)
        (folder / "sitecustomize.py").write_text(
            "import sys\n"
            f"for _name in {self.hidden!r}:\n"
            "    sys.modules[_name] = None  # written by bench/gpu_check.py --hide-packages\n"
        )
        return [str(folder)]


def _failure(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor})"
    from bench.machine import describe_cpu

    return describe_cpu()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _base(version: str | None) -> str | None:
    """'2.13.0+cpu' -> '2.13.0' (a local build tag is not a version difference)."""
    return None if version is None else version.split("+")[0]


def lock_versions(lock: Path, names: tuple[str, ...]) -> dict[str, str]:
    """{name: version} pinned in requirements/lock.txt (`name==version \\` lines) for the given names."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", lock.read_text(), flags=re.MULTILINE))
    canon = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    return {n: canon[n] for n in names if n in canon}


def markdown(report: dict) -> str:
    """The report as markdown: one line per section, then the parity, timing and distill tables."""
    lines = [f"# GPU check on {report['device']}", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, r in report["sections"].items():
        note = r.get("error") or r.get("data", {}).get("reason", "")
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {note} |")
    sections = report["sections"]
    env = sections.get("environment", {}).get("data", {})
    if env.get("differs_from_lock"):
        lines += ["", "Versions that differ from requirements/lock.txt: " + ", ".join(
            f"{n} {v['installed']} (lock {v['lock']})" for n, v in env["differs_from_lock"].items())]
    parity = sections.get("parity", {}).get("data", {}).get("cases", [])
    if parity:
        lines += ["", "| parity case | dtype | ok | worst mismatch share | worst L2 error / norm | input shapes |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {c['dtype']} | {'yes' if c['ok'] else '**no**'} | {c['worst_share']:.2e} | "
                  f"{c['worst_rel_l2']:.2e} | {c['shapes']} |" for c in parity]  # fmt: skip
    timing = sections.get("timing", {}).get("data", {})
    if timing:
        lines += ["", "| op | implementation | fwd+bwd ms |", "|---|---|---|"]
        lines += [f"| {r['op']} | {r['impl']} | {r['ms']:.2f} |" for r in timing.get("ops", [])]
        lines += [f"| linear_ce {k} | {v.get('impl', '')} | {v['ms']:.2f} (peak {v['peak_mb']:.0f} MB) |"
                  for k, v in timing.get("linear_ce", {}).items()]  # fmt: skip
    for name in ("distill", "deepspeed"):
        d = sections.get(name, {}).get("data", {})
        if d.get("steps"):
            lines += ["", (f"{name}: {d['steps']} steps, loss {d['first_loss']:.3f} -> {d['last_loss']:.3f}, "
                           f"{d.get('tokens_per_s') or 0:.0f} tokens/s, run {d['wall_seconds']:.0f} s "
                           f"(return code {d['returncode']})")]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
