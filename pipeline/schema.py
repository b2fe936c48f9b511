"""The typed recipe schema: one dataclass per section, with the agreed defaults.

A recipe YAML is merged onto ``OmegaConf.structured(Recipe)`` (unknown keys and wrong types are rejected by
OmegaConf) and then checked by :func:`check_values` (bad values). Stages receive the result as a plain
``Recipe`` instance (``OmegaConf.to_object``), so ``recipe.distill.train.optim.lr`` is a float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    runs_dir: str = "runs"


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["bundled"])
    seq_len: int = 128
    val_fraction: float = 0.01
    separator: str | None = None
    text_field: str = "text"
    # read only the start of the sources (in source order): at most this many tokens (separators included),
    # or at most this many UTF-8 bytes of text (cut at a character boundary; the same text under every
    # tokenizer). At most one of the two may be set
    max_train_tokens: int | None = None
    max_train_bytes: int | None = None
    # seed of the train/validation split; null = run.seed. A study sets it so that its seeds vary the
    # initialisation and data order but share one dataset (and one teacher cache)
    split_seed: int | None = None


@dataclass
class TeacherConfig:
    spec: str = "smollm2-135m"
    dtype: str = "bf16"
    trust_remote_code: bool = False
    # student layer -> teacher layer, overriding the evenly spaced default map
    layer_map: dict[int, int] = field(default_factory=dict)


@dataclass
class StudentConfig:
    # spikegpt: the spiking student; llama: a non-spiking transformers Llama of the same width, depth and
    # vocabulary (an ANN baseline, trained by the same distill stage; CE/KD only, no align stage)
    arch: str = "spikegpt"
    preset: str = "demo"
    # SpikeGPTConfig field overrides; vocab_size always comes from the student's tokenizer (student.vocab)
    config: dict[str, Any] = field(default_factory=dict)
    # weight inheritance: embedding and LM head (and, for spikegpt with an EA term, the EA projection) from a
    # seeded, rotated PCA of the teacher's embedding matrix, cached per teacher (pipeline/inherit.py)
    init_from_teacher: bool = False
    # the student's tokenizer: teacher (the teacher's own) | subset:N (the teacher's BPE with its merges cut so
    # the vocabulary has N entries) | bytes (byte symbols + special tokens); see teachers/vocab.py
    vocab: str = "teacher"


@dataclass
class TeacherCacheConfig:
    enabled: bool = False
    k: int = 64
    value_dtype: str = "bf16"
    batch_size: int = 8
    # a directory shared by runs (e.g. every arm of a study): built once, reused by any run whose teacher,
    # data, k, value_dtype and distill.kd.temperature match (the cache manifest checks them; another one is
    # refused); null = inside the run directory
    dir: str | None = None
    # also store the teacher's targets of distill's SpAD feature terms (input embeddings, the mapped layers'
    # states, their attention maps; teachers/feature_cache.py) in <cache dir>/features, so that distill never
    # runs the teacher; needs distill.weights ea, saa or sfa > 0. Arms without it never build or read them
    features: bool = False
    # with a derived student.vocab, cached and online: skip the branch tokens (one teacher evaluation each, where
    # the pieces emitted inside a teacher token spell a shorter one) whose relative ending mass is below this
    # floor; each such target moves by at most that mass in total variation (teachers/subvocab.py). 0 = exact
    branch_floor: float = 0.0
    # what the cache keeps of the teacher: topk (its k most probable tokens at distill.kd.temperature + one tail
    # bucket; forward KL only, exact in gradient at temperature 1 only) | hidden (its last hidden state and LM
    # head, so distill recomputes the full-vocabulary logits: exact KD at any temperature and kind, ~3x the disk
    # for SmolLM2-135M and one teacher-head matmul per step; student.vocab=teacher only; teachers/cache.py)
    store: str = "topk"


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 5
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class LossWeights:
    ea: float = 0.0
    saa: float = 0.0
    sfa: float = 0.0
    sta: float = 0.0
    hta: float = 0.0


@dataclass
class KDConfig:
    kind: str = "forward_kl"
    temperature: float = 2.0
    jsd_beta: float = 0.5
    chunk_size: int = 1024
    impl: str = "fused"  # the fast path; "chunked" is the autograd reference (pipeline.losses)


@dataclass
class AlignConfig:
    enabled: bool = True
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    # published SpAD weights for the alignment terms (BiSpikCLM, arXiv 2605.13859, as reimplemented in SpikLLM)
    weights: LossWeights = field(default_factory=lambda: LossWeights(ea=0.2, saa=0.1, sfa=0.1))
    head_mapping: str = "mean"
    # SFA against LayerNorm(h_T) instead of the raw residual stream, whose massive activations (SmolLM2: SFA
    # ~4e3 per token against EA ~0.2) drown the other terms; false gives the paper's raw form
    sfa_target_norm: bool = True


@dataclass
class DistillConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=500))
    weights: LossWeights = field(default_factory=lambda: LossWeights(sta=0.3, hta=0.3))
    kd: KDConfig = field(default_factory=KDConfig)
    use_teacher_cache: bool = True


@dataclass
class DistributedConfig:
    strategy: str = "auto"
    mixed_precision: str = "no"
    deepspeed_config: str | None = None
    backend: str | None = None


@dataclass
class ExportConfig:
    dtype: str = "fp32"


@dataclass
class EvaluateConfig:
    texts: list[str] = field(default_factory=lambda: ["persuasion", "hamlet"])
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8
    context_length: int = 512
    # score only the first N UTF-8 bytes of each text (cut at a line end); null = the whole text
    max_text_bytes: int | None = None
    teacher: bool = True
    energy: bool = True
    sample_prompt: str = "It is a truth universally acknowledged"
    sample_tokens: int = 40
    # how the sample is decoded (eval.generate): temperature 0 = greedy; top_k 0 / top_p 1 = off; a repetition
    # penalty > 1 keeps a small student out of loops like ", and the, and the"; sampling is seeded by run.seed
    sample_temperature: float = 0.0
    sample_top_k: int = 0
    sample_top_p: float = 1.0
    sample_repetition_penalty: float = 1.0
    # the spiking student's one streamed pass over each text (its recurrent state, no window restarts) as an
    # extra column beside the windows protocol; it costs about as much as the windows protocol itself
    stream: bool = True


LR_KEYS = ("distill.train.optim.lr", "align.train.optim.lr")


@dataclass
class StudyConfig:
    # Read by `spikedistill study` only, never by a stage (pipeline/study.py): the arm runs once per seed, as
    # run.name=<name>-s<seed> with run.seed=<seed>; empty = once, with run.name and run.seed as they are.
    seeds: list[int] = field(default_factory=list)
    # learning-rate sweep on the first seed (empty = none: the recipe's lr): at least 3 rates; the one with
    # the lowest final validation bits/byte of distill wins (ties: the lower rate), and a winner at an edge of
    # the points tried adds the next factor-2 point beyond it, at most lr_extensions times per edge
    lr_grid: list[float] = field(default_factory=list)
    # the learning rates the swept rate sets; each one's min_lr keeps the recipe's min_lr / lr ratio.
    # align's matters only when align.enabled
    lr_keys: list[str] = field(default_factory=lambda: list(LR_KEYS))
    lr_extensions: int = 2


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


# Allowed values of the string fields that select behaviour.
CHOICES: dict[str, tuple[str, ...]] = {
    "student.arch": ("spikegpt", "llama"),
    "teacher.dtype": ("fp32", "bf16", "fp16"),
    "teacher_cache.value_dtype": ("fp32", "bf16", "fp16"),
    "teacher_cache.store": ("topk", "hidden"),
    "align.head_mapping": ("mean", "learned"),
    "distill.kd.kind": ("forward_kl", "reverse_kl", "jsd"),
    "distill.kd.impl": ("chunked", "fused"),
    "distributed.strategy": ("auto", "none", "ddp", "fsdp", "deepspeed"),
    "distributed.mixed_precision": ("no", "bf16", "fp16"),
    "export.dtype": ("fp32", "bf16", "fp16"),
}

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _bad(key: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: must be {rule}, got {value!r} (fix the recipe or the override)")


def _need(cond: bool, key: str, rule: str, value: Any) -> None:
    if not cond:
        raise _bad(key, rule, value)


def _check_optim(prefix: str, o: OptimConfig) -> None:
    _need(o.lr > 0, f"{prefix}.lr", "> 0", o.lr)
    _need(o.min_lr >= 0, f"{prefix}.min_lr", ">= 0", o.min_lr)
    _need(o.min_lr <= o.lr, f"{prefix}.min_lr", f"<= lr ({o.lr})", o.min_lr)
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"{prefix}.betas",
          "two numbers in [0, 1)", list(o.betas))
    _need(o.weight_decay >= 0, f"{prefix}.weight_decay", ">= 0", o.weight_decay)
    _need(o.warmup_steps >= 0, f"{prefix}.warmup_steps", ">= 0", o.warmup_steps)
    _need(o.grad_clip >= 0, f"{prefix}.grad_clip", ">= 0 (0 turns clipping off)", o.grad_clip)


def _check_train(prefix: str, t: TrainConfig) -> None:
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints", "log_every", "max_bad_steps"):
        value = getattr(t, name)
        _need(value > 0, f"{prefix}.{name}", "> 0", value)
    _check_optim(f"{prefix}.optim", t.optim)


def _check_weights(prefix: str, w: LossWeights) -> None:
    for f in fields(w):
        value = getattr(w, f.name)
        _need(value >= 0, f"{prefix}.{f.name}", ">= 0", value)
    _need(any(getattr(w, f.name) > 0 for f in fields(w)), prefix, "a set with at least one weight > 0",
          {f.name: getattr(w, f.name) for f in fields(w)})


def _check_choices(recipe: Recipe) -> None:
    for key, allowed in CHOICES.items():
        node: Any = recipe
        for part in key.split("."):
            node = getattr(node, part)
        _need(node in allowed, key, "one of " + "|".join(allowed), node)


def _check_vocab(recipe: Recipe) -> None:
    """student.vocab is spelt right; a derived vocabulary has no SpAD feature terms, whose per-position
    features would compare student and teacher positions that differ."""
    from teachers.errors import TeacherError
    from teachers.vocab import parse_vocab

    try:
        spec = parse_vocab(recipe.student.vocab)
    except TeacherError as exc:
        raise ConfigError(f"{exc} (fix the recipe or the override)") from None
    _need(spec.is_teacher or recipe.teacher_cache.store == "topk", "teacher_cache.store",
          f"topk with student.vocab={spec} (a hidden store keeps one teacher position per token; exact targets "
          "over a derived vocabulary mix several)", recipe.teacher_cache.store)
    if spec.is_teacher:
        _need(recipe.teacher_cache.branch_floor == 0, "teacher_cache.branch_floor",
              "0 with student.vocab=teacher (it skips the branch tokens of a derived student vocabulary; the "
              "teacher's own vocabulary has none)", recipe.teacher_cache.branch_floor)
        return
    why = (f"false with student.vocab={spec} (SpAD compares student and teacher features position by position, "
           "and a derived vocabulary has other positions)")
    _need(not recipe.align.enabled, "align.enabled", why, recipe.align.enabled)
    for key in ("ea", "saa", "sfa"):
        value = getattr(recipe.distill.weights, key)
        _need(value == 0, f"distill.weights.{key}", "0 " + why.removeprefix("false "), value)


def lr_label(lr: float) -> str:
    """A learning rate as it appears in run names: 3 significant digits, e.g. 0.002 -> "2e-3", 0.0016 -> "1.6e-3"."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _check_study(recipe: Recipe) -> None:
    s = recipe.study
    seeds, grid = list(s.seeds), list(s.lr_grid)
    _need(all(x >= 0 for x in seeds) and len(set(seeds)) == len(seeds), "study.seeds",
          "distinct integers >= 0 (or an empty list)", seeds)
    _need(not grid or (len(grid) >= 3 and all(lr > 0 for lr in grid)
                       and len({lr_label(lr) for lr in grid}) == len(grid)), "study.lr_grid",
          "an empty list (no sweep) or >= 3 learning rates > 0 that differ in their first 3 digits", grid)
    _need(not grid or recipe.data.val_fraction > 0, "study.lr_grid",
          "empty when data.val_fraction is 0 (the sweep chooses by validation bits/byte)", grid)
    keys = list(s.lr_keys)
    _need(bool(keys) and set(keys) <= set(LR_KEYS) and len(set(keys)) == len(keys), "study.lr_keys",
          "a non-empty list of distinct keys among " + ", ".join(LR_KEYS), keys)
    _need(s.lr_extensions >= 0, "study.lr_extensions", ">= 0", s.lr_extensions)


