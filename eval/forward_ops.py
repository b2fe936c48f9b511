"""Op counts per token from one real forward: every aten op the model runs, split into matmul, attention and
elementwise, attributed to the innermost module that ran it.

Counted while a real forward of `[1, n]` tokens runs (n = the reporting context), then divided by n:
- matmul: matrix products with a parameter operand (nn.Linear, GPT-2's Conv1D addmm, fused MoE experts
  `_grouped_mm` over the tokens actually routed to each expert, a tied head), in multiply-accumulates, from
  the formulas of `torch.utils.flop_counter` (FLOPs / 2; `_grouped_mm` has none there: rows x K x N);
- attention: `scaled_dot_product_attention` counted from its real mask (a boolean or additive mask: the
  allowed entries; is_causal: the lower triangle), so a causal query costs the keys it sees ((n+1)/2 on
  average) and a sliding window at most the window: Q K^T and A V, heads x (d_qk + d_v) per allowed entry.
  Any other product of two activations (eager attention) is counted as it runs, masked entries included;
- elementwise: floating-point work outside products: one op per output element of each pointwise op, one
  per input element of each reduction, 6 per element of a LayerNorm (4 without affine), 5 of a softmax
  (max, subtract, exp, sum, divide), and 6 per allowed score inside SDPA (scale + softmax). Integer and
  boolean bookkeeping (positions, mask building, routing indices) and data movement (views, copies,
  gathers, embedding lookups) cost nothing here; memory traffic is priced separately (eval/energy.py).
A matrix product with an inner dimension of 1 is an outer product and counts as elementwise.

The same forward records, per module and per token, the memory traffic the energy model prices: weight
elements read (each weight of a product once per token at batch 1, embedding rows looked up), activation
elements read and written by the weight products (their input and output), and the KV cache read by
attention (the allowed keys and values of each query, per KV head) and written (one key and value per token),
with the cache's size at the end of the context.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from eval import EvalError

aten = torch.ops.aten

KINDS = ("matmul", "attention", "elementwise")
TRAFFIC = ("weight_reads", "act_reads", "act_writes", "kv_reads", "kv_writes")
PRODUCTS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten._convolution}
NORM_OPS = {aten.native_layer_norm: 6, aten.native_group_norm: 6}
SOFTMAX_OPS = {aten._softmax: 5, aten._log_softmax: 5, aten._safe_softmax: 5}
SDPA_ELEMENTWISE_PER_SCORE = 6  # scale (1) + softmax (5)
LAYER_PARENTS = ("layers", "h", "blocks", "layer", "decoder_layers")


def layer_of(name: str) -> int | None:
    """The block index in a module name ("model.layers.3.mlp" -> 3), or None outside the blocks."""
    for a, b in pairwise(name.split(".")):
        if a in LAYER_PARENTS and b.isdigit():
            return int(b)
    return None


def causal_pairs(q_len: int, k_len: int) -> int:
    """Allowed entries of SDPA's is_causal mask (lower-triangular, top-left aligned) for [q_len, k_len]."""
    return sum(min(i + 1, k_len) for i in range(q_len))


def _allowed_entries(mask: torch.Tensor, q_len: int, k_len: int, batch_heads: int) -> float:
    """Allowed (query, key) entries of an SDPA mask, summed over batch x heads."""
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask > torch.finfo(mask.dtype).min / 2  # HF's additive masks use the dtype's minimum
    full = allowed.expand(*allowed.shape[:-2], q_len, k_len) if allowed.dim() >= 2 else allowed
    per_map = float(full.sum()) / max(1, math.prod(full.shape[:-2]))
    return per_map * batch_heads


