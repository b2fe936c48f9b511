"""The training loop on Accelerate: one loop for single CPU/GPU, DDP, FSDP and DeepSpeed ZeRO-1/2/3.

The model knows nothing about Accelerate (torchtitan style). The trainer takes any nn.Module whose
forward(**batch) returns a dict with "loss" (a weighted SUM over the micro-batch's tokens) and optional
named component sums; it divides by the number of tokens in the whole accumulated step across all ranks,
so 4 x (batch 2) with accumulation equals 1 x (batch 8), and 2 ranks x batch b equal 1 rank x batch 2b.

Data order is a pure function of (seed, sample position): epoch e is randperm(len(data)) seeded by
seed + e, and global micro-batch g takes stream positions [g*B*W, (g+1)*B*W), rank r the r-th slice of B.
With from_end=True each epoch's permutation is read from its last entry backwards (the align stage's order:
a run whose align and distill steps fit in one pass reads no row twice, and distill's rows and their order are
those of a run without align). The data position saved in a checkpoint is the stream position, so a resumed
run sees the same batches.

Reliability:
- checkpoints every train.checkpoint_every steps and at the end (pipeline.checkpoint: atomic, verified);
  a rerun resumes from the newest valid one when its config hash matches (or is one of `accept_hashes`:
  the same stage with fewer steps, continued by `spikedistill run --extend`; the learning rate then
  follows the new step count's schedule from the checkpoint's step on), else starts over.
- the progress bar shows the loss smoothed over recent steps (an exponential moving average with
  bias correction, LOSS_SMOOTHING), updated every step; metrics.jsonl keeps the raw per-step values.
- a non-finite loss or gradient norm skips the step (no update, counted in metrics); after
  train.max_bad_steps consecutive bad steps the run stops with TrainingError, keeping the last good
  checkpoint; its last metrics.jsonl row then says {"diverged": <bad steps in a row>} (a learning-rate sweep
  counts such a run as its worst point). Under DeepSpeed with grad_accum > 1 the engine owns the accumulation boundary, so a bad
  micro-batch is skipped but the micro-batches before it in that step are still applied.
- SIGTERM (pre-emption): the current step finishes, a checkpoint is written, and the process exits with
  code 143 (128 + SIGTERM), the convention of schedulers such as Slurm. The flag is all-reduced every step,
  so a signal that reaches one rank stops all of them at the same step; under torchrun each rank exits
  with 143 and the launcher itself returns 1 (its ChildFailedError report shows "exitcode: 143").
  Rerunning the same command resumes; on CPU the final weights are bit-identical to an unbroken run.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline import checkpoint as ckpt
from pipeline.errors import StageError

SIGTERM_EXIT_CODE = 143
LOSS_SMOOTHING = 0.9  # weight of the past in the progress bar's running loss (about the last 10 steps)
log = logging.getLogger(__name__)


class TrainingError(StageError):
    """Training stopped in a way the user can act on (NaN, out of memory, bad resume)."""


def lr_factor(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Multiplier of the base lr at optimizer step `step`: linear warmup, then cosine from lr to min_lr."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_collate(rows: list[Any]) -> dict[str, torch.Tensor]:
    """Rows are LongTensor [L] or dicts of tensors -> {"input_ids": [B, L], ...} by stacking."""
    if torch.is_tensor(rows[0]):
        return {"input_ids": torch.stack(rows)}
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def count_next_token_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss in a batch of rows [B, L]: every position but the last."""
    ids = batch["input_ids"]
    return ids.shape[0] * (ids.shape[1] - 1)


def freeze_unreached_parameters(model: nn.Module, batch: dict[str, Any]) -> list[str]:
    """Run one forward/backward on `batch` and freeze the parameters that got no gradient -> their names.

    DDP (and FSDP) require every trainable parameter to take part in each backward; a stage whose loss
    terms do not reach some parameters (e.g. align never uses the LM head) freezes them up front instead
    of paying for find_unused_parameters. Deterministic: every rank freezes the same set.
    """
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    out = model(**{k: v.to(device) for k, v in batch.items()})
    out["loss"].backward()
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in frozen:
            p.requires_grad_(False)
    return frozen


