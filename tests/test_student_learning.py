"""A 2-layer spiking student learns a toy repeat task far below the unigram baseline on CPU."""
import math

import torch

from students import SpikeGPTConfig, SpikeGPTForCausalLM

VOCAB, PERIOD, LENGTH = 16, 3, 12


def repeat_batch(generator: torch.Generator, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patterns of PERIOD tokens repeated to LENGTH; labels hide the first period (unpredictable)."""
    pattern = torch.randint(0, VOCAB, (batch, PERIOD), generator=generator)
    ids = pattern.repeat(1, LENGTH // PERIOD)
    labels = ids.clone()
    labels[:, :PERIOD] = -100
    return ids, labels


def train_repeat(steps: int = 300, lr: float = 3e-2, **overrides) -> float:
    """Mean loss of the last 20 Adam steps on the repeat task (fixed seeds, one thread).

    lr 3e-2: at init every neuron already fires ~15% of the time on random features, which training has to
    overwrite; at 1e-2 the spike-driven srwkv student learns this task far slower (1.37 against 0.51 nats)."""
    torch.manual_seed(0)
    cfg = SpikeGPTConfig.from_preset("tiny", vocab_size=VOCAB, d_model=32, **overrides)
    model = SpikeGPTForCausalLM(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        ids, labels = repeat_batch(gen)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def test_two_layer_student_learns_repeat_task():
    final = train_repeat(token_mixer="srwkv", spike_driven=True)
    unigram = math.log(VOCAB)  # tokens are uniform, so the best unigram model pays log V nats
    assert final < 0.4 * unigram, f"final loss {final:.3f} vs unigram {unigram:.3f}"
