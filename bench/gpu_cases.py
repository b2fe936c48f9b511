"""The GPU check's cases (bench/gpu_check.py): Triton kernels against their references, the tiny teacher and
the distill runs. Inputs are built on the CPU from fixed seeds, then moved to the device.

A case's inputs are fp32 `Input`s; `cast` ones take the case's dtype (fp32 or bf16), the others (LIF membranes,
WKV decay and state, thresholds, labels) stay as they are, as in the model. For a Triton kernel the fast path
gets the cast tensors and the reference the same values in fp32 (the kernels compute in fp32 whatever their
input dtype), so a bf16 case measures only the kernel's own error and the rounding of its outputs.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

LIF = {"tau": 2.0, "v_threshold": 1.0}
QUICK_OP_SHAPES = {"lif": (2, 16, 64), "wkv": (2, 16, 64), "sfsa": (1, 2, 16, 8)}
TEACHER_TEXT = "austen"


@dataclass
class Input:
    tensor: torch.Tensor
    cast: bool = True  # takes the case's dtype
    grad: bool = True


@dataclass
class Case:
    name: str
    inputs: Callable[[], list[Input]]
    fast: Callable
    ref: Callable
    binary: tuple[bool, ...]  # per output (nested tuples flattened, None dropped): {0, 1} spikes or maps
    # a Triton kernel itself (compiled in the compile section; its bf16 case is compared with the fp32 reference),
    # or an op composed of PyTorch ops and Triton kernels (compared with the reference run in the same dtype:
    # its PyTorch part rounds to bf16 as the reference does)
    triton: bool = True
    dtypes: tuple[torch.dtype, ...] = field(default=(torch.float32, torch.bfloat16))


@contextmanager
def triton_backend():
    """SPIKEDISTILL_KERNELS=triton inside: the dispatch functions pick the Triton kernels (on CUDA, what auto
    does; on a CPU with TRITON_INTERPRET=1, the interpreted kernels)."""
    old = os.environ.get("SPIKEDISTILL_KERNELS")
    os.environ["SPIKEDISTILL_KERNELS"] = "triton"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPIKEDISTILL_KERNELS")
        else:
            os.environ["SPIKEDISTILL_KERNELS"] = old


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _binary(shape, rate: float, seed: int) -> torch.Tensor:
    return (torch.rand(shape, generator=_gen(seed)) < rate).float()


def parity_cases(quick: bool) -> list[Case]:
    """Every Triton kernel and every op composed from one, at realistic shapes (or tiny ones when quick)."""
    from students.ops.fused_lif import (
        relu_square_lif,
        relu_square_lif_reference,
        sigmoid_gate_lif,
        sigmoid_gate_lif_reference,
        token_shift_lif,
        token_shift_lif_reference,
    )
    from students.ops.lif import lif_scan_reference
    from students.ops.lif.triton import lif_scan_triton
    from students.ops.linear_ce import linear_cross_entropy_reference
    from students.ops.linear_ce.triton import linear_cross_entropy_triton
    from students.ops.sfsa import sfsa_linear_reference, sfsa_reference
    from students.ops.sfsa.cpu import sfsa_linear_chunked
    from students.ops.sfsa.triton import sfsa_triton
    from students.ops.wkv import wkv_reference
    from students.ops.wkv.triton import wkv_triton

    b, s, n = (2, 7, 130) if quick else (8, 512, 1024)  # N crosses a block at both sizes
    attn = (1, 2, 21, 8) if quick else (8, 8, 512, 64)  # B, H, L, D: d_model 512
    ce = (13, 8, 37, 5) if quick else (4096, 512, 49152, 256)  # N, C, V, chunk
    soft = {"reset": "soft", "surrogate": "sigmoid", "detach_reset": True}

    def lif_inputs():
        return [Input(torch.randn(b, s, n, generator=_gen(0)) * 1.5 + 0.7),
                Input(torch.randn(b, n, generator=_gen(1)), cast=False)]  # fmt: skip

    def wkv_inputs():
        td, tf = torch.randn(n, generator=_gen(2)), torch.randn(n, generator=_gen(3))
        warm = [torch.randn(b, 4, n, generator=_gen(4)), torch.randn(b, 4, n, generator=_gen(5))]
        _, state = wkv_reference(td, tf, *warm)
        return [Input(td, cast=False), Input(tf, cast=False), Input(torch.randn(b, s, n, generator=_gen(6)) * 2),
                Input(torch.randn(b, s, n, generator=_gen(7))), *(Input(t, cast=False) for t in state)]

    def attn_inputs(rate):
        return lambda: [Input(_binary(attn, rate, 8 + i)) for i in range(3)] + [
            Input(torch.tensor([2.0, 3.0, 4.0, 3.0] * 4)[: attn[1]], cast=False)]  # thresholds exact in bf16

    def ce_inputs():
        labels = torch.randint(0, ce[2], (ce[0],), generator=_gen(11))
        labels[::7] = -100
        return [Input(torch.randn(ce[0], ce[1], generator=_gen(12))),
                Input(torch.randn(ce[2], ce[1], generator=_gen(13)) * ce[1] ** -0.5),
                Input(labels, cast=False, grad=False)]  # fmt: skip

    def two(shift=0.0):
        return lambda: [Input(torch.randn(b, s, n, generator=_gen(14))),
                        Input(torch.randn(b, s, n, generator=_gen(15)) + shift)]  # fmt: skip

    def shift_inputs():
        return [Input(torch.randn(b, s, n, generator=_gen(16)) * 2), Input(torch.rand(2, n, generator=_gen(17)))]

    rate = 0.4 if quick else 0.2
    return [
        Case("lif", lif_inputs, lif_scan_triton, lif_scan_reference, (True, False)),
        Case("lif soft reset", lif_inputs, lambda x, v: lif_scan_triton(x, v, **soft),
             lambda x, v: lif_scan_reference(x, v, **soft), (True, False)),
        Case("wkv", wkv_inputs, lambda td, tf, k, v, *st: wkv_triton(td, tf, k, v, st),
             lambda td, tf, k, v, *st: wkv_reference(td, tf, k, v, st), (False,) * 4),
        Case("sfsa", attn_inputs(rate), sfsa_triton, sfsa_reference, (False, True)),
        Case("sfsa scalar threshold", lambda: attn_inputs(rate)()[:3],
             lambda q, k, v: sfsa_triton(q, k, v, 4.0, surrogate="sigmoid"),
             lambda q, k, v: sfsa_reference(q, k, v, 4.0, surrogate="sigmoid"), (False, True)),
        Case("linear_ce", ce_inputs, lambda x, w, y: linear_cross_entropy_triton(x, w, y, "mean", ce[3]),
             linear_cross_entropy_reference, (False,)),
        Case("sfsa_linear (chunked)", lambda: attn_inputs(rate)()[:3], sfsa_linear_chunked, sfsa_linear_reference,
             (False, False), triton=False),
        Case("sigmoid_gate_lif", two(1.0), lambda r, y: sigmoid_gate_lif(r, y, None, LIF),
             lambda r, y: sigmoid_gate_lif_reference(r, y, None, LIF), (True, False), triton=False),
        Case("relu_square_lif", lambda: two()()[:1], lambda z: relu_square_lif(z, None, LIF),
             lambda z: relu_square_lif_reference(z, None, LIF), (True, False), triton=False),
        Case("token_shift_lif", shift_inputs, lambda h, mix: token_shift_lif(h, mix, None, None, 1, LIF),
             lambda h, mix: token_shift_lif_reference(h, mix, None, None, 1, LIF), (True, False, False),
             triton=False),
    ]  # fmt: skip


def compile_cases() -> list[Case]:
    """The Triton kernels, at tiny shapes (a first call compiles them)."""
    return [c for c in parity_cases(quick=True) if c.triton]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leaves(case: Case, dtype: torch.dtype, device: torch.device) -> tuple[list, list]:
    """(fast inputs, reference inputs): leaves on device; the reference's cast inputs are the fast ones, in fp32
    for a Triton kernel, in the same dtype for a composed op."""
    fast, ref = [], []
    for i in case.inputs():
        t = i.tensor.to(device=device, dtype=dtype if i.cast else i.tensor.dtype)
        r = t.detach().float() if i.cast and case.triton else t.detach().clone()
        fast.append(t.requires_grad_() if i.grad else t)
        ref.append(r.requires_grad_() if i.grad else r)
    return fast, ref


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [] if out is None else [out]


def _backward(outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int = 20) -> list:
    """Gradients of sum(output * fixed random cotangent) w.r.t. the inputs that require them (None where unused)."""
    gen = _gen(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    wanted = [t for t in inputs if t.requires_grad]
    return list(torch.autograd.grad(loss, wanted, allow_unused=True))


def first_call(case: Case, device: torch.device) -> float:
    """Seconds of the first forward + backward (fp32 and bf16) and a no-gradient forward: compiles the kernels."""
    start = time.perf_counter()
    for dtype in case.dtypes:
        fast, _ = _leaves(case, dtype, device)
        _backward(_flat(case.fast(*fast)), fast)
        with torch.no_grad():
            case.fast(*fast)
    _sync(device)
    return round(time.perf_counter() - start, 3)


def mismatch(fast: torch.Tensor | None, ref: torch.Tensor | None, binary: bool, rtol: float) -> dict:
    """How far `fast` is from `ref`: {"share": share of elements that differ (binary) or differ by more than
    rtol x (|ref| + rms(ref)) (float), "rel_l2": L2 error / L2 norm of ref}. A missing tensor on one side only, a
    shape mismatch or a non-finite value where the reference is finite counts as share 1.

    A share, not a maximum: at realistic sizes a membrane one rounding away from the threshold may flip a spike
    (and, after it, a few more of that neuron and their gradients), which a wrong kernel does everywhere."""
    if fast is None or ref is None:
        return {"share": 0.0 if fast is None and ref is None else 1.0, "rel_l2": 0.0}
    fast, ref = fast.detach().float(), ref.detach().float()
    if fast.shape != ref.shape or bool((~torch.isfinite(fast) & torch.isfinite(ref)).any()):
        return {"share": 1.0, "rel_l2": math.inf}
    diff = (fast - ref).abs()
    rel_l2 = float(diff.norm() / ref.norm().clamp_min(1e-30))
    if binary:
        return {"share": float((diff != 0).float().mean()), "rel_l2": rel_l2}
    scale = ref.abs() + ref.pow(2).mean().sqrt()
    return {"share": float((diff > rtol * scale).float().mean()), "rel_l2": rel_l2}


def compare(case: Case, dtype: torch.dtype, device: torch.device, tol: dict) -> dict:
    """Outputs and gradients of the case's fast path against its reference; ok when no tensor's mismatch share
    exceeds tol["share"] (elementwise tolerance tol["rtol"])."""
    fast_in, ref_in = _leaves(case, dtype, device)
    fast_out, ref_out = _flat(case.fast(*fast_in)), _flat(case.ref(*ref_in))
    if len(fast_out) != len(ref_out) or len(ref_out) != len(case.binary):
        raise RuntimeError(f"{case.name}: {len(fast_out)} fast outputs, {len(ref_out)} reference outputs, "
                           f"{len(case.binary)} expected")  # fmt: skip
    pairs = [(f, r, b) for f, r, b in zip(fast_out, ref_out, case.binary)]
    pairs += [(f, r, False) for f, r in zip(_backward(fast_out, fast_in), _backward(ref_out, ref_in))]
    errors = [mismatch(f, r, b, tol["rtol"]) for f, r, b in pairs]
    _sync(device)
    worst_share, worst_l2 = max(e["share"] for e in errors), max(e["rel_l2"] for e in errors)
    return {"case": case.name, "dtype": str(dtype).split(".")[-1], "ok": worst_share <= tol["share"],
            "worst_share": worst_share, "worst_rel_l2": worst_l2, "errors": errors,
            "shapes": [list(t.shape) for t in fast_in]}  # fmt: skip


def time_linear_ce(device: torch.device, quick: bool, repeats: int) -> dict:
    """LM head + CE fwd+bwd at N 4096, C 512, V 49,152 (quick: tiny): reference vs Triton, median ms and peak
    memory above the inputs (CUDA; NaN on a CPU)."""
    from bench.kernels import median_time

    case = next(c for c in parity_cases(quick) if c.name == "linear_ce")
    fast, ref = _leaves(case, torch.float32, device)
    result = {}
    for name, fn, inputs in (("reference", case.ref, ref), ("triton", case.fast, fast)):
        def run(fn=fn, inputs=inputs):
            _backward(_flat(fn(*inputs)), inputs)

        peak = math.nan
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        result[name] = {"impl": name, "ms": median_time(run, repeats, device=str(device)) * 1e3, "peak_mb": peak}
    return result


def tiny_teacher(folder: Path, quick: bool) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the bundled Austen text (vocab 4,096;
    quick: 512), "<|endoftext|>" id 0 as BOS, EOS and pad; saved once into `folder`."""
    if (folder / "config.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from teachers.data import bundled_corpus, read_text

    text = read_text(bundled_corpus()[TEACHER_TEXT])[: 20_000 if quick else 400_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512 if quick else 4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")  # fmt: skip
    torch.manual_seed(0)
    width = 32 if quick else 64
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    tmp = folder.with_name(folder.name + ".tmp")
    LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def distill_overrides(teacher: Path, cache: Path, steps: int, quick: bool) -> list[str]:
    """recipes/demo.yaml overrides: the tiny teacher, its top-k targets cached in `cache` (shared by the runs),
    no align stage, `steps` bf16 distill steps of the demo student (4 x 128)."""
    return [f"teacher.spec={teacher}", "teacher.dtype=bf16", "student.init_from_teacher=false",
            "align.enabled=false", "teacher_cache.enabled=true", f"teacher_cache.dir={cache}",
            f"teacher_cache.k={8 if quick else 64}", f"data.max_train_tokens={6000 if quick else 200000}",
            f"data.seq_len={32 if quick else 128}", f"distill.train.steps={steps}",
            f"distill.train.batch_size={2 if quick else 8}", f"distill.train.eval_every={steps}",
            "distill.train.eval_batches=1", f"distill.train.checkpoint_every={steps}",
            f"distill.train.log_every={max(1, steps // 5)}", "distributed.mixed_precision=bf16", "run.name=gpu-check"]


def distill_summary(run_dir: Path) -> dict:
    """What a distill run wrote: steps, first and last training loss, whether all were finite, its metrics."""
    path = run_dir / "distill" / "metrics.jsonl"
    if not path.is_file():
        return {"steps": 0}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    done = run_dir / "distill" / "done.json"
    metrics = json.loads(done.read_text()).get("metrics", {}) if done.is_file() else {}
    return {"steps": len(losses), "first_loss": losses[0] if losses else math.nan,
            "last_loss": losses[-1] if losses else math.nan,
            "finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "tokens_per_s": metrics.get("tokens_per_s"), "val_loss": metrics.get("val_loss")}  # fmt: skip
