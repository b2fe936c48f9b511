"""Peak memory of a training stage, estimated before it runs, and the refusal when it will not fit.

One process's peak (bytes) is the largest of the training peak and the set-up peak. The training peak sums
  baseline      the interpreter with torch, transformers and the kernels loaded
  student       weights, gradients and AdamW's two moments: 16 bytes per trainable parameter (student + SpAD
                projections), times STATE_OVERHEAD (what the allocator keeps on top, measured); sharded over
                the processes by FSDP and by DeepSpeed ZeRO (stage 1: moments, 2: + gradients, 3: + weights);
                DDP adds one gradient bucket copy
  activations   what autograd keeps for the backward of one row, measured by a probe (below), x batch
  transient     one layer's activations twice (forward outputs and backward gradients in flight), and SRWKV's
                per-head implied attention recomputed in the backward when SAA is on
  logits        the fused head + KD loss's chunk: HEAD_BUFFERS fp32 [chunk_size, V] buffers
  teacher       weights in teacher.dtype; per row its outputs kept for the SpAD terms (per-layer hidden
                states, attention maps [H, L, L] when SAA is on) and one layer's work (eager attention
                scores, the MLP's hidden activations)
The set-up peak is weight inheritance (student.init_from_teacher): float64 copies of the teacher's embedding.
The probe runs the student (and the SpAD terms on stand-in teacher outputs of the right shapes) on one row at
three short lengths under torch.autograd.graph.saved_tensors_hooks, counting the bytes of every saved tensor
that is not a parameter, and fits a + b L + c L^2 through them: each saved tensor is [L, ...] or [L, L, ...]
(attention maps), so the fit is exact and extrapolates to data.seq_len.

Calibrated on this project's 2-core CPU against peak RSS (/proc/self/status VmHWM) of real stage runs:
`python -m bench.memory` prints measured against estimated; recipes/README.md has the figures. Not calibrated
on a GPU (none here): with CUDA the same estimate is compared with the device's free memory.

Available memory: the smaller of /proc/meminfo MemAvailable and the cgroup limit minus its usage (v2
memory.max / memory.current, v1 memory.limit_in_bytes / memory.usage_in_bytes); with CUDA, the device's free
memory. SPIKEDISTILL_MEMORY_AVAILABLE (bytes, or with a K/M/G/T suffix: 12G = 12e9, 12GiB = 12 x 2^30)
replaces the measured figure: to test the refusal, or to let through a run that the estimate refuses.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

# calibrated on this project's 2-core CPU (bench/memory.py; the figures are in recipes/README.md)
BASELINE_BYTES = 0.6e9  # resident set of `spikedistill run` when its first stage starts (imports, kernels)
STATE_OVERHEAD = 1.7  # peak resident bytes per byte of weights + gradients + AdamW moments
HEAD_BUFFERS = 3  # fp32 [chunk_size, V] buffers of the fused head + KD loss alive at once
TRANSIENT_LAYERS = 2.0  # one layer's activations, in flight twice (forward outputs, backward gradients)
SPECIALS_ROOM = 64  # tokens a derived student vocabulary may add: the teacher's special tokens, bytes it lacks
INHERIT_COPIES = 5  # float64 [V, C_t] copies alive in weight inheritance's SVD / least-squares solve
PROBE_LENGTHS = (8, 16, 24)
PROBE_VOCAB = 64
ENV_AVAILABLE = "SPIKEDISTILL_MEMORY_AVAILABLE"
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Estimate:
    """A stage's estimated peak per process in bytes: `fixed` parts, `per_row` parts (times the batch), and
    `setup`, the peak before training starts (weight inheritance's float64 work), 0 when none."""

    stage: str
    batch_key: str
    batch: int
    fixed: dict[str, float] = field(default_factory=dict)
    per_row: dict[str, float] = field(default_factory=dict)
    setup: float = 0.0

    def parts(self, batch: int | None = None) -> dict[str, float]:
        """Bytes by part of the training peak at `batch` rows (default: the recipe's)."""
        rows = self.batch if batch is None else batch
        return {**self.fixed, **{k: v * rows for k, v in self.per_row.items()}}

    def total(self, batch: int | None = None) -> float:
        """The peak at `batch` rows: the training peak or the set-up peak, whichever is larger."""
        return max(sum(self.parts(batch).values()), self.setup)


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


# --------------------------------------------------------------------------------------------- available
def parse_bytes(text: str) -> int:
    """'12G' or '12GB' -> 12e9 (decimal, as the messages print), '12GiB' -> 12 * 2**30; a plain number is
    bytes. ConfigError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"{ENV_AVAILABLE}={text!r}: expected bytes or a number with K/M/G/T, e.g. 12G")
    unit = (m.group(2) or "").upper()
    return int(float(m.group(1)) * (2 ** (10 * "KMGT".find(unit) + 10) if m.group(3) else _UNITS[unit]))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """The cgroup memory limit minus its usage (v2, else v1), or None when unlimited or unknown. The folder is
    this process's cgroup, else the mount's root (inside a container the root is the container's group)."""
    root = Path("/sys/fs/cgroup")
    try:
        groups = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    except OSError:
        return None
    rel = {ctl: path.lstrip("/") for _, ctl, path in (g for g in groups if len(g) == 3)}
    v1 = next((path for ctl, path in rel.items() if "memory" in ctl.split(",")), None)
    places = [(root / rel[""], "memory.max", "memory.current")] if "" in rel else []
    if v1 is not None:
        places += [(root / "memory" / v1, "memory.limit_in_bytes", "memory.usage_in_bytes"),
                   (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit, usage in places:
        cap, used = _read_int(folder / limit), _read_int(folder / usage)
        if cap is not None and used is not None:
            return max(0, cap - used) if cap < 2**60 else None
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> tuple[int | None, str]:
    """(bytes this run may still use, where the figure comes from); (None, ...) when unknown."""
    if os.environ.get(ENV_AVAILABLE):
        return parse_bytes(os.environ[ENV_AVAILABLE]), ENV_AVAILABLE
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0]), "free CUDA memory"
    found = [(n, src) for n, src in ((_mem_available(), "MemAvailable"), (_cgroup_room(), "cgroup limit - usage"))
             if n is not None]
    return min(found) if found else (None, "unknown")


# ----------------------------------------------------------------------------------------------- probe
def _stand_in_teacher(shape: Any, length: int):
    """Teacher outputs of the right shapes for the SpAD terms (values do not matter to their memory)."""
    import torch

    from teachers import TeacherOutput

    h = torch.randn(1, length, shape.hidden)
    maps = torch.softmax(torch.randn(1, shape.heads, length, length), -1)
    return TeacherOutput(logits=None, embeddings=h, hidden_states=(h,) * shape.layers,
                         attentions=(maps,) * shape.layers, last_hidden_state=h)


def _saved_bytes(student, spad, length: int, shape: Any) -> int:
    """Bytes of the non-parameter tensors autograd saves for one row of `length` tokens."""
    import torch

    params = {p.untyped_storage().data_ptr() for m in (student, spad) if m is not None for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(student.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if getattr(student.config, "model_type", "") != "spikegpt":
            student.get_decoder()(ids)
        else:
            out = student(ids, skip_logits=True, output_hidden_states=spad is not None and spad.needs_hidden_states,
                          output_attentions=spad is not None and spad.needs_attentions)
            if spad is not None:
                spad(out, spad.teacher_targets(_stand_in_teacher(shape, length), length - 1, length), length - 1)
    return sum(seen.values())


def _length_fit(student, spad, shape: Any) -> tuple[float, float, float]:
    """(a, b, c): one row of L tokens saves a + b L + c L^2 bytes (exact through PROBE_LENGTHS)."""
    import numpy as np

    lengths = np.array(PROBE_LENGTHS, dtype=np.float64)
    saved = np.array([_saved_bytes(student, spad, int(n), shape) for n in PROBE_LENGTHS], dtype=np.float64)
    a, b, c = np.linalg.solve(np.stack([np.ones_like(lengths), lengths, lengths**2], 1), saved)
    return float(a), float(b), float(c)


def _build(recipe: Any, config: Any, shape: Any, weights: dict[str, float]):
    """(student, SpAD module or None) for `config`, as the training stages build them."""
    from pipeline.build import spad_module
    from students import SpikeGPTForCausalLM, matched_llama
    from teachers import layer_map

    student = (matched_llama(config, recipe.data.seq_len) if recipe.student.arch == "llama"
               else SpikeGPTForCausalLM(config))
    if not any(weights[k] > 0 for k in ("ea", "saa", "sfa")):
        return student, None
    mapping = layer_map(config.n_layer, shape.layers, dict(recipe.teacher.layer_map))
    return student, spad_module(recipe, config, mapping, shape.hidden, shape.heads, weights)


def activation_bytes(recipe: Any, config: Any, shape: Any, weights: dict[str, float]) -> float:
    """Bytes autograd saves for one row of data.seq_len tokens through the student (+ SpAD terms).

    Probed on small models of the same width: one and two layers of each token mixer the student uses, with
    a vocabulary of PROBE_VOCAB (the head runs chunked, outside this count): a layer of mixer m saves
    S2(m) - S1(m), the embedding and the terms outside the layers 2 S1 - S2, each fitted in L. `config` is the
    student's SpikeGPTConfig (also for student.arch=llama, whose matched Llama is built from it)."""
    import torch

    length = recipe.data.seq_len
    per_layer, outside = {}, 0.0
    quiet = logging.getLogger("teachers")
    level, quiet.level = quiet.level, logging.WARNING  # the probes' layer maps are not the run's
    try:
        with torch.random.fork_rng():
            for mixer in dict.fromkeys(config.layer_mixers):
                fits = []
                for n in (1, 2):
                    small = config.__class__(**{**config.to_dict(), "n_layer": n, "vocab_size": PROBE_VOCAB,
                                                "token_mixer": mixer})
                    a, b, c = _length_fit(*_build(recipe, small, shape, weights), shape)
                    fits.append(a + b * length + c * length**2)
                per_layer[mixer], outside = fits[1] - fits[0], 2 * fits[0] - fits[1]
    finally:
        quiet.level = level
    return outside + sum(per_layer[m] for m in config.layer_mixers)


def parameter_count(recipe: Any, config: Any, shape: Any, weights: dict[str, float]) -> int:
    """Parameters of the student and its SpAD projections, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        modules = _build(recipe, config, shape, weights)
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


# -------------------------------------------------------------------------------------------- estimate
def _sharding(recipe: Any, world: int) -> tuple[int, int, int, int]:
    """Divisors of (weights, gradients, moments) and extra gradient copies per process for the strategy."""
    dist = recipe.distributed
    if world <= 1:
        return 1, 1, 1, 0
    if dist.strategy == "fsdp":
        return world, world, world, 0
    if dist.strategy == "deepspeed":
        from pipeline.runner import _deepspeed_dict

        stage = int(_deepspeed_dict(recipe, None).get("zero_optimization", {}).get("stage", 0))
        return (world if stage >= 3 else 1), (world if stage >= 2 else 1), (world if stage >= 1 else 1), 0
    return 1, 1, 1, 1  # DDP: gradients plus a bucket copy


def student_vocab_size(recipe: Any, shape: Any) -> int:
    """The student's vocabulary size for the estimate, without building its tokenizer: the teacher's
    (shape.vocab) for `student.vocab: teacher`; N for `subset:N` and the 256 byte symbols for `bytes`, each plus
    SPECIALS_ROOM for the special tokens and bytes the teacher lacks (teachers.vocab builds the exact one)."""
    from teachers.vocab import parse_vocab

    spec = parse_vocab(recipe.student.vocab)
    if spec.is_teacher:
        return int(shape.vocab)
    return (int(spec.size) if spec.kind == "subset" else 256) + SPECIALS_ROOM


def _student_parts(recipe: Any, stage: str, shape: Any, world: int) -> tuple[dict, dict, int]:
    """(fixed parts, per-row parts, parameters) of the student and its SpAD projections."""
    from pipeline.recipe import student_config

    vocab = student_vocab_size(recipe, shape)
    config = student_config(recipe, vocab)
    weights = {k: float(v) for k, v in vars(getattr(recipe, stage).weights).items()}
    n_params = parameter_count(recipe, config, shape, weights)
    saved = activation_bytes(recipe, config, shape, weights)
    w, g, m, extra = _sharding(recipe, world)
    length = recipe.data.seq_len
    transient = TRANSIENT_LAYERS * saved / max(1, config.n_layer)
    if weights["saa"] > 0 and "srwkv" in config.layer_mixers:  # SRWKV's implied attention, recomputed per head
        transient += 4 * 4.0 * config.time_steps * length**2 * config.d_model / config.n_head
    state = STATE_OVERHEAD * 4.0 * n_params * (1 / w + 1 / g + 2 / m + extra)
    logits = weights["sta"] > 0 or weights["hta"] > 0
    fixed = {"student weights, gradients, AdamW": state,
             "logits": HEAD_BUFFERS * 4.0 * recipe.distill.kd.chunk_size * vocab if logits else 0.0}
    return fixed, {"activations": saved, "transient": transient}, n_params


def _teacher_parts(recipe: Any, shape: Any, keep: dict[str, bool]) -> tuple[dict, dict]:
    """(fixed, per-row) parts of the teacher: its weights; its kept outputs and one layer's work per row."""
    size = _DTYPE_BYTES[recipe.teacher.dtype]
    length = recipe.data.seq_len
    scores = shape.heads * length**2 * size * 3 if keep["attentions"] else 0  # eager: scores, softmax, copy
    kept = length * shape.hidden * size * (shape.layers + 2 if keep["hidden_states"] else 1)
    maps = shape.layers * shape.heads * length**2 * size if keep["attentions"] else 0
    layer = length * shape.intermediate * 3 * size + scores
    return ({"teacher weights": float(shape.parameters * size)},
            {"teacher outputs": float(kept + maps), "teacher layer": float(layer)})


def _setup_peak(recipe: Any, stage: str, shape: Any, n_params: int) -> float:
    """The peak while a fresh student inherits the teacher's embedding (student.init_from_teacher): an SVD or
    least-squares solve in float64 over the [V, C_t] embedding matrix, about INHERIT_COPIES copies of it."""
    builds = stage == "align" or not recipe.align.enabled
    if recipe.student.arch != "spikegpt" or not (recipe.student.init_from_teacher and builds):
        return 0.0
    size = _DTYPE_BYTES[recipe.teacher.dtype]
    return (BASELINE_BYTES + shape.parameters * size + 4.0 * n_params
            + INHERIT_COPIES * 8.0 * shape.vocab * shape.embed_width)


def estimate_stage(recipe: Any, stage: str, shape: Any, world: int = 1) -> Estimate:
    """The peak of `stage` ("teacher_cache", "align" or "distill") per process; shape: teachers.TeacherShape;
    world: the number of processes (sharding of the optimizer state)."""
    from teachers.cache import TOKEN_CHUNK

    if stage == "teacher_cache":
        fixed, per_row = _teacher_parts(recipe, shape, {"hidden_states": False, "attentions": False})
        if recipe.teacher_cache.store == "topk":
            fixed["logits"] = 3 * 4.0 * TOKEN_CHUNK * shape.vocab  # logits, log-softmax, top-k: [chunk, V] fp32
        else:
            fixed["teacher head"] = 2 * 4.0 * shape.vocab * shape.hidden  # its fp32 copy and checksum bytes
        return Estimate(stage, "teacher_cache.batch_size", recipe.teacher_cache.batch_size,
                        {"baseline": BASELINE_BYTES, **fixed}, per_row)
    section = getattr(recipe, stage)
    weights = vars(section.weights)
    features = any(weights[k] > 0 for k in ("ea", "saa", "sfa"))
    online = stage == "align" or features or not (recipe.teacher_cache.enabled and recipe.distill.use_teacher_cache)
    fixed, per_row, n_params = _student_parts(recipe, stage, shape, world)
    if online:
        keep = {"hidden_states": weights["ea"] > 0 or weights["sfa"] > 0, "attentions": weights["saa"] > 0}
        t_fixed, t_rows = _teacher_parts(recipe, shape, keep)
        fixed, per_row = {**fixed, **t_fixed}, {**per_row, **t_rows}
    elif stage == "distill" and recipe.teacher_cache.store == "hidden" and weights["sta"] > 0:
        # the hidden store's head (fp32) and the teacher logits of one loss chunk (logits, softmax: [chunk, V])
        fixed["teacher head"] = 4.0 * shape.vocab * shape.hidden
        fixed["teacher logits"] = 2 * 4.0 * recipe.distill.kd.chunk_size * shape.vocab
        per_row["teacher hidden"] = 4.0 * recipe.data.seq_len * shape.hidden
    return Estimate(stage, f"{stage}.train.batch_size", section.train.batch_size,
                    {"baseline": BASELINE_BYTES, **fixed}, per_row, _setup_peak(recipe, stage, shape, n_params))


def check_memory(recipe: Any, stages: list[str], shape: Any) -> list[Estimate]:
    """Estimate each of `stages` (those that train or run the teacher) and refuse the first that will not fit.

    Processes started on this machine (LOCAL_WORLD_SIZE) share its memory on CPU; each has its own device
    with CUDA. Raises ConfigError: one line with the estimate, the available memory and its source, and the
    batch-size key to lower with the largest batch that fits. Returns the estimates.
    """
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = 1 if torch.cuda.is_available() else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available, source = available_memory()
    found = [estimate_stage(recipe, s, shape, world) for s in stages]
    for est in found:
        if available is None or est.total() * local <= available:
            continue
        fits = next((b for b in range(est.batch - 1, 0, -1) if est.total(b) * local <= available), None)
        raise ConfigError(_refusal(est, local, available, source, fits))
    return found


def _refusal(est: Estimate, local: int, available: int, source: str, fits: int | None) -> str:
    procs = f" x {local} processes" if local > 1 else ""
    if est.setup * local > available:  # weight inheritance's float64 set-up, whatever the batch
        return (f"{est.stage}: estimated peak memory {gb(est.setup)}{procs} while the student inherits the "
                f"teacher's embedding (student.init_from_teacher: float64 copies of its [V, C] embedding matrix for "
                f"the projection) exceeds the {gb(available)} available ({source}); a smaller batch does not "
                f"help: set student.init_from_teacher=false, or run once where it fits (the projection is cached "
                f"per teacher; set {ENV_AVAILABLE} to override the check)")
    big = sorted(est.parts().items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {gb(v)}" for k, v in big)
    head = (f"{est.stage}: estimated peak memory {gb(est.total())}{procs} (largest: {parts}) exceeds the "
            f"{gb(available)} available ({source}) at {est.batch_key}={est.batch}; ")
    if fits is None:
        return head + ("even a batch of 1 does not fit: lower data.seq_len, or use a smaller student or teacher "
                       f"(set {ENV_AVAILABLE} to override the check)")
    accum = "" if est.stage == "teacher_cache" else (f" (raise {est.stage}.train.grad_accum to keep the "
                                                     "global batch)")
    return head + f"lower {est.batch_key} to {fits} or less{accum}"