class _Attribution:
    """Which module is running: a stack kept by forward pre/post hooks on every submodule."""

    def __init__(self, model: torch.nn.Module):
        self.stack = [""]
        self.handles = []
        for name, module in model.named_modules():
            if name:
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name):
        def hook(*_):
            self.stack.append(name)

        return hook

    def _leave(self, *_):
        self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Counts:
    def __init__(self, model: torch.nn.Module):
        self.by_module: dict[tuple[str, str], float] = defaultdict(float)
        self.traffic: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(TRAFFIC, 0.0))
        self.kv_size = 0.0
        self.where = _Attribution(model)
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.inside_sdpa = 0

    def add(self, kind: str, ops: float) -> None:
        if ops:
            self.by_module[(self.where.current, kind)] += float(ops)

    def move(self, key: str, elements: float) -> None:
        self.traffic[self.where.current][key] += float(elements)

    def is_weight(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.weights


class _SDPACounter(TorchFunctionMode):
    """Counts F.scaled_dot_product_attention from its arguments (before any backend runs)."""

    def __init__(self, counts: _Counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.counts.inside_sdpa:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        bound = dict(zip(names, args)) | kwargs
        q, k, v = bound["query"], bound["key"], bound["value"]
        q_len, k_len = q.shape[-2], k.shape[-2]
        batch_heads = math.prod(q.shape[:-2])
        if bound.get("attn_mask") is not None:
            pairs = _allowed_entries(bound["attn_mask"], q_len, k_len, batch_heads)
        elif bound.get("is_causal"):
            pairs = causal_pairs(q_len, k_len) * batch_heads
        else:
            pairs = q_len * k_len * batch_heads
        self.counts.add("attention", pairs * (q.shape[-1] + v.shape[-1]))
        self.counts.add("elementwise", pairs * SDPA_ELEMENTWISE_PER_SCORE)
        kv_heads, batch = k.shape[-3] if k.dim() >= 3 else 1, math.prod(k.shape[:-3])
        per_key = kv_heads * (k.shape[-1] + v.shape[-1]) * batch  # one key and one value per KV head
        self.counts.move("kv_reads", pairs / max(1, batch_heads) * per_key)
        self.counts.move("kv_writes", k_len * per_key)
        self.counts.kv_size += k_len * per_key
        self.counts.inside_sdpa += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counts.inside_sdpa -= 1


def _grouped_mm_macs(mat_a, mat_b, *_, **__) -> float:
    """aten._grouped_mm: each row of mat_a [M, K] (or [G, M, K]) meets its group's [K, N] -> M * K * N."""
    return mat_a.numel() * mat_b.shape[-1]


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, torch.Tensor)), None)
    return None


