"""HF-style training: `model(ids, labels=ids)` in training mode computes the loss through the fused LM head +
cross-entropy without materialising the [B, L, V] logits, with the same loss and gradients as the plain path
(logits, then F.cross_entropy); eval mode, labels=None and skip_logits=False keep the logits; transformers'
Trainer trains on it and passes num_items_in_batch."""
import math

import pytest
import torch

from students import SpikeGPTConfig, SpikeGPTForCausalLM, StudentError

VOCAB = 41


def make(mixer="srwkv", steps=1, spike_driven=True, seed=0) -> SpikeGPTForCausalLM:
    torch.manual_seed(seed)
    cfg = SpikeGPTConfig.from_preset("tiny", vocab_size=VOCAB, d_model=16, n_head=2, token_mixer=mixer,
                                     time_steps=steps, spike_driven=spike_driven)  # fmt: skip
    return SpikeGPTForCausalLM(cfg).train()


def batch(rows=2, length=9, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [rows, length]; a few labels are -100 (ignored), as padding or masked prompts give."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels = ids.clone()
    labels[0, 3] = labels[-1, -2] = -100
    return ids, labels


def loss_and_grads(model, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits, grads


def float64_loss(model, ids, labels, num_items=None) -> torch.Tensor:
    """The next-token CE recomputed here in float64 from the model's logits: label[t+1] scores position t."""
    with torch.no_grad():
        logits = model(ids, skip_logits=False).logits.double()
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    nll = -log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    return nll.sum() / (num_items if num_items is not None else keep.sum())


@pytest.mark.parametrize("sparse", ["on", "off"])  # the spike-aware head matmuls, or the dense ones
@pytest.mark.parametrize("spike_driven", [True, False])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("mixer", ["srwkv", "sfsa", "sfsa_linear"])
def test_fused_training_loss_and_every_gradient_equal_the_plain_path(monkeypatch, mixer, steps, spike_driven, sparse):
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", sparse)
    model = make(mixer, steps, spike_driven)
    ids, labels = batch()
    fused_loss, fused_logits, fused = loss_and_grads(model, input_ids=ids, labels=labels)
    plain_loss, plain_logits, plain = loss_and_grads(model, input_ids=ids, labels=labels, skip_logits=False)
    assert fused_logits is None and plain_logits.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert float(fused_loss) == pytest.approx(float(float64_loss(model, ids, labels)), rel=1e-5)
    assert fused.keys() == plain.keys() == {n for n, p in model.named_parameters()}
    for name, g in plain.items():
        torch.testing.assert_close(fused[name], g, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the fused path records the head's input rate too (energy accounting reads it)
        model.lm_head.record_rate(torch.full((1,), -1.0))
        head_input = model(ids, labels=labels).head_input
    assert model.lm_head.input_rate == pytest.approx(float(head_input.mean()))
    if spike_driven and steps == 1:  # the head reads spikes: the case the spike-aware matmuls serve
        assert model.lm_head.binary_input and set(head_input.unique().tolist()) <= {0.0, 1.0}


def test_the_spike_aware_head_runs_on_the_fused_path(monkeypatch):
    from students.ops.linear_ce import cpu

    calls = []
    real = cpu.uses_sparse
    monkeypatch.setattr(cpu, "uses_sparse", lambda x: calls.append(real(x)) or calls[-1])
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    ids, labels = batch()
    make()(ids, labels=labels).loss.backward()
    assert calls == [True]


def test_fused_training_loss_is_fp32_math_inside_autocast():
    # mixed-precision training runs the forward inside an autocast region; the fused loss keeps fp32 maths
    model = make()
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels)
    logits = out.head_input.detach().double() @ model.lm_head.weight.detach().double().t()
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)
    keep = labels[:, 1:] != -100
    nll = -log_p.gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    assert out.logits is None and float(out.loss.detach()) == pytest.approx(float(nll.mean()), rel=1e-6)


@pytest.mark.parametrize("skip_logits", [None, False])
def test_num_items_in_batch_divides_the_summed_loss(skip_logits):
    model = make()
    ids, labels = batch()
    loss = model(ids, labels=labels, num_items_in_batch=torch.tensor(40), skip_logits=skip_logits).loss.detach()
    assert float(loss) == pytest.approx(float(float64_loss(model, ids, labels, num_items=40)), rel=1e-5)


def test_gradient_accumulation_with_num_items_equals_one_large_batch():
    # Trainer's convention: each micro-batch's loss is its sum / the whole step's count; the summed gradients
    # then equal those of the mean loss over the large batch
    model = make()
    ids, labels = batch(rows=4)
    _, _, whole = loss_and_grads(model, input_ids=ids, labels=labels)
    count = int((labels[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    for rows in (slice(0, 1), slice(1, 4)):
        model(ids[rows], labels=labels[rows], num_items_in_batch=count).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_logits_come_back_wherever_they_are_asked_for():
    model = make()
    ids, labels = batch()
    assert model(ids, labels=labels).logits is None  # training mode + labels: fused, no [B, L, V]
    assert model(ids).logits.shape == (*ids.shape, VOCAB)  # no labels
    assert model(ids, labels=labels, skip_logits=False).logits is not None  # asked for
    skipped = model(ids, skip_logits=True)
    assert skipped.logits is None and skipped.loss is None and skipped.head_input is not None
    fused = model(ids, labels=labels, skip_logits=True)
    assert fused.logits is None and fused.loss is not None
    model.eval()
    out = model(ids, labels=labels)  # eval mode: logits and the loss from them, as Trainer's prediction_step needs
    assert out.logits.shape == (*ids.shape, VOCAB) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, fused.loss.detach())


def test_bad_labels_raise_one_line_errors():
    model = make()
    ids, labels = batch()
    with pytest.raises(StudentError, match=r"labels must be \[B, L\]"):
        model(ids, labels=labels[:, :-1])
    bad = labels.clone()
    bad[1, 1] = VOCAB
    with pytest.raises(StudentError, match=rf"token ids in \[0, {VOCAB}\)"):
        model(ids, labels=bad)
    with pytest.raises(StudentError, match="logits_to_keep"):
        model(ids, labels=labels, logits_to_keep=1)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_transformers_trainer_trains_on_the_fused_path(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make()
    seen = []  # (training?, logits, loss, num_items_in_batch) of every forward the Trainer makes

    def record(module, args, kwargs, out):
        seen.append((module.training, out.logits, out.loss, kwargs.get("num_items_in_batch")))

    model.register_forward_hook(record, with_kwargs=True)
    gen = torch.Generator().manual_seed(2)
    pattern = torch.randint(0, VOCAB, (5,), generator=gen)
    data = _Rows(pattern.repeat(8, 3)[:, torch.randperm(15, generator=gen)[:12].sort().values])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=3e-2, use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    train_calls = [s for s in seen if s[0]]
    assert len(train_calls) == 6 * 2
    assert all(logits is None and math.isfinite(float(loss.detach())) for _, logits, loss, _ in train_calls)
    # Trainer counts the shifted labels of the accumulated step (2 micro-batches x 2 rows x 11 positions)
    assert all(int(n) == 2 * 2 * 11 for *_, n in train_calls)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    seen.clear()
    logits, _head_input = trainer.predict(_Rows(data.ids[:3])).predictions  # eval mode: prediction_step
    assert logits.shape == (3, 12, VOCAB) and not seen[0][0] and seen[0][1] is not None  # gets the logits
