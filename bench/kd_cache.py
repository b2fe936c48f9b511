"""Cached top-k KD against online KD on the bundled teacher: how far the cached loss's gradient is from the
full-vocabulary one, per temperature and KD kind. Nothing here is timed.

    .venv/bin/python -m bench.kd_cache [--teacher smollm2-135m] [--tokens 1024] [--k 64] [--taus 1,2,4]
                                       [--student DIR] [--threads 2]

Text: the first --tokens tokens of the bundled Persuasion (held-out text), in rows of 256. Teacher logits z from
the fp32 teacher. Students: "random" = a randomly initialised `demo` spiking student (4 x 128, seed 0), "noisy" =
z + N(0, 1) noise, and with --student an exported student folder. Per tau:
  tail        mean over tokens of the tempered teacher's mass softmax(z / tau) outside its top k (full vocabulary)
  tail (old)  the same mass in the format-1 bucketed form: the temperature-1 top-k and tail, tempered as buckets
and per KD kind (forward KL, reverse KL, JSD with beta 0.5) the cosine, over all tokens at once, between the
gradient w.r.t. the student's logits of the online loss, tau^2 D(softmax(z / tau), softmax(s / tau)) over the full
vocabulary (float64, written here), and of
  new         pipeline.losses.kd_loss on teachers.cache.topk_targets(z, k, tau), the format-2 cache's targets
  old         the format-1 cache: temperature-1 top-k, both sides bucketed at temperature 1, then tempered as
              buckets (written here)
  hidden      the hidden store (teacher_cache.store=hidden, teachers.cache): the teacher's final hidden state
              rounded to bf16 (C_t x 2 bytes per token), through the teacher's head, then the online loss
with each gradient's norm relative to the online one (|new|, |old|, |hidden|).
"""

from __future__ import annotations

import argparse
import math

import torch

from pipeline.losses import kd_loss
from teachers import load_teacher
from teachers.cache import topk_targets
from teachers.data import bundled_corpus, read_text

KINDS = ("forward_kl", "reverse_kl", "jsd")
ROW = 256


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Summed D(q, p) of student log-probs log_p and teacher log-probs log_q [N, K] (0 log 0 = 0)."""
    def kl(log_a, log_b):
        return torch.where(log_a.exp() > 0, log_a.exp() * (log_a - log_b), 0.0).sum()

    if kind == "forward_kl":
        return kl(log_q, log_p)
    if kind == "reverse_kl":
        return kl(log_p, log_q)
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1 - beta))
    return beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)


def online_grad(s: torch.Tensor, z: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """d/ds of tau^2 D over the full vocabulary, float64."""
    s = s.double().requires_grad_()
    loss = tau**2 * divergence(torch.log_softmax(s / tau, -1), torch.log_softmax(z.double() / tau, -1), kind)
    return torch.autograd.grad(loss, s)[0]


def old_buckets(s: torch.Tensor, z: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Format-1 bucket log-probs (student, teacher) [N, k + 1]: top-k at temperature 1, tempered as buckets."""
    target = topk_targets(z, k, 1.0)
    log_s = torch.log_softmax(s, -1)
    a = torch.cat([log_s.gather(-1, target.ids),
                   torch.logsumexp(log_s.scatter(-1, target.ids, float("-inf")), -1, keepdim=True)], -1)
    t = torch.cat([target.logprobs.double(), target.tail_mass.double().clamp_min(1e-10).log().unsqueeze(-1)], -1)
    return torch.log_softmax(a / tau, -1), torch.log_softmax(t / tau, -1)


def old_grad(s: torch.Tensor, z: torch.Tensor, kind: str, k: int, tau: float) -> torch.Tensor:
    s = s.double().requires_grad_()
    log_p, log_q = old_buckets(s, z, k, tau)
    return torch.autograd.grad(tau**2 * divergence(log_p, log_q, kind), s)[0]


def new_grad(s: torch.Tensor, z: torch.Tensor, kind: str, k: int, tau: float) -> torch.Tensor:
    s = s.float().requires_grad_()
    loss = kd_loss(s, topk_targets(z, k, tau), kind, tau).sum()
    return torch.autograd.grad(loss, s)[0].double()


class Cosine:
    """Running cosine of two flattened vectors built chunk by chunk, and the norm ratio |a| / |b|."""

    def __init__(self):
        self.ab = self.aa = self.bb = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.ab += float((a * b).sum())
        self.aa += float((a * a).sum())
        self.bb += float((b * b).sum())

    def __str__(self) -> str:
        return f"{self.ab / math.sqrt(self.aa * self.bb):.3f} ({math.sqrt(self.aa / self.bb):.2f}x)"


def tokens(teacher, n: int) -> torch.Tensor:
    """[n // ROW, ROW] token ids of Persuasion, from its start."""
    text = read_text(bundled_corpus()["persuasion"])
    ids = teacher.tokenizer(text[: n * 8], add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        raise SystemExit(f"--tokens {n}: Persuasion gave only {ids.numel()} tokens here")
    return ids[: n // ROW * ROW].reshape(-1, ROW)


def students(ids: torch.Tensor, z: torch.Tensor, vocab: int, student_dir: str | None) -> dict[str, torch.Tensor]:
    """Student logits [N, V] by name."""
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    torch.manual_seed(0)
    out = {"noisy": z + torch.randn_like(z)}
    with torch.no_grad():
        random = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("demo", vocab_size=vocab)).eval()
        out["random"] = random(ids).logits.reshape(-1, vocab).float()
        if student_dir:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
            out[student_dir] = model(ids).logits.reshape(-1, vocab).float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--taus", default="1,2,4")
    ap.add_argument("--student", default=None, help="an exported student folder (its vocabulary the teacher's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher, dtype=torch.float32)
    ids = tokens(teacher, args.tokens)
    with torch.no_grad():
        last = torch.cat([teacher(row[None], logits=False, hidden_states=False).last_hidden_state[0] for row in ids])
        z = teacher.head(last).float()
        z_bf16 = teacher.head(last.bfloat16().float()).float()
    studs = students(ids, z, teacher.vocab_size, args.student)
    print(f"teacher {args.teacher}, {z.shape[0]} tokens of Persuasion, k = {args.k}; cosine with the online "
          "gradient (norm relative to it)")
    for tau in (float(t) for t in args.taus.split(",")):
        tail = 1 - torch.softmax(z / tau, -1).topk(args.k, -1).values.sum(-1)
        old_tail = old_buckets(z, z, args.k, tau)[1][:, -1].exp()
        print(f"tau {tau:g}: tempered teacher mass outside its top {args.k} {tail.mean():.3f}, "
              f"in the old bucketed form {old_tail.mean():.3f}")
        for name, s in studs.items():
            for kind in KINDS:
                new, old, hidden = Cosine(), Cosine(), Cosine()
                for rows in torch.arange(z.shape[0]).split(ROW):
                    ref = online_grad(s[rows], z[rows], kind, tau)
                    new.add(new_grad(s[rows], z[rows], kind, args.k, tau), ref)
                    old.add(old_grad(s[rows], z[rows], kind, args.k, tau), ref)
                    hidden.add(online_grad(s[rows], z_bf16[rows], kind, tau), ref)
                print(f"  {name:<8} {kind:<11} new {new}  old {old}  hidden {hidden}", flush=True)


if __name__ == "__main__":
    main()