class _DispatchCounter(TorchDispatchMode):
    """Counts every aten op that reaches dispatch (after autograd's decompositions)."""

    def __init__(self, counts: _Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.counts.inside_sdpa:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        packet = func._overloadpacket
        if packet in PRODUCTS or packet is aten._grouped_mm:
            self._product(packet, args, kwargs, out)
            return
        first = _first_tensor(out)
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if packet is aten.embedding and self.counts.is_weight(source):
            self.counts.move("weight_reads", first.numel())
        elif packet in NORM_OPS and _floating(source):
            weight = args[2] if len(args) > 2 else None
            self.counts.add("elementwise", source.numel() * (NORM_OPS[packet] if weight is not None else 4))
        elif packet in SOFTMAX_OPS and _floating(source):
            self.counts.add("elementwise", source.numel() * SOFTMAX_OPS[packet])
        elif torch.Tag.pointwise in func.tags and _floating(first):
            self.counts.add("elementwise", first.numel())
        elif (torch.Tag.reduction in func.tags or packet is aten.cumsum) and _floating(source):
            self.counts.add("elementwise", source.numel())

    def _product(self, packet, args, kwargs, out) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if packet is aten._grouped_mm:
            macs = _grouped_mm_macs(*args, **kwargs)
            inner = args[0].shape[-1]
        else:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            macs = flops / 2
            operands = tensors[1:3] if packet in (aten.addmm, aten.baddbmm) else tensors[:2]
            inner = operands[0].shape[-1] if packet not in (aten.convolution, aten._convolution) else 2
        if inner == 1:  # an outer product: one multiply per output element
            self.counts.add("elementwise", _first_tensor(out).numel())
        elif any(self.counts.is_weight(t) for t in tensors):
            self.counts.add("matmul", macs)
            self.counts.move("weight_reads", macs)  # batch-1 decoding: each weight read once per token
            skip_bias = packet in (aten.addmm, aten.baddbmm)
            operands = tensors[1:] if skip_bias else tensors
            self.counts.move("act_reads", sum(t.numel() for t in operands if not self.counts.is_weight(t)))
            self.counts.move("act_writes", _first_tensor(out).numel())
        else:
            self.counts.add("attention", macs)


@contextmanager
def _sdpa_attention(model):
    """Run HF attention through SDPA (so masks are read, not multiplied) when the model supports it."""
    setter = getattr(model, "set_attn_implementation", None)
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switched = False
    if setter is not None and before not in (None, "sdpa"):
        try:
            setter("sdpa")
            switched = True
        except (ValueError, ImportError, AttributeError):
            switched = False
    try:
        yield
    finally:
        if switched:
            setter(before)


@dataclass
class ForwardCount:
    """What one forward of n tokens did, per token: op rows, memory traffic per module (elements), the KV cache
    size at the end of the context (elements), and the head's module name."""

    rows: list[dict]
    traffic: dict[str, dict[str, float]]
    kv_size: float
    context_length: int
    head: str | None = None
    totals: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.totals = {k: sum(r["ops"] for r in self.rows if r["kind"] == k) for k in KINDS}
        for key in TRAFFIC:
            self.totals[key] = sum(t[key] for t in self.traffic.values())


def head_module_name(model) -> str | None:
    """The qualified name of the output projection (the LM head), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


@torch.no_grad()
def count_forward(model: torch.nn.Module, context_length: int, input_ids: torch.Tensor | None = None) -> ForwardCount:
    """Ops and memory traffic per token of one real forward of `model` over `context_length` tokens.

    input_ids: [1, n] ids to run (default: token 0 repeated; counts do not depend on the values: MoE routing
    always sends each token to its top-k experts). Rows: [{"name": module name ("" = the root), "layer": block
    index or None, "kind": matmul | attention | elementwise, "ops": per token}], non-zero only, first-seen
    order. Raises EvalError if the forward fails (e.g. a context beyond the model's position table).
    """
    if context_length < 1:
        raise EvalError(f"energy: context_length must be >= 1, got {context_length} (fix --context)")
    device = next(model.parameters()).device
    ids = input_ids if input_ids is not None else torch.zeros(1, context_length, dtype=torch.long)
    ids = ids.to(device)
    counts = _Counts(model)
    was_training = model.training
    model.eval()
    try:
        with _sdpa_attention(model), _SDPACounter(counts), _DispatchCounter(counts):
            model(ids)
    except (RuntimeError, IndexError, ValueError) as exc:
        raise EvalError(
            f"energy: a forward of {ids.shape[1]} tokens failed ({type(exc).__name__}: {str(exc)[:120]}); "
            "lower --context to the model's maximum positions"
        ) from exc
    finally:
        counts.where.remove()
        model.train(was_training)
    n = ids.shape[1]
    rows = [
        {"name": name, "layer": layer_of(name), "kind": kind, "ops": ops / n}
        for (name, kind), ops in counts.by_module.items()
    ]
    traffic = {name: {k: v / n for k, v in t.items()} for name, t in counts.traffic.items()}
    return ForwardCount(rows, traffic, counts.kv_size, n, head_module_name(model))


def count_forward_ops(model: torch.nn.Module, context_length: int, input_ids: torch.Tensor | None = None) -> list[dict]:
    """The op rows of `count_forward` (per token)."""
    return count_forward(model, context_length, input_ids).rows