class DataStream:
    """Deterministic sample order: stream position p -> dataset index perm_{p // n}[p % n], or with from_end
    perm_{p // n}[n - 1 - p % n] (the same permutations read backwards)."""

    def __init__(self, data: Dataset, seed: int, shuffle: bool = True, from_end: bool = False):
        self.data, self.seed, self.shuffle, self.from_end = data, seed, shuffle, from_end
        self.n = len(data)
        if self.n == 0:
            raise TrainingError("the training split is empty; rerun prepare with more data or a smaller seq_len")
        self._perms: dict[int, torch.Tensor] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if self.from_end:
            offset = self.n - 1 - offset
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed + epoch))}
        return int(self._perms[epoch][offset])

    def rows(self, start: int, count: int) -> list[Any]:
        return [self.data[self.index(p)] for p in range(start, start + count)]


class Trainer:
    """Fit `model` on `train_data` with the settings of one recipe `train` section (see SCHEMA.md).

    model: nn.Module, forward(**batch) -> {"loss": scalar sum over tokens, <name>: scalar sums, ...}.
    train_data / val_data: map-style datasets of rows (LongTensor [L] or dicts), batched by `collate`.
    stage_dir: where metrics.jsonl and checkpoints/ live. config_hash: resume only from checkpoints with it.
    seed: the data order's seed; from_end: read each epoch's order backwards (see the module docstring).
    fsdp: shard with FSDP2; applied here (fully_shard per ModuleList entry + root) when accelerate does not
    do it itself, which is the case on CPU, where accelerate only knows DDP.
    """

    def __init__(self, model: nn.Module, train_cfg: Any, accelerator: Any, stage_dir: Path,
                 train_data: Dataset, *, val_data: Dataset | None = None, bytes_per_token: float | None = None,
                 seed: int = 0, config_hash: str = "", name: str = "train",
                 collate: Callable[[list[Any]], dict] = default_collate,
                 count_tokens: Callable[[dict], int] = count_next_token_targets,
                 tensorboard: bool = False, fsdp: bool = False, accept_hashes: tuple[str, ...] = (),
                 from_end: bool = False):
        self.cfg, self.acc, self.name = train_cfg, accelerator, name
        self.stage_dir = Path(stage_dir)
        self.ckpt_root = self.stage_dir / "checkpoints"
        self.metrics_path = self.stage_dir / "metrics.jsonl"
        self.stream = DataStream(train_data, seed, from_end=from_end)
        self.val_stream = DataStream(val_data, seed, shuffle=False) if val_data is not None and len(val_data) else None
        self.bytes_per_token = bytes_per_token
        self.config_hash, self.collate, self.count_tokens = config_hash, collate, count_tokens
        self.accept_hashes = tuple(accept_hashes)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.model = model
        self.step, self.position, self.bad_total, self.bad_run = 0, 0, 0, 0
        # training tokens (next-token targets, all ranks) and seconds spent in training steps, over resumes
        self.tokens_seen, self.train_seconds = 0.0, 0.0
        self._term = False
        self._tb = self._tensorboard() if tensorboard and self.is_main else None
        self.own_fsdp = fsdp and self.world > 1 and "FSDP" not in str(accelerator.distributed_type)
        self._setup_optimizer()

    # ---------------------------------------------------------------- set-up
    def _setup_optimizer(self) -> None:
        o = self.cfg.optim
        if self.own_fsdp:
            _fully_shard(self.model, self.world)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # no weight decay on gains and biases (1-d), as usual for LMs
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.cfg.steps, o.warmup_steps, o.lr, o.min_lr))
        self._configure_deepspeed()
        self.acc.gradient_accumulation_steps = self.cfg.grad_accum
        if self.own_fsdp:  # accelerate would wrap the sharded model in DDP on CPU: prepare the optimizer only
            self.optimizer = self.acc.prepare(optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        self.deepspeed = self.acc.state.deepspeed_plugin is not None

    def _configure_deepspeed(self) -> None:
        """Fill the DeepSpeed config from the recipe: its 'auto' fields, and gradient_clipping, which DeepSpeed
        defaults to 1.0 and accelerate's DeepSpeedPlugin silently drops when 0.0."""
        plugin = self.acc.state.deepspeed_plugin
        if plugin is None:
            return
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.cfg.batch_size
        ds["gradient_accumulation_steps"] = self.cfg.grad_accum
        ds["train_batch_size"] = self.cfg.batch_size * self.cfg.grad_accum * self.world
        ds["gradient_clipping"] = float(self.cfg.optim.grad_clip)
        ds["zero_allow_untested_optimizer"] = True
        ds.pop("scheduler", None)
        ds.pop("optimizer", None)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("%s: tensorboard is not installed; pip install tensorboard to get TensorBoard logs",
                        self.name)
            return None
        return SummaryWriter(str(self.stage_dir / "tensorboard"))

    # ---------------------------------------------------------------- checkpoints
    def _payload(self) -> ckpt.CheckpointPayload:
        state = {"step": self.step, "position": self.position, "bad_total": self.bad_total,
                 "bad_run": self.bad_run, "world_size": self.world, "config_hash": self.config_hash,
                 "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                 "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds}
        model_state = self._full_model_state()
        optim_state, sharded = self._optimizer_state()
        return ckpt.CheckpointPayload(
            trainer_state=state, rng=ckpt.rng_state(),
            model_state=model_state if self.is_main else None,
            optimizer_state=optim_state if (self.is_main or sharded) else None, optimizer_sharded=sharded,
            scheduler_state=self.scheduler.state_dict() if self.is_main else None)

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        if self.deepspeed:
            return self.acc.get_state_dict(self.model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _optimizer_state(self) -> tuple[dict | None, bool]:
        if self.deepspeed:
            return _deepspeed_optimizer_state(self.optimizer), True
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(self.model, self.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full, False

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained module's full state dict (gathered under FSDP / ZeRO-3; every rank must call it)."""
        return self._full_model_state()

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_root, self.step, self._payload(), rank=self.rank,
                                    keep=self.cfg.keep_checkpoints, barrier=self.acc.wait_for_everyone)

    def _resume(self) -> None:
        found = ckpt.load_latest(self.ckpt_root)
        if found is None:
            return
        written_by = found.trainer_state.get("config_hash")
        if written_by != self.config_hash and written_by in self.accept_hashes:
            self._load(found)
            self._follow_new_schedule()
            log.info("%s: continuing from %s (step %d) to step %d", self.name, found.path, found.step,
                     self.cfg.steps)
            return
        if written_by != self.config_hash:
            self.acc.wait_for_everyone()
            if self.is_main:
                log.warning("%s: checkpoints in %s are from a different config; starting over", self.name,
                            self.ckpt_root)
                ckpt.clear(self.ckpt_root)
            self.acc.wait_for_everyone()
            return
        self._load(found)
        log.info("%s: resumed from %s (step %d)", self.name, found.path, found.step)

    def _load(self, found: ckpt.Checkpoint) -> None:
        st = found.trainer_state
        problem = world_mismatch(found, self.world, self.cfg, self.name)
        if problem:
            raise TrainingError(problem)
        self.step, self.position = st["step"], st["position"]
        self.bad_total, self.bad_run = st["bad_total"], st["bad_run"]
        self.tokens_seen, self.train_seconds = st.get("tokens_seen", 0.0), st.get("train_seconds", 0.0)
        model_state = found.model_state()
        optim_state = found.optimizer_state(self.rank)
        if self.deepspeed:
            self.acc.unwrap_model(self.model).load_state_dict(model_state)
            _deepspeed_load_optimizer(self.optimizer, optim_state)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer.optimizer, model_state_dict=model_state,
                           optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(found.scheduler_state())
        rng = found.rng_state(self.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        self._truncate_metrics()

    def _follow_new_schedule(self) -> None:
        """Set the learning rates of the loaded step from this run's schedule (a checkpoint of a shorter run
        holds the rate of its own schedule, e.g. min_lr at its last step)."""
        self.scheduler.last_epoch = self.step
        rates = [base * fn(self.step) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, rate in zip(self.scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        self.scheduler._last_lr = rates

    def _truncate_metrics(self) -> None:
        """Drop metrics lines written after the resumed step, so a resumed log reads like an unbroken one."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, float]:
        """Train to cfg.steps (resuming if possible); returns the final train and validation metrics."""
        self._resume()
        previous = self._install_sigterm()
        try:
            return self._loop()
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"{self.name}: out of memory at step {self.step} (batch_size {self.cfg.batch_size}); lower "
                "train.batch_size and raise train.grad_accum, or lower distill.kd.chunk_size") from None
        finally:
            self._restore_sigterm(previous)
            if self._tb is not None:
                self._tb.close()

    def _loop(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.name, disable=not self.is_main,
                   dynamic_ncols=True)
        final: dict[str, float] = {}
        smooth, weight = 0.0, 0.0  # running loss for the bar: EMA numerator and its bias-correction weight
        self.model.train()
        while self.step < self.cfg.steps:
            t0, lr = time.perf_counter(), self.scheduler.get_last_lr()[0]
            metrics = self._train_step()
            self.step += 1
            if math.isfinite(metrics["loss"]):
                smooth = LOSS_SMOOTHING * smooth + (1 - LOSS_SMOOTHING) * metrics["loss"]
                weight = LOSS_SMOOTHING * weight + (1 - LOSS_SMOOTHING)
                bar.set_postfix(loss=f"{smooth / weight:.4g}", refresh=False)
            bar.update(1)
            seconds = time.perf_counter() - t0
            self.tokens_seen += metrics["tokens"]
            self.train_seconds += seconds
            metrics.update(step=self.step, lr=lr, seconds=seconds, tokens_seen=self.tokens_seen,
                           train_seconds=self.train_seconds)
            final.update(metrics)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                self._write_metrics("train", metrics)
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                final.update(self._validate())
            if metrics.pop("_term", 0.0) > 0:
                self.save()
                bar.close()
                log.warning("%s: SIGTERM received; checkpoint written at step %d, exiting with code %d",
                            self.name, self.step, SIGTERM_EXIT_CODE)
                raise SystemExit(SIGTERM_EXIT_CODE)
            # never checkpoint inside a run of bad steps: the newest checkpoint stays the last good one
            due = self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps
            if due and self.bad_run == 0:
                self.save()
        bar.close()
        final.pop("_term", None)
        final.update(bad_steps=float(self.bad_total), tokens_seen=self.tokens_seen,
                     train_seconds=self.train_seconds,
                     tokens_per_s=self.tokens_seen / self.train_seconds if self.train_seconds else None)
        return final

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        b, out = self.cfg.batch_size, []
        for _ in range(self.cfg.grad_accum):
            out.append(self.collate(self.stream.rows(self.position + self.rank * b, b)))
            self.position += b * self.world
        return out

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(values.to(self.acc.device), reduction="sum").cpu() if self.world > 1 else values

    def _train_step(self) -> dict[str, float]:
        micro = self._micro_batches()
        n_tokens = float(self._reduce(torch.tensor([float(sum(self.count_tokens(b) for b in micro))]))[0])
        # each rank's gradients are averaged over ranks and micro-batches by DDP/accelerate; undo both
        scale = self.world * self.cfg.grad_accum / n_tokens
        sums: dict[str, torch.Tensor] = {}
        bad = False
        for batch in micro:
            with self.acc.accumulate(self.model):
                out = self.model(**{k: v.to(self.acc.device) for k, v in batch.items()})
                local_bad = torch.tensor([0.0 if torch.isfinite(out["loss"]).item() else 1.0])
                if bool(self._reduce(local_bad)[0] > 0) or bad:
                    bad = True
                    continue
                self.acc.backward(out["loss"] * scale)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float().cpu()
        grad_norm = self._clip() if not bad else float("nan")
        if not bad and not math.isfinite(grad_norm) and not self.deepspeed:
            bad = True
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_run = 0
        self.scheduler.step()
        return self._step_metrics(sums, n_tokens, grad_norm, bad)

    def _clip(self) -> float:
        clip = self.cfg.optim.grad_clip
        if self.deepspeed:
            # DeepSpeed clips inside its engine step (gradient_clipping in its config)
            norm = self.model.get_global_grad_norm() if hasattr(self.model, "get_global_grad_norm") else None
            return float(norm) if norm is not None else float("nan")
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.acc.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _bad_step(self) -> None:
        self.bad_total += 1
        self.bad_run += 1
        log.warning("%s: non-finite loss or gradient at step %d, step skipped (%d in a row)", self.name,
                    self.step + 1, self.bad_run)
        if self.bad_run >= self.cfg.max_bad_steps:
            self._write_metrics("train", {"step": self.step + 1, "diverged": float(self.bad_run)})
            last = ckpt.list_checkpoints(self.ckpt_root)
            where = f"last good checkpoint {last[-1][1]}" if last else "no checkpoint written yet"
            raise TrainingError(
                f"{self.name}: loss was NaN/inf for {self.bad_run} consecutive steps (up to step {self.step + 1});"
                f" stopped ({where}); lower train.optim.lr, raise warmup_steps or check the data")

    def _step_metrics(self, sums: dict, n_tokens: float, grad_norm: float, bad: bool) -> dict[str, float]:
        names = sorted(sums)
        local = torch.tensor([float(sums[k]) for k in names] + [1.0 if self._term else 0.0])
        total = self._reduce(local)
        metrics = {k: float(total[i]) / n_tokens for i, k in enumerate(names)}
        metrics.setdefault("loss", float("nan"))
        metrics.update(tokens=n_tokens, grad_norm=grad_norm, skipped=float(bad), _term=float(total[-1]))
        return metrics

    # ---------------------------------------------------------------- validation and logging
    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        if self.val_stream is None:
            return {}
        self.model.eval()
        b, sums, n_tokens = self.cfg.batch_size, {}, 0.0
        for i in range(self.cfg.eval_batches):
            batch = self.collate(self.val_stream.rows((i * self.world + self.rank) * b, b))
            out = self.model(**{k: v.to(self.acc.device) for k, v in batch.items()})
            n_tokens += self.count_tokens(batch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float())
        self.model.train()
        names = sorted(sums)
        total = self._reduce(torch.tensor([sums[k] for k in names] + [n_tokens]))
        metrics = {f"val_{k}": float(total[i]) / float(total[-1]) for i, k in enumerate(names)}
        if "val_ce" in metrics and self.bytes_per_token:
            metrics["val_bits_per_byte"] = metrics["val_ce"] / math.log(2) / self.bytes_per_token
        self._write_metrics("val", {"step": self.step, "tokens_seen": self.tokens_seen, **metrics})
        return metrics

    def _write_metrics(self, split: str, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": self.step, "split": split, **{k: v for k, v in metrics.items() if not k.startswith("_")}}
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and k != "step":
                    self._tb.add_scalar(f"{split}/{k}", v, self.step)

    # ---------------------------------------------------------------- SIGTERM
    def _install_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._term = True

        return signal.signal(signal.SIGTERM, handler)

    @staticmethod
    def _restore_sigterm(previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def world_mismatch(found: ckpt.Checkpoint, world: int, cfg: Any, name: str) -> str | None:
    """Why a checkpoint written by another number of processes must not be resumed by `world` of them (the
    global batch, batch_size x grad_accum x processes, and the data order would silently change, and ZeRO
    shards would not fit), as one line; None when the counts agree. cfg: the stage's train section."""
    written = int(found.trainer_state.get("world_size", 1))
    if written == world:
        return None
    rows = cfg.batch_size * cfg.grad_accum
    return (f"{name}: {found.path} was written by {written} process(es) (global batch {rows * written} rows), "
            f"this run has {world} ({rows * world} rows); resume it with the launcher it was started with "
            f"({written} processes: the command the run printed), or pass --force to start over")


def _fully_shard(model: nn.Module, world: int) -> None:
    """FSDP2 on CPU (accelerate shards only on accelerators): each entry of every ModuleList, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for child in module:
                fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _deepspeed_optimizer_state(engine_optimizer: Any) -> dict | None:
    """This rank's shard of a ZeRO optimizer: the base AdamW state and its fp32 master partitions."""
    zero = getattr(engine_optimizer, "optimizer", engine_optimizer)
    base = getattr(zero, "optimizer", None)
    masters = getattr(zero, "single_partition_of_fp32_groups", None)
    if base is None or masters is None:
        return None
    return {"base": base.state_dict(), "fp32_partitions": [m.detach().clone() for m in masters]}


def _deepspeed_load_optimizer(engine_optimizer: Any, state: dict | None) -> None:
    zero = getattr(engine_optimizer, "optimizer", engine_optimizer)
    base = getattr(zero, "optimizer", None)
    masters = getattr(zero, "single_partition_of_fp32_groups", None)
    if state is None or base is None or masters is None:
        log.warning("DeepSpeed optimizer state not restored (ZeRO-3 or an unknown optimizer); AdamW moments "
                    "restart from zero")
        return
    base.load_state_dict(state["base"])
    for master, saved in zip(masters, state["fp32_partitions"]):
        master.data.copy_(saved)
