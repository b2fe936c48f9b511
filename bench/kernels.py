"""Fused spike kernels against their references and against what a user would otherwise pick, in one run.

    .venv/bin/python bench/kernels.py [--threads 1,2] [--repeats 3] [--skip-step] [--skip-kd] [--device cuda]

For each thread count: fwd+bwd time of the LIF scan, WKV, SFSA and sfsa_linear (reference vs the backend the
dispatch picks on this device), spikingjelly's multi-step LIFNode (torch backend; optional, bench-only) and
transformers' RWKV CPU WKV; the fused head+KD loss (time and peak RSS, each variant in its own subprocess;
CPU only); and a full distill step (student forward + head/KD/CE loss + backward) with
SPIKEDISTILL_KERNELS=reference + chunked losses vs auto + fused loss. Times are medians of --repeats runs after
two warm-ups. --device cuda (the default where CUDA is available) puts the tensors on the GPU, so "auto" is the
Triton kernels; CUDA work is synchronised before each clock reading.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

from students.ops._dispatch import select_backend
from students.ops.lif import lif_scan_reference
from students.ops.sfsa import sfsa_linear_reference, sfsa_reference
from students.ops.wkv import wkv_reference

LIF_SHAPE = (8, 512, 512)  # B, S = L*T tokens*steps, N = d_model
WKV_SHAPE = (8, 512, 512)  # B, L, C
SFSA_SHAPE = (8, 4, 512, 64)  # B, H, L, D (d_model 256)
KD_SHAPE = (2048, 512, 49152)  # N tokens, C, V
STEP_SHAPE = (2, 256)  # B, L of the distill step (vocab 49,152, d_model 256, 4 layers)
OP_SHAPES = {"lif": LIF_SHAPE, "wkv": WKV_SHAPE, "sfsa": SFSA_SHAPE}


def median_time(fn, repeats: int, warmup: int = 2, device: str = "cpu") -> float:
    """Median wall seconds of fn() over `repeats` calls, after `warmup` untimed calls.

    Two warm-up calls, not one: the first few calls of a path that allocates fresh multi-MB buffers pay page
    faults while the allocator's heap grows (measured: a 5 ms LIF fwd+bwd times at ~10 ms on its second call).
    On CUDA (`device`) the queued work is waited for before each clock reading.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(fn, inputs):
    """A closure running fn(*inputs) and backpropagating the sum of its first output."""

    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def bench_ops(repeats: int, device: str = "cpu", shapes: dict | None = None) -> list[tuple[str, str, float]]:
    """[(op, implementation, seconds)] for the spike ops, tensors on `device`, at `shapes` (default OP_SHAPES:
    {"lif": (B, S, N), "wkv": (B, L, C), "sfsa": (B, H, L, D)})."""
    shapes = shapes or OP_SHAPES
    from students.ops import lif_scan, sfsa, sfsa_linear, wkv

    rows = []
    gen = torch.Generator().manual_seed(0)

    def leaf(t):
        return t.to(device).requires_grad_()

    def timed(fn, inputs):
        return median_time(_fwd_bwd(fn, inputs), repeats, device=device)

    x = leaf(torch.randn(shapes["lif"], generator=gen) + 0.8)
    fast = select_backend(x)
    rows.append(("lif", "reference", timed(lif_scan_reference, [x])))
    rows.append(("lif", fast, timed(lif_scan, [x])))
    sj = _spikingjelly_lif()
    if sj is not None:
        x_tm = leaf(x.detach().transpose(0, 1).contiguous())  # spikingjelly is time-major
        rows.append(("lif", "spikingjelly", timed(sj, [x_tm])))

    B, L, C = shapes["wkv"]
    td, tf = leaf(torch.randn(C, generator=gen)), leaf(torch.randn(C, generator=gen))
    k, v = (leaf(torch.randn(B, L, C, generator=gen)) for _ in range(2))
    rows.append(("wkv", "reference", timed(wkv_reference, [td, tf, k, v])))
    rows.append(("wkv", fast, timed(wkv, [td, tf, k, v])))
    hf = _hf_rwkv_wkv()
    if hf is not None:
        rows.append(("wkv", "transformers-rwkv", timed(hf, [td, tf, k, v])))

    q, kk, vv = (leaf((torch.rand(shapes["sfsa"], generator=gen) < 0.2).float()) for _ in range(3))

    def attn(ref):
        return lambda a, b, c: (sfsa_reference if ref else sfsa)(a, b, c, 4.0)

    rows.append(("sfsa", "reference", timed(attn(True), [q, kk, vv])))
    rows.append(("sfsa", fast, timed(attn(False), [q, kk, vv])))
    rows.append(("sfsa_linear", "reference", timed(sfsa_linear_reference, [q, kk, vv])))
    rows.append(("sfsa_linear", fast, timed(sfsa_linear, [q, kk, vv])))
    return rows


def _spikingjelly_lif():
    """spikingjelly 2.0 multi-step LIFNode (torch backend) with the same neuron, or None if not installed."""
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
    except ImportError:
        return None
    node = neuron.LIFNode(tau=2.0, v_threshold=1.0, surrogate_function=surrogate.ATan(alpha=2.0), step_mode="m")

    def run(x_tm):
        functional.reset_net(node)
        return node(x_tm)

    return run


def _hf_rwkv_wkv():
    """transformers' RWKV-4 WKV CPU path (a Python loop over time), or None if unavailable."""
    try:
        from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu
    except ImportError:
        return None
    return lambda td, tf, k, v: rwkv_linear_attention_cpu(td, tf, k, v)[0]