def _check_cached_kind(recipe: Recipe) -> None:
    """Cached top-k targets (teacher_cache.store=topk) carry forward KL only: the tail bucket hides the per-token
    log-ratios that reverse KL and JSD weight by the student's own tail mass, so their cached gradients point
    elsewhere (bench/kd_cache.py measures it on the bundled teacher). JSD at beta 0 is forward KL
    (pipeline.losses). The hidden store gives the full logits back, so every kind is exact with it."""
    kd = recipe.distill.kd
    cached = recipe.teacher_cache.enabled and recipe.distill.use_teacher_cache and recipe.teacher_cache.store == "topk"
    forward = kd.kind == "forward_kl" or (kd.kind == "jsd" and kd.jsd_beta == 0)
    _need(not cached or forward, "distill.kd.kind", "forward_kl while teacher_cache.enabled is true with "
          "teacher_cache.store=topk (a top-k cache's tail bucket leaves reverse KL and JSD far from their online "
          "forms, bench/kd_cache.py); set teacher_cache.store=hidden (exact for every kind) or "
          "teacher_cache.enabled=false", kd.kind)


def _check_feature_cache(recipe: Recipe) -> None:
    """teacher_cache.features stores distill's feature targets: it needs the cache read by distill and a feature
    term to store."""
    c = recipe.teacher_cache
    if not c.features:
        return
    _need(c.enabled and recipe.distill.use_teacher_cache, "teacher_cache.features",
          "false unless teacher_cache.enabled and distill.use_teacher_cache are true (distill reads the features "
          "from the cache)", c.features)
    w = recipe.distill.weights
    _need(w.ea > 0 or w.saa > 0 or w.sfa > 0, "teacher_cache.features", "false when distill has no feature term "
          "(distill.weights.ea, saa and sfa are 0: nothing to store)", c.features)


