"""A toy next-token model and dataset for trainer tests (no student, no teacher: tests the loop alone)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB = 17


class ToyLM(nn.Module):
    """Embedding -> dropout -> linear head; forward returns loss SUMS over next-token targets."""

    def __init__(self, width: int = 8, seed: int = 0, nan_at_calls: tuple[int, ...] = ()):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.drop = nn.Dropout(0.1)  # exercises the RNG state a resumed run must restore
        self.calls, self.nan_at_calls, self.hook = 0, set(nan_at_calls), None

    def forward(self, input_ids):
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)
        logits = self.head(self.drop(self.emb(input_ids[:, :-1])))
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1), reduction="sum")
        if self.calls in self.nan_at_calls:
            ce = ce * float("nan")
        return {"loss": ce, "ce": ce.detach()}


class ToyData(Dataset):
    """n rows of a noisy repeating pattern, [seq_len] int64 each (deterministic)."""

    def __init__(self, n: int = 64, seq_len: int = 9, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        base = torch.arange(seq_len) % 5
        self.rows = [(base + torch.randint(0, 3, (1,), generator=g)) % VOCAB for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]