class _PeakRss:
    """Samples this process's resident set every 2 ms; .peak_mb is the high-water mark above the start."""

    def __enter__(self):
        self.start, self.peak, self.done = self._rss(), 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak_mb = (max(self.peak, self._rss()) - self.start) / 2**20

    def _watch(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()


def kd_child(mode: str, threads: int) -> dict:
    """One KD-loss variant in this process: {seconds, peak_rss_mb} (sampled peak above the set-up RSS)."""
    import torch.nn.functional as F

    from pipeline.fused_kd import fused_head_kd_loss

    torch.set_num_threads(threads)
    N, C, V = KD_SHAPE
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, C, generator=gen).requires_grad_()
    w = (torch.randn(V, C, generator=gen) * 0.05).requires_grad_()
    teacher = torch.randn(N, V, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    with _PeakRss() as rss:
        start = time.perf_counter()
        if mode == "naive":
            logits = h @ w.t()
            log_p, log_q = torch.log_softmax(logits / 2.0, -1), torch.log_softmax(teacher / 2.0, -1)
            kd = 4.0 * (log_q.exp() * (log_q - log_p)).sum()
            ce = F.cross_entropy(logits, labels, reduction="sum")
            (kd + ce).backward()
        else:
            weights = (1.0, 1.0) if mode == "fused+weights" else None
            out = fused_head_kd_loss(h, w, labels, teacher, "forward_kl", 2.0, 512, loss_weights=weights)
            (out["kd_sum"] + out["ce_sum"]).backward()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": rss.peak_mb}


def bench_kd(threads: int) -> dict[str, dict]:
    """Each KD variant in a fresh subprocess so peak RSS is its own."""
    results = {}
    for mode in ("naive", "fused", "fused+weights"):
        cmd = [sys.executable, __file__, "--kd-child", mode, "--threads", str(threads)]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    return results


def bench_step(repeats: int, device: str = "cpu") -> list[tuple[str, str, float]]:
    """Tokens/s of one distill step per mixer: reference kernels + chunked loss vs auto kernels + fused loss."""
    from pipeline.fused_kd import fused_head_kd_loss
    from pipeline.losses import chunked_logit_losses
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    B, L = STEP_SHAPE
    rows = []
    for mixer in ("srwkv", "sfsa"):
        cfg = SpikeGPTConfig.from_preset("demo", vocab_size=49152, d_model=256, token_mixer=mixer)
        model = SpikeGPTForCausalLM(cfg).to(device)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 49152, (B, L), generator=gen).to(device)
        labels, teacher = ids.roll(-1, 1).reshape(-1), torch.randn(B * L, 49152, generator=gen).to(device)

        def step(fused, model=model, ids=ids, labels=labels, teacher=teacher):
            model.zero_grad(set_to_none=True)
            h = model(ids, skip_logits=True).head_input.reshape(B * L, -1)
            if fused:
                out = fused_head_kd_loss(h, model.lm_head.weight, labels, teacher, "forward_kl", 2.0, 1024)
            else:
                out = chunked_logit_losses(h, model.lm_head, labels, teacher, "forward_kl", 2.0, 1024)
            (out["kd_sum"] + out["ce_sum"]).backward()

        for backend, fused in (("reference", False), ("auto", True)):
            os.environ["SPIKEDISTILL_KERNELS"] = backend
            seconds = median_time(lambda f=fused: step(f), repeats, warmup=1, device=device)
            rows.append((f"step {mixer}", backend, B * L / seconds))
        os.environ.pop("SPIKEDISTILL_KERNELS")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-kd", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the tensors live (default: cuda when available)")
    parser.add_argument("--kd-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kd_child:
        print(json.dumps(kd_child(args.kd_child, int(args.threads))))
        return
    cuda = torch.device(args.device).type == "cuda"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(args.device)}" if cuda
          else f"torch {torch.__version__}, {os.cpu_count()} CPUs, no GPU")  # fmt: skip
    print(f"shapes: lif {LIF_SHAPE} [B,S,N]; wkv {WKV_SHAPE} [B,L,C]; sfsa {SFSA_SHAPE} [B,H,L,D] binary p=0.2; "
          f"kd {KD_SHAPE} [N,C,V]; step {STEP_SHAPE} [B,L] d_model 256 4 layers V 49152")  # fmt: skip
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s), median of {args.repeats}")
        print(f"| {'what':<14} | {'implementation':<18} | {'fwd+bwd ms':>11} | {'speed-up vs reference':>21} |")
        print(f"|{'-' * 16}|{'-' * 20}|{'-' * 13}|{'-' * 23}|")
        ops = bench_ops(args.repeats, args.device)
        ref = {op: s for op, impl, s in ops if impl == "reference"}
        for op, impl, s in ops:
            print(f"| {op:<14} | {impl:<18} | {s * 1e3:>11.1f} | {ref[op] / s:>20.2f}x |")
        if not args.skip_kd and not cuda:  # peak RSS of CPU runs
            kd = bench_kd(threads)
            naive = kd["naive"]
            print(f"\n| fused KD loss {KD_SHAPE} | seconds | time vs naive | peak RSS MB | memory vs naive |")
            print("|---|---|---|---|---|")
            for mode, r in kd.items():
                print(f"| {mode} | {r['seconds']:.2f} | {naive['seconds'] / r['seconds']:.2f}x faster | "
                      f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / naive['peak_rss_mb']:.2f} |")  # fmt: skip
        if not args.skip_step:
            steps = bench_step(max(1, args.repeats - 2), args.device)
            print(f"\n| distill step {STEP_SHAPE} | kernels | tokens/s | speed-up |")
            print("|---|---|---|---|")
            base = {name: tps for name, impl, tps in steps if impl == "reference"}
            for name, impl, tps in steps:
                print(f"| {name} | {impl} | {tps:.0f} | {tps / base[name]:.2f}x |")


if __name__ == "__main__":
    main()
