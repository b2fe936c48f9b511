"""The Accelerate trainer on one CPU process: accumulation, resume, NaN skipping, SIGTERM, metrics."""

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from pipeline import checkpoint as ckpt
from pipeline.schema import OptimConfig, TrainConfig
from pipeline.trainer import SIGTERM_EXIT_CODE, Trainer, TrainingError, lr_factor

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from toy import ToyData, ToyLM


def _cfg(**kw) -> TrainConfig:
    optim = OptimConfig(lr=kw.pop("lr", 0.05), min_lr=0.005, warmup_steps=2, grad_clip=kw.pop("clip", 1.0),
                        weight_decay=0.01)
    base = {"steps": 6, "batch_size": 4, "grad_accum": 1, "eval_every": 3, "eval_batches": 2,
            "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, "max_bad_steps": 3}
    base.update(kw)
    return TrainConfig(optim=optim, **base)


def _train(tmp: Path, cfg: TrainConfig, model=None, seed=0, **kw) -> tuple[ToyLM, Trainer, dict]:
    model = model or ToyLM(seed=seed)
    torch.manual_seed(1234)  # after building the model: the dropout stream must not depend on who built it
    trainer = Trainer(model, cfg, Accelerator(cpu=True), tmp, ToyData(), val_data=ToyData(8, seed=1),
                      bytes_per_token=2.0, seed=0, config_hash="h", **kw)
    return model, trainer, trainer.fit()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    assert lr_factor(0, 10, 2, 1.0, 0.1) == 0.5
    assert lr_factor(1, 10, 2, 1.0, 0.1) == 1.0
    assert lr_factor(2, 10, 2, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("from_end", [False, True])
def test_data_stream_reads_each_epochs_seeded_permutation_forwards_or_from_its_end(from_end):
    from pipeline.trainer import DataStream

    n, seed = 7, 3
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist() for e in (0, 1)]
    want = [p[::-1] if from_end else p for p in perms]
    stream = DataStream(list(range(100, 100 + n)), seed, from_end=from_end)
    assert [stream.index(p) for p in range(2 * n)] == want[0] + want[1]
    assert stream.rows(n - 2, 3) == [100 + i for i in (want[0][-2:] + want[1][:1])]


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    m_acc, _, _ = _train(tmp_path / "a", _cfg(batch_size=2, grad_accum=4))
    m_big, _, _ = _train(tmp_path / "b", _cfg(batch_size=8, grad_accum=1))
    # the gradient norm is scale-sensitive (Adam's update is not), so it checks the per-token normalisation
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    for acc, big in zip(*rows):
        for key in ("loss", "grad_norm", "tokens"):
            if key in big:
                assert acc[key] == pytest.approx(big[key], rel=1e-6), key
    for k, v in m_big.state_dict().items():
        torch.testing.assert_close(m_acc.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_loss_falls_and_metrics_are_written(tmp_path):
    _, _, final = _train(tmp_path, _cfg(steps=12))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[0]["tokens"] == 4 * 8
    assert [r["step"] for r in val] == [3, 6, 9, 12]
    # bits/byte = per-token CE in nats / ln 2 / bytes per token
    assert val[-1]["val_bits_per_byte"] == pytest.approx(val[-1]["val_ce"] / math.log(2) / 2.0)
    assert final["val_loss"] == val[-1]["val_loss"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [10, 12]


class Crash(Exception):
    pass


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    cfg = _cfg(steps=7, grad_accum=2, batch_size=3)
    full, _, final_full = _train(tmp_path / "full", cfg)

    def crash(calls):
        if calls == 11:  # inside step 6, after the step-4 checkpoint
            raise Crash

    crashing = ToyLM()
    crashing.hook = crash
    with pytest.raises(Crash):
        _train(tmp_path / "cut", cfg, model=crashing)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [2, 4]
    resumed, trainer, final = _train(tmp_path / "cut", cfg, model=ToyLM(seed=99))  # other init: must be restored
    assert trainer.step == 7
    # training tokens carry over the crash (restored from the step-4 checkpoint, steps 5-7 added again)
    assert final["tokens_seen"] == final_full["tokens_seen"] == trainer.tokens_seen > 0
    assert final["tokens_per_s"] > 0
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == list(range(1, 8))


def test_checkpoints_from_another_config_are_not_resumed(tmp_path):
    _train(tmp_path, _cfg(steps=4))
    model = ToyLM()
    trainer = Trainer(model, _cfg(steps=4), Accelerator(cpu=True), tmp_path, ToyData(), config_hash="other")
    trainer.fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    assert ckpt.load_latest(tmp_path / "checkpoints").trainer_state["config_hash"] == "other"


def test_resuming_on_another_number_of_processes_is_refused(tmp_path):
    # written by one process with batch 4; a second run on 2 processes would silently train at global batch 8
    _train(tmp_path, _cfg(steps=4))
    trainer = Trainer(ToyLM(), _cfg(steps=6), Accelerator(cpu=True), tmp_path, ToyData(), config_hash="h",
                      accept_hashes=())
    trainer.world = 2  # what a second rank would report; the checkpoint says 1
    with pytest.raises(TrainingError) as exc:
        trainer.fit()
    msg = str(exc.value)
    assert "was written by 1 process(es) (global batch 4 rows), this run has 2 (8 rows)" in msg
    assert "resume it with the launcher it was started with (1 processes" in msg and "\n" not in msg


def test_a_nan_step_is_skipped_and_counted(tmp_path):
    model = ToyLM(nan_at_calls=(3,))
    before = {}

    def snapshot(calls):
        if calls == 3:
            before.update(_state(model))

    model.hook = snapshot
    _, _, final = _train(tmp_path, _cfg(steps=4, checkpoint_every=10), model=model)
    assert final["bad_steps"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if r["split"] == "train"] == [0.0, 0.0, 1.0, 0.0]
    assert math.isnan([r for r in rows if r["split"] == "train"][2]["grad_norm"])


def test_consecutive_nan_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
    model = ToyLM(nan_at_calls=(5, 6, 7))
    with pytest.raises(TrainingError, match=r"NaN/inf for 3 consecutive steps.*step-0000004.*optim.lr"):
        _train(tmp_path, _cfg(steps=10, checkpoint_every=2, eval_every=100), model=model)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["split"], last["step"], last["diverged"]) == ("train", 7, 3.0)  # what a sweep reads


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    model = ToyLM()
    model.hook = lambda calls: os.kill(os.getpid(), signal.SIGTERM) if calls == 3 else None
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        _train(tmp_path, _cfg(steps=10, checkpoint_every=100), model=model)
    assert exc.value.code == SIGTERM_EXIT_CODE
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [3]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_progress_bar_shows_the_smoothed_loss(tmp_path, monkeypatch):
    import tqdm.auto

    from pipeline.trainer import LOSS_SMOOTHING

    shown: list[tuple[int, float]] = []

    class Bar:  # records what the trainer's bar would display at each step
        def __init__(self, *a, initial=0, **kw):
            self.n, self.postfix = initial, None

        def set_postfix(self, refresh=True, **kw):
            self.postfix = float(kw["loss"])

        def update(self, k):
            self.n += k
            shown.append((self.n, self.postfix))

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    _train(tmp_path, _cfg(steps=8, log_every=1))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]
    # independent float64 reference: bias-corrected EMA of the per-step losses
    for step, value in shown:
        w = [(1 - LOSS_SMOOTHING) * LOSS_SMOOTHING ** (step - 1 - i) for i in range(step)]
        expected = sum(wi * li for wi, li in zip(w, losses[:step])) / sum(w)
        assert value == pytest.approx(expected, rel=1e-3), step
    assert shown[-1][1] != pytest.approx(losses[-1], rel=1e-3)  # not the last logged value


def test_accepted_checkpoints_continue_on_the_new_schedule(tmp_path):
    cfg6 = _cfg(steps=6, checkpoint_every=3)
    _train(tmp_path, cfg6)
    cfg10 = _cfg(steps=10, checkpoint_every=3)
    model = ToyLM(seed=0)
    trainer = Trainer(model, cfg10, Accelerator(cpu=True), tmp_path, ToyData(), val_data=ToyData(8, seed=1),
                      bytes_per_token=2.0, seed=0, config_hash="h10", accept_hashes=("h",))
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))  # steps 1-6 kept, 7-10 added
    o = cfg10.optim
    for r in train[6:]:  # from the checkpoint on, the rate of a 10-step schedule
        assert r["lr"] == pytest.approx(o.lr * lr_factor(r["step"] - 1, 10, o.warmup_steps, o.lr, o.min_lr))
    assert train[6]["tokens_seen"] == pytest.approx(train[5]["tokens_seen"] + train[6]["tokens"])
    # a checkpoint of another hash that is not accepted is not resumed
    other = Trainer(ToyLM(seed=0), _cfg(steps=12), Accelerator(cpu=True), tmp_path, ToyData(),
                    bytes_per_token=2.0, seed=0, config_hash="h12")
    other._resume()
    assert other.step == 0