def check_values(recipe: Recipe) -> None:
    """Raise ConfigError (one line, dotted key) for the first value outside its allowed range."""
    _need(bool(_RUN_NAME.match(recipe.run.name)), "run.name",
          "a folder name of letters, digits, '.', '_' or '-' that starts with a letter or digit", recipe.run.name)
    _need(recipe.run.seed >= 0, "run.seed", ">= 0", recipe.run.seed)
    _need(bool(recipe.run.runs_dir), "run.runs_dir", "a non-empty path", recipe.run.runs_dir)
    _check_study(recipe)
    d = recipe.data
    _need(len(d.sources) > 0, "data.sources", "a non-empty list", list(d.sources))
    _need(d.seq_len > 0, "data.seq_len", "> 0", d.seq_len)
    _need(0 <= d.val_fraction < 1, "data.val_fraction", "in [0, 1)", d.val_fraction)
    _need(d.max_train_tokens is None or d.max_train_tokens > 0, "data.max_train_tokens", "> 0 or null",
          d.max_train_tokens)
    _need(d.max_train_bytes is None or d.max_train_bytes > 0, "data.max_train_bytes", "> 0 or null",
          d.max_train_bytes)
    _need(d.max_train_tokens is None or d.max_train_bytes is None, "data.max_train_bytes",
          f"null when data.max_train_tokens is set ({d.max_train_tokens}); keep one of the two caps",
          d.max_train_bytes)
    _need(d.split_seed is None or d.split_seed >= 0, "data.split_seed", ">= 0 or null", d.split_seed)
    _need(bool(recipe.teacher.spec), "teacher.spec", "a bundled alias, hub id, directory or .gguf file",
          recipe.teacher.spec)
    for s, t in recipe.teacher.layer_map.items():
        _need(s >= 0 and t >= 0, f"teacher.layer_map.{s}", "a layer index >= 0", t)
    _need(bool(recipe.student.preset), "student.preset", "a SpikeGPTConfig preset name", recipe.student.preset)
    _check_vocab(recipe)
    c = recipe.teacher_cache
    _need(c.k > 0, "teacher_cache.k", "> 0", c.k)
    _need(c.batch_size > 0, "teacher_cache.batch_size", "> 0", c.batch_size)
    _need(0 <= c.branch_floor < 1, "teacher_cache.branch_floor", "in [0, 1) (0: exact targets)", c.branch_floor)
    _check_train("align.train", recipe.align.train)
    if recipe.align.enabled:
        _check_weights("align.weights", recipe.align.weights)
    _check_train("distill.train", recipe.distill.train)
    _check_weights("distill.weights", recipe.distill.weights)
    kd = recipe.distill.kd
    _need(kd.temperature > 0, "distill.kd.temperature", "> 0", kd.temperature)
    _need(0 <= kd.jsd_beta <= 1, "distill.kd.jsd_beta", "in [0, 1]", kd.jsd_beta)
    _need(kd.chunk_size > 0, "distill.kd.chunk_size", "> 0", kd.chunk_size)
    _check_choices(recipe)
    _check_cached_kind(recipe)
    _check_feature_cache(recipe)
    if recipe.student.arch != "spikegpt":
        _need(not recipe.align.enabled, "align.enabled", f"false for student.arch={recipe.student.arch} (the "
              "SpAD alignment needs a spiking student)", recipe.align.enabled)
        feats = {k: getattr(recipe.distill.weights, k) for k in ("ea", "saa", "sfa")}
        _need(not any(feats.values()), "distill.weights", f"sta/hta only for student.arch="
              f"{recipe.student.arch} (set ea, saa and sfa to 0)", feats)
    dist = recipe.distributed
    _need(dist.strategy != "deepspeed" or bool(dist.deepspeed_config), "distributed.deepspeed_config",
          "a path to a DeepSpeed JSON (e.g. recipes/deepspeed/zero2.json) when strategy is deepspeed",
          dist.deepspeed_config)
    e = recipe.evaluate
    _need(e.limit is None or e.limit > 0, "evaluate.limit", "> 0 or null", e.limit)
    _need(e.batch_size > 0, "evaluate.batch_size", "> 0", e.batch_size)
    _need(e.context_length > 0, "evaluate.context_length", "> 0", e.context_length)
    _need(e.max_text_bytes is None or e.max_text_bytes > 0, "evaluate.max_text_bytes", "> 0 or null",
          e.max_text_bytes)
    _need(e.sample_tokens >= 0, "evaluate.sample_tokens", ">= 0", e.sample_tokens)
    _need(e.sample_temperature >= 0, "evaluate.sample_temperature", ">= 0 (0 = greedy)", e.sample_temperature)
    _need(e.sample_top_k >= 0, "evaluate.sample_top_k", ">= 0 (0 = off)", e.sample_top_k)
    _need(0 < e.sample_top_p <= 1, "evaluate.sample_top_p", "in (0, 1] (1 = off)", e.sample_top_p)
    _need(e.sample_repetition_penalty > 0, "evaluate.sample_repetition_penalty", "> 0 (1 = off)",
          e.sample_repetition_penalty)


def section_names() -> list[str]:
    """The top-level recipe sections, in schema order."""
    return [f.name for f in fields(Recipe)]

