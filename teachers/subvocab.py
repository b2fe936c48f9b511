"""Exact teacher targets over a subset student vocabulary whose token boundaries nest inside the teacher's.

Source: Phan, Khisti & Ullrich, "Cross-Tokenizer Likelihood Scoring Algorithms for Language Model
Distillation" (ICLR 2026, arXiv 2512.14954; code github truongbuu/cross-tokenizer-scoring), the subset regime:
when the student's vocabulary is the teacher's BPE with its merge list cut short, every teacher token T has a
fixed student tokenization pieces(T), and the student's tokens of any text are the teacher's tokens split
into their pieces. The teacher's probability of the next student token then needs O(1) teacher evaluations.

Derivation. Let T_1..T_n be the teacher's tokens of the text and q_j(t) = P(T_j = t | T_<j). At a student
position inside T_j, after its first pieces pi have been emitted, condition on T_<j and on the event that T_j's
pieces start with pi. Two teacher tokens then decide the next student token s:
  - C(s), continuing mass: T_j goes on; the sum of q_j(t) over teacher tokens t whose pieces are pi, s, ...;
  - E(s), ending mass: T_j is exactly the token t_pi that pi spells, and s is the first piece of T_{j+1}:
    q_j(t_pi) * (the teacher's next-token distribution after t_pi, summed by first piece). At T_j's own end
    (pi = pieces(T_j)) that distribution is q_{j+1}, from the same forward; where pi is a strict prefix of
    T_j's pieces ("the" inside "there") it comes from a BRANCH token t_pi at T_j's position that sees T_<j,
    one extra evaluation (`Teacher.branch_step`: one token of a decode step over the KV cache that the rows'
    own pass, `Teacher.prefill`, left).
  P(s) = (C(s) + E(s)) / sum over s' of (C(s') + E(s')), the mass of the teacher tokens whose pieces start
with pi (tokens without pieces, e.g. special tokens the student lacks, drop out of both). Student tokens that
no teacher token spells (bytes the teacher lacks) get probability 0 (log-prob -inf). A row prefix token at
ids[0] (BOS) has no q row; nothing continues it, so its target is the first-piece sum of the distribution after
it. This is the paper's decomposition of a subset-vocabulary next-token probability into the covers that go on
through the current teacher token and those that end there.

Where it differs from the paper's exact likelihood: the paper conditions on the student prefix alone and
marginalises over the canonical teacher encodings ("covers") of the current pre-token; here the teacher's own
tokens T_<j of the text are conditioned on. Teacher paths that spell the same student tokens with other
teacher boundaries (e.g. "ĠSomerset" + "shire" where the tokenizer writes "ĠSomers" + "etshire") are counted at
the step where they branch off (as C or E mass of the actual next token) and dropped at the next step, which
conditions on T_<j again. On the first 20 kB of Persuasion with SmolLM2-135M they hold on average 0.64%
(subset:1024) / 0.30% (subset:8192) of the actual next token's mass, and the teacher's bits/byte through these
targets is 0.63% / 0.17% below its own: exactly sum log(1 + alternative / kept) plus row-edge terms
(tests/test_subvocab.py::test_invariant_bits_per_byte_on_persuasion, pytest -s prints them).

Branch floor (an approximation, off by default). A branch token costs one teacher evaluation, and with `bytes`
most positions inside a teacher token need one. Write
r = q_j(t_pi) / M_j(pi) for its relative ending mass, M_j(pi) the q_j mass of every teacher token whose pieces
start with pi (C's total plus q_j(t_pi)). With branch_floor eps > 0 a branch with r < eps is not evaluated: its
ending mass q_j(t_pi) is split instead by the distribution after T_j itself (q_{j+1}, T_j's own row, already
computed). Bound: the exact target is P = (1 - w) P_C + w Q, P_C the continuing mass normalised, Q the branch's
first-piece distribution (normalised) and w its share of the normaliser; the approximation is (1 - w') P_C +
w' Q' with Q' from q_{j+1}. Both w and w' are at most r (a first-piece sum has total at most 1), and for
w >= w' the difference is w' (Q - Q') + (w - w') (Q - P_C), so TV(P, P') <= max(w, w') <= r < eps; positions
without a skipped branch are unchanged. Every rule for the skipped mass meets this bound; on the first 20 kB of
Persuasion with SmolLM2-135M the TV reaches 0.79-0.93 of r on average (bench/subvocab.py), and of the cheap rules
this one came out closest, ahead of dropping the mass (renormalising the rest) and of the distribution after
t_pi alone (no context). The relative ending masses there are seldom tiny, so a floor at a negligible change skips
only part of the branches (the table in bench/README.md). branch_floor = 0 evaluates every branch (the exact
targets above).

The continuing mass is a range sum: the teacher's tokens sorted lexicographically by their pieces form a trie
in which the tokens whose pieces start with a prefix are one contiguous range (on SmolLM2 a few to a few
hundred tokens), gathered and summed by next piece in float64; the ending mass sums the whole next-token
distribution by first piece (one pass over the teacher's vocabulary per position with ending mass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from teachers.errors import DataError

POSITION_CHUNK = 64  # student positions derived at once: bounds the [chunk, V_t] float64 next-token masses
# probability a zero-mass student token gets in trained or stored targets (`floored`); the same number as the
# tail floor of cached top-k targets (pipeline.kd_targets.TAIL_FLOOR)
MASS_FLOOR = 1e-10


@dataclass
class RowPlan:
    """What one row of student positions needs from the teacher, all LongTensor [L] unless noted.

    node: trie node of the pieces emitted so far inside the current teacher token; q_row: the teacher output
    row holding q_j (the row before T_j); end_tok: the teacher token spelled exactly by those pieces (-1:
    none); next_row: the output row holding the distribution after end_tok (T_j's own row at its end, a
    branch row T_w + b inside it; -1: no ending mass); branch_at, branch_tok [n_b]: the branch tokens to
    evaluate (position in the row, teacher id); n_main: T_w, the row's own teacher tokens; first: BoolTensor
    [L], positions at ids[0] (a row prefix such as BOS) without a q row: nothing continues their token, so the
    next student token is the first piece of the next teacher token whatever q_j is.
    """

    node: torch.Tensor
    q_row: torch.Tensor
    end_tok: torch.Tensor
    next_row: torch.Tensor
    branch_at: torch.Tensor
    branch_tok: torch.Tensor
    n_main: int
    first: torch.Tensor

    @property
    def n_branches(self) -> int:
        return int(self.branch_at.numel())


@dataclass
class BranchCount:
    """Branch tokens of `exact_log_probs` calls, summed over them: positions (student positions derived), needed
    (positions whose emitted pieces spell a shorter teacher token, each one branch token), evaluated (those
    run), skipped_share (the sum over the others of their relative ending mass q_j(t_pi) / M_j(pi), each the
    bound on its position's total-variation error) and max_skipped (the largest of them; 0: none skipped)."""

    positions: int = 0
    needed: int = 0
    evaluated: int = 0
    skipped_share: float = 0.0
    max_skipped: float = 0.0

    def add(self, plan: RowPlan, share: torch.Tensor | None, skip: torch.Tensor) -> None:
        """Count one row: its plan before skipping, the branches' relative ending mass [n_b] (None when nothing
        is skipped) and skip [n_b]."""
        self.positions += int(plan.node.numel())
        self.needed += plan.n_branches
        self.evaluated += plan.n_branches - int(skip.sum())
        if bool(skip.any()):
            self.skipped_share += float(share[skip].sum())
            self.max_skipped = max(self.max_skipped, float(share[skip].max()))


class PieceTrie:
    """The teacher's vocabulary as a trie over student pieces, in arrays.

    pieces: for every teacher id, the tuple of student ids it splits into (empty: the student cannot spell it,
    its mass is dropped); n_student: the student vocabulary size V_s. Teacher tokens are sorted
    lexicographically by their pieces (`order`); node n is a prefix of some token's pieces (depth[n] pieces
    long), the tokens starting with it are order[lo[n]:hi[n]], and end[n] is the token spelled by exactly
    those pieces (-1: none). Raises ValueError for a piece outside [0, n_student).
    """

    def __init__(self, pieces: Sequence[Sequence[int]], n_student: int):
        self.n_teacher, self.n_student = len(pieces), int(n_student)
        lengths = [len(p) for p in pieces]
        flat = [s for p in pieces for s in p]
        if flat and not 0 <= min(flat) <= max(flat) < self.n_student:
            raise ValueError(f"pieces: a student id outside [0, {self.n_student}); the pieces table and the "
                             "student vocabulary do not belong together")
        # every token's pieces, concatenated: piece d of token t is flat_piece[offset[t] + d]
        self.n_pieces = torch.tensor(lengths, dtype=torch.long)
        self.offset = F.pad(self.n_pieces.cumsum(0), (1, 0))
        self.flat_piece = torch.tensor(flat, dtype=torch.long)
        # the first piece of each token; tokens without pieces go to an extra column, dropped afterwards
        self.first_piece = torch.tensor([p[0] if len(p) else self.n_student for p in pieces], dtype=torch.long)
        order = sorted((t for t in range(self.n_teacher) if lengths[t]), key=lambda t: tuple(pieces[t]))
        self.order = torch.tensor(order, dtype=torch.long)
        self._build_nodes(pieces, order)

    def _build_nodes(self, pieces: Sequence[Sequence[int]], order: list[int]) -> None:
        index: dict[tuple[int, ...], int] = {}
        lo, hi, end, depth = [], [], [], []
        flat_node = np.empty(int(self.offset[-1]), dtype=np.int64)
        for rank, t in enumerate(order):
            p, base = tuple(pieces[t]), int(self.offset[t])
            for d in range(len(p)):
                n = index.get(p[: d + 1])
                if n is None:
                    n = index[p[: d + 1]] = len(lo)
                    lo.append(rank)
                    end.append(-1)
                    depth.append(d + 1)
                    hi.append(rank)
                hi[n] = rank + 1
                flat_node[base + d] = n
            end[index[p]] = t
        self.lo, self.hi, self.end, self.depth = (torch.tensor(x, dtype=torch.long) for x in (lo, hi, end, depth))
        self.flat_node = torch.from_numpy(flat_node)  # node of token t's first d + 1 pieces: [offset[t] + d]

    @classmethod
    def from_vocab(cls, vocab: Any) -> PieceTrie:
        """The trie of a teachers.vocab.VocabMap (its pieces and student_size)."""
        return cls(vocab.pieces, vocab.student_size)

    def plan(self, view: Any) -> RowPlan:
        """The RowPlan of a teacher view (teachers.data.TeacherView: ids [T_w], pos [L], piece [L]). Raises
        DataError when pos/piece do not index the row's teacher tokens and their pieces."""
        ids, pos, piece = view.ids.long(), view.pos.long(), view.piece.long()
        self._check_view(ids, pos, piece)
        tok = ids[pos]
        node = self.flat_node[self.offset[tok] + piece]
        end_tok = self.end[node]
        boundary = piece + 1 == self.n_pieces[tok]
        branch = ~boundary & (end_tok >= 0)
        n_main = int(ids.numel())
        next_row = torch.where(boundary, pos, torch.full_like(pos, -1))
        next_row[branch] = n_main + torch.arange(int(branch.sum()))
        first = pos == 0
        if bool((first & ~(boundary & (self.hi[node] - self.lo[node] == 1))).any()):  # nothing continues it
            raise DataError("teacher view: a student position at ids[0] needs a teacher token of context before "
                            "it (only a row prefix token that nothing continues, e.g. BOS, may stand there)")
        return RowPlan(node=node, q_row=torch.where(first, pos, pos - 1),
                       end_tok=torch.where(next_row >= 0, end_tok, -1), next_row=next_row,
                       branch_at=pos[branch], branch_tok=end_tok[branch], n_main=n_main, first=first)

    def _check_view(self, ids: torch.Tensor, pos: torch.Tensor, piece: torch.Tensor) -> None:
        if pos.shape != piece.shape or pos.ndim != 1 or ids.ndim != 1:
            raise DataError(f"teacher view: pos {tuple(pos.shape)} and piece {tuple(piece.shape)} must be the "
                            f"same 1-D shape and ids 1-D (got {tuple(ids.shape)})")
        if pos.numel() == 0:
            return
        if int(pos.min()) < 0 or int(pos.max()) >= ids.numel():
            raise DataError(f"teacher view: pos must index the row's {ids.numel()} teacher tokens")
        if int(ids.min()) < 0 or int(ids.max()) >= self.n_teacher:
            raise DataError(f"teacher view: a teacher id outside the pieces table's [0, {self.n_teacher})")
        n = self.n_pieces[ids[pos]]
        if bool((piece < 0).any() | (piece >= n).any()):
            raise DataError("teacher view: piece[t] must index the pieces of the teacher token ids[pos[t]]")

    def rows_needed(self, plan: RowPlan) -> torch.Tensor:
        """The teacher output rows a plan reads (sorted, unique): q rows and ending rows."""
        return torch.unique(torch.cat([plan.q_row, plan.next_row[plan.next_row >= 0]]))

    def derive(self, plan: RowPlan, logprobs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probabilities of the next student token at each planned position -> [L, V_s] float32.

        logprobs: [R, V] the teacher's next-token log-softmax at output rows (the row's T_w tokens, then its
        branch tokens); V may exceed the pieces table (padded heads: those columns are dropped). rows: the
        output row each logprobs row belongs to (default 0..R-1), e.g. `rows_needed(plan)`.
        """
        lookup = _row_lookup(plan, rows)
        logprobs = logprobs[:, : self.n_teacher]
        out = torch.empty(plan.node.numel(), self.n_student, dtype=torch.float32)
        for c in range(0, plan.node.numel(), POSITION_CHUNK):
            span = slice(c, c + POSITION_CHUNK)
            q_row, next_row = plan.q_row[span], plan.next_row[span]
            if lookup is not None:
                q_row = lookup[q_row]
                next_row = torch.where(next_row >= 0, lookup[next_row.clamp_min(0)], -1)
            num = self._numerators(plan.node[span], plan.end_tok[span], q_row, next_row, logprobs,
                                   plan.first[span])
            out[span] = (num.log() - num.sum(-1, keepdim=True).log()).float()
        return out

    def ending_share(self, plan: RowPlan, logprobs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Relative ending mass of each branch of a plan -> [n_b] float64: q_j(t_pi) / M_j(pi), the share of the
        mass of the teacher tokens whose pieces start with the emitted pieces pi that t_pi, the shorter token
        they spell, holds. logprobs and rows as in `derive`; only q rows are read (no branch rows)."""
        at = torch.nonzero(plan.next_row >= plan.n_main).squeeze(1)  # the branch positions, in branch order
        lookup = _row_lookup(plan, rows)
        q_row = plan.q_row[at] if lookup is None else lookup[plan.q_row[at]]
        logprobs = logprobs[:, : self.n_teacher]
        share = torch.empty(at.numel(), dtype=torch.float64)
        for c in range(0, at.numel(), POSITION_CHUNK):
            span = slice(c, c + POSITION_CHUNK)
            owner, token, _ = self._continuations(plan.node[at[span]])
            going_on = torch.zeros(q_row[span].numel(), dtype=torch.float64).index_add_(
                0, owner, logprobs[q_row[span][owner], token].double().exp())
            ending = logprobs[q_row[span], plan.end_tok[at[span]]].double().exp()
            share[span] = ending / (ending + going_on)
        return share

    def skip_branches(self, plan: RowPlan, skip: torch.Tensor) -> RowPlan:
        """The plan without the branch tokens where skip [n_b] is True: their ending mass q_j(t_pi) is split by
        the next-token distribution after T_j itself (T_j's own row, q_{j+1}) instead of the one after t_pi.
        The kept branches keep their order (output rows n_main, n_main + 1, ...)."""
        at = torch.nonzero(plan.next_row >= plan.n_main).squeeze(1)
        next_row = plan.next_row.clone()
        next_row[at[skip]] = plan.branch_at[skip]  # T_j's own output row: the distribution after T_j
        next_row[at[~skip]] = plan.n_main + torch.arange(int((~skip).sum()))
        return replace(plan, next_row=next_row, branch_at=plan.branch_at[~skip], branch_tok=plan.branch_tok[~skip])

    def _numerators(self, node, end_tok, q_row, next_row, logprobs, first) -> torch.Tensor:
        """Unnormalised next-student-token masses C(s) + E(s) -> [n, V_s] float64."""
        owner, token, child = self._continuations(node)
        num = torch.zeros(node.numel(), self.n_student, dtype=torch.float64)
        num.index_put_((owner, child), logprobs[q_row[owner], token].double().exp(), accumulate=True)
        ends = torch.nonzero(next_row >= 0).squeeze(1)
        if ends.numel():
            e = torch.where(first[ends], 1.0, logprobs[q_row[ends], end_tok[ends]].double().exp())
            num[ends] += e[:, None] * self.first_piece_mass(logprobs[next_row[ends]])
        return num

    def _continuations(self, node: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(owner, token, child): every teacher token strictly extending each position's node (a range in trie
        order), the position it belongs to and its next piece, the student token it continues with."""
        count = self.hi[node] - self.lo[node]
        owner = torch.repeat_interleave(torch.arange(node.numel()), count)
        rank = self.lo[node][owner] + torch.arange(owner.numel()) - torch.repeat_interleave(count.cumsum(0) - count,
                                                                                              count)
        token, d = self.order[rank], self.depth[node][owner]
        longer = self.n_pieces[token] > d  # the node's own token ends here: ending mass, not continuing
        token, owner, d = token[longer], owner[longer], d[longer]
        return owner, token, self.flat_piece[self.offset[token] + d]

    def first_piece_mass(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The teacher's next-token distribution summed by first student piece: [n, V] log-probs -> [n, V_s]
        float64 probabilities (tokens without pieces dropped)."""
        p = logprobs[:, : self.n_teacher].float().exp()  # summed in float32 (relative error ~1e-6): one pass
        out = torch.zeros(p.shape[0], self.n_student + 1, dtype=torch.float32)
        return out.index_add_(1, self.first_piece, p)[:, : self.n_student].double()


def exact_log_probs(teacher: Any, trie: PieceTrie, views: Sequence[Any], branch_floor: float = 0.0,
                    count: BranchCount | None = None) -> torch.Tensor:
    """The teacher's log-probabilities of the next student token at every position of each view -> [B, L, V_s].

    teacher: teachers.Teacher; views: B teacher views (ids [T_w], pos [L], piece [L], equal L, any T_w). Two
    teacher passes for the whole batch: the rows (Teacher.prefill, keeping the KV cache), which gives every
    q_j; then the branch tokens as one step over that cache (Teacher.branch_step), only those whose relative
    ending mass q_j(t_pi) / M_j(pi) (`PieceTrie.ending_share`) is at least branch_floor; the others' ending
    mass is split by the distribution after T_j itself (`PieceTrie.skip_branches`), which moves that
    position's distribution by at most its relative ending mass in total variation (module docstring).
    branch_floor 0 evaluates every branch: the exact targets. The head runs only on the rows the targets read.
    count: a BranchCount to add this batch's branch tokens to. Raises DataError for views of different L or
    malformed views, ValueError for a branch_floor outside [0, 1].
    """
    if not 0.0 <= branch_floor < 1.0:
        raise ValueError(f"branch_floor={branch_floor!r}: must be in [0, 1) (teacher_cache.branch_floor)")
    if len({int(v.pos.numel()) for v in views}) > 1:
        raise DataError("teacher views of one batch must have the same number of student positions")
    plans = [trie.plan(v) for v in views]
    prefill = teacher.prefill([v.ids for v in views])
    main = [_row_logprobs(teacher, h, _main_rows(plan)) for plan, h in zip(plans, prefill.states)]
    for i, (rows, logprobs) in enumerate(main):
        share = trie.ending_share(plans[i], logprobs, rows) if branch_floor > 0 else None
        skip = share < branch_floor if share is not None else torch.zeros(plans[i].n_branches, dtype=torch.bool)
        if count is not None:
            count.add(plans[i], share, skip)
        plans[i] = trie.skip_branches(plans[i], skip)
    steps = teacher.branch_step(prefill, [(p.branch_at, p.branch_tok) for p in plans])
    out = []
    for plan, (rows, logprobs), h in zip(plans, main, steps):
        branch_rows = plan.n_main + torch.arange(plan.n_branches)
        branch = _row_logprobs(teacher, h, torch.arange(plan.n_branches))[1]
        out.append(trie.derive(plan, torch.cat([logprobs, branch]), torch.cat([rows, branch_rows])))
    return torch.stack(out)


def _main_rows(plan: RowPlan) -> torch.Tensor:
    """The row's own output rows a plan may read (sorted, unique): q rows, T_j's rows at boundaries and at
    branch positions (where a skipped branch reads them)."""
    ends = plan.next_row[(plan.next_row >= 0) & (plan.next_row < plan.n_main)]
    return torch.unique(torch.cat([plan.q_row, ends, plan.branch_at]))


def _row_logprobs(teacher: Any, states: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, the teacher's next-token log-softmax at those rows of states [T, H] -> [n, V] float32 on CPU)."""
    return rows, torch.log_softmax(teacher.head(states[rows.to(states.device)]).float(), dim=-1).cpu()


def _row_lookup(plan: RowPlan, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Output row -> its index among `rows` (-1: absent); None when rows is None (logprobs hold every row)."""
    if rows is None:
        return None
    lookup = torch.full((plan.n_main + plan.n_branches,), -1, dtype=torch.long)
    lookup[rows] = torch.arange(rows.numel())
    return lookup


def floored(logprobs: torch.Tensor) -> torch.Tensor:
    """Exact log-probs [..., V_s] with every token at least MASS_FLOOR, renormalised. The exact targets give
    most student tokens zero mass inside a teacher token (-inf), which makes reverse KL infinite; the floor
    keeps it finite and moves forward KL by at most V_s * MASS_FLOOR nats."""
    return torch.log_softmax(logprobs.clamp_min(math.log(MASS_FLOOR)), dim=-1)


__all__ = ["MASS_FLOOR", "BranchCount", "PieceTrie", "RowPlan", "exact_log_probs", "floored"]
