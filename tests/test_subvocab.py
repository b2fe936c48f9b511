"""Exact teacher targets over a subset student vocabulary (teachers.subvocab, Teacher.branched).

Student vocabularies come from teachers.vocab (subset:N, bytes). Expected distributions come from brute force:
every teacher token sequence over a short horizon after the committed prefix T_<j, mapped to student tokens,
conditioned on T_j's pieces starting with the emitted ones, the next student token marginalised.
"""

from __future__ import annotations

import math

import pytest
import torch

from teachers import load_teacher
from teachers.data import TeacherView, bundled_corpus, read_text
from teachers.errors import DataError, TeacherError
from teachers.subvocab import BranchCount, PieceTrie, exact_log_probs
from teachers.vocab import VocabMap, student_tokenizer

EOT = "<|endoftext|>"  # the tiny teacher's document separator, id 0
# boundaries, pieces inside teacher tokens, shorter-token branches, the separator (a special token)
TEXTS = ["It is that the truth there, of the other" + EOT + "Then fortune",
         "Nobler thence, that the earth was that"]


def full_view(ids: torch.Tensor, pieces, start: tuple[int, int] = (1, 0)) -> TeacherView:
    """Every student position from teacher token start[0], piece start[1], to the end of ids."""
    pos, piece = [], []
    for j in range(start[0], len(ids)):
        for p in range(start[1] if j == start[0] else 0, len(pieces[int(ids[j])])):
            pos.append(j)
            piece.append(p)
    return TeacherView(ids, torch.tensor(pos), torch.tensor(piece))


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)


def derived_vocab(teacher_tokenizer, spec: str, cache_dir=None) -> VocabMap:
    return VocabMap.build(teacher_tokenizer, student_tokenizer(teacher_tokenizer, spec, cache_dir=cache_dir), spec)


@pytest.fixture(scope="module", params=["subset:269", "bytes"])  # subset:269 keeps the tiny BPE's first 12 merges
def vocab(request, tiny, tmp_path_factory):
    vocab = derived_vocab(tiny.tokenizer, request.param, tmp_path_factory.mktemp("vocab"))
    return vocab.pieces, vocab.student_size, PieceTrie.from_vocab(vocab)


def encode(teacher, text: str) -> torch.Tensor:
    return torch.tensor(teacher.tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------- brute force
class BruteForce:
    """P(next student token | T_<j, pieces(T_j) start with pi), enumerating teacher sequences (t1, t2[, t3]).

    Each sequence maps to the concatenation of its tokens' pieces, cut at the first token the student cannot
    spell; sequences whose t1 does not cover pi, or whose student tokens stop before the next one, are
    conditioned out. The loops over t2 (and t3) are vectorised: index k of the student tokens of (t1, t2, ...)
    is pieces(t1)[k] when t1 is longer than pi, else the first piece of t2.
    """

    def __init__(self, model, pieces, n_student):
        self.model, self.pieces, self.n_student = model, pieces, n_student
        self.vocab = len(pieces)
        self.first = torch.tensor([p[0] if p else -1 for p in pieces])
        self._joint: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def _next(self, prefixes: torch.Tensor) -> torch.Tensor:
        """float64 log-probs of the next teacher token after each prefix [n, T] -> [n, V]."""
        return torch.log_softmax(self.model(prefixes).logits[:, -1].double(), -1)

    def _extend(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [T] -> [V, T + 1]: ctx followed by every teacher token."""
        return torch.cat([ctx.expand(self.vocab, -1), torch.arange(self.vocab)[:, None]], 1)

    def joint(self, ctx: torch.Tensor) -> torch.Tensor:
        """log P(t1, t2 | ctx) [V, V], float64, from separate plain forwards."""
        key = tuple(ctx.tolist())
        if key not in self._joint:
            self._joint[key] = self._next(ctx[None])[0][:, None] + self._next(self._extend(ctx))
        return self._joint[key]

    def dist(self, ctx: torch.Tensor, pi: tuple[int, ...], horizon: int = 2) -> torch.Tensor:
        k, out = len(pi), torch.zeros(self.n_student, dtype=torch.float64)
        joint = self.joint(ctx)
        for t1 in [t for t in range(self.vocab) if tuple(self.pieces[t][:k]) == pi]:
            own = self.pieces[t1]
            nxt = torch.full((self.vocab,), own[k]) if len(own) > k else self.first  # index k, per t2
            mass = joint[t1]
            if horizon == 3:
                third = self._next(self._extend(torch.cat([ctx, torch.tensor([t1])])))  # [t2, t3]
                mass = (mass[:, None] + third).logsumexp(-1)  # every t3 appended; index k is unchanged
            keep = nxt >= 0
            out.index_add_(0, nxt[keep], mass[keep].exp())
        return out / out.sum()


def position_kind(pieces, token: int, p: int) -> str:
    """boundary: the emitted pieces are all of the teacher token's; branch: inside it, and they spell a
    shorter teacher token; inside: neither."""
    own = tuple(pieces[token])
    if p + 1 == len(own):
        return "boundary"
    return "branch" if own[: p + 1] in set(map(tuple, pieces)) else "inside"


def test_brute_force_equals_derived_at_every_position(tiny, vocab):
    pieces, n_student, trie = vocab
    brute = BruteForce(tiny.model, pieces, n_student)
    kinds = {"boundary": 0, "inside": 0, "branch": 0}
    for text in TEXTS:
        ids = encode(tiny, text)
        # two rows: one from the first teacher token, one whose first position is inside a teacher token
        multi = next(j for j in range(2, len(ids)) if len(pieces[int(ids[j])]) > 1)
        for view in (full_view(ids, pieces), full_view(ids, pieces, (multi, 1))):
            derived = exact_log_probs(tiny, trie, [view])[0].double()
            for t, (j, p) in enumerate(zip(view.pos.tolist(), view.piece.tolist())):
                expected = brute.dist(ids[:j], tuple(pieces[int(ids[j])][: p + 1]))
                assert torch.equal(expected == 0, derived[t] == float("-inf")), (text, j, p)
                torch.testing.assert_close(derived[t].exp(), expected, atol=1e-5, rtol=0)
                kinds[position_kind(pieces, int(ids[j]), p)] += 1
    assert min(kinds.values()) >= 5, kinds  # all three kinds of position were checked


def test_horizon_three_adds_nothing(tiny, tmp_path):
    """A third teacher token never changes the next student token: checked on the bytes student, short prefix."""
    bytes_vocab = derived_vocab(tiny.tokenizer, "bytes", tmp_path)
    pieces, n_student = bytes_vocab.pieces, bytes_vocab.student_size
    brute = BruteForce(tiny.model, pieces, n_student)
    ids = encode(tiny, "It is")  # "Ġis": three byte pieces
    for pi in [tuple(pieces[int(ids[2])][:1]), tuple(pieces[int(ids[2])][:2])]:
        torch.testing.assert_close(brute.dist(ids[:2], pi, horizon=3), brute.dist(ids[:2], pi), atol=1e-9, rtol=0)


def naive_log_probs(teacher, trie: PieceTrie, view: TeacherView, pieces) -> torch.Tensor:
    """THE MUTANT: the teacher's next-token mass summed by first student piece at teacher boundaries only;
    inside a teacher token the next piece is taken as certain."""
    lp = torch.log_softmax(teacher(view.ids[None]).logits[0].float(), -1)
    out = torch.full((len(view.pos), trie.n_student), float("-inf"))
    for t, (j, p) in enumerate(zip(view.pos.tolist(), view.piece.tolist())):
        own = pieces[int(view.ids[j])]
        if p + 1 == len(own):
            out[t] = trie.first_piece_mass(lp[j : j + 1])[0].log().float()
        else:
            out[t, own[p + 1]] = 0.0
    return out


def test_naive_first_piece_marginal_fails_brute_force(tiny, vocab):
    pieces, n_student, trie = vocab
    brute = BruteForce(tiny.model, pieces, n_student)
    ids = encode(tiny, TEXTS[0])
    view = full_view(ids, pieces)
    naive = naive_log_probs(tiny, trie, view, pieces).double().exp()
    failed = {"boundary": 0, "inside": 0, "branch": 0}
    for t, (j, p) in enumerate(zip(view.pos.tolist(), view.piece.tolist())):
        error = (naive[t] - brute.dist(ids[:j], tuple(pieces[int(ids[j])][: p + 1]))).abs().max().item()
        failed[position_kind(pieces, int(ids[j]), p)] += error > 1e-2  # far outside the 1e-5 the derived targets meet
    # it misses the longer tokens at boundaries, and everything but the one next piece inside tokens
    assert failed["boundary"] >= 1 and failed["branch"] >= 3, failed


def test_distributions_sum_to_one(tiny, vocab):
    pieces, _, trie = vocab
    views = [full_view(encode(tiny, text)[:16], pieces) for text in TEXTS]
    length = min(len(v.pos) for v in views)
    views = [TeacherView(v.ids, v.pos[:length], v.piece[:length]) for v in views]
    lp = exact_log_probs(tiny, trie, views)
    assert lp.shape == (2, length, trie.n_student)
    torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(2, length, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_rows_of_different_teacher_lengths_batch_like_single_rows(tiny, vocab):
    pieces, _, trie = vocab
    long_ids, short_ids = encode(tiny, TEXTS[0]), encode(tiny, TEXTS[1])
    short = full_view(short_ids, pieces)
    long = full_view(long_ids, pieces, (2, 0))
    long = TeacherView(long.ids, long.pos[: len(short.pos)], long.piece[: len(short.pos)])
    batch = exact_log_probs(tiny, trie, [long, short])
    for i, view in enumerate([long, short]):
        torch.testing.assert_close(batch[i], exact_log_probs(tiny, trie, [view])[0], atol=1e-5, rtol=1e-5)


def test_separator_position_is_the_next_tokens_first_piece(tiny, vocab):
    """At the document separator (a special token, its own single piece) no teacher token continues it, so the
    next student token is the teacher's next-token distribution summed by first piece."""
    pieces, _, trie = vocab
    ids = encode(tiny, TEXTS[0])
    sep = int(torch.nonzero(ids == 0)[0])
    view = full_view(ids, pieces, (sep, 0))
    derived = exact_log_probs(tiny, trie, [view])[0, 0].double().exp()
    q_next = torch.log_softmax(tiny.model(ids[None]).logits[0, sep].double(), -1)
    expected = torch.zeros(trie.n_student, dtype=torch.float64)
    expected.index_add_(0, torch.tensor([p[0] for p in pieces]), q_next.exp())
    torch.testing.assert_close(derived, expected, atol=1e-6, rtol=0)


def test_a_row_prefix_token_at_ids_0_predicts_the_next_tokens_first_piece(tiny, vocab):
    """A BOS-led row (TeacherView with a row prefix): the prefix token stands at ids[0] with no context before
    it; nothing continues a special token, so its target is the teacher's distribution after it, summed by
    first piece. The body after it is derived as usual (checked against a row without the prefix)."""
    pieces, _, trie = vocab
    body = encode(tiny, TEXTS[1])
    ids = torch.cat([torch.tensor([0]), body])  # EOT as BOS, then the first body token as context
    plain = full_view(body, pieces)
    view = TeacherView(ids, torch.cat([torch.tensor([0]), plain.pos + 1]), torch.cat([torch.tensor([0]), plain.piece]))
    derived = exact_log_probs(tiny, trie, [view])[0].double()
    q_next = torch.log_softmax(tiny.model(ids[None, :1]).logits[0, 0].double(), -1).exp()
    expected = torch.zeros(trie.n_student, dtype=torch.float64)
    expected.index_add_(0, torch.tensor([p[0] for p in pieces]), q_next)
    torch.testing.assert_close(derived[0].exp(), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        brute = BruteForce(tiny.model, pieces, trie.n_student)
        j, p = int(view.pos[1]), int(view.piece[1])
        torch.testing.assert_close(derived[1].exp(), brute.dist(ids[:j], tuple(pieces[int(ids[j])][: p + 1])),
                                   atol=1e-5, rtol=0)


def test_student_tokens_no_teacher_token_spells_get_zero_mass(tiny, vocab):
    """A student byte the teacher lacks (an extra student id) gets log-prob -inf; a teacher token the student
    cannot spell (empty pieces) drops out of both the numerators and the normaliser."""
    pieces, n_student, _ = vocab
    ids = encode(tiny, TEXTS[1])
    unused = next(t for t in range(300, 320) if t not in ids.tolist())
    cut = list(pieces)
    cut[unused] = ()
    trie = PieceTrie(cut, n_student + 1)
    view = full_view(ids, cut)
    derived = exact_log_probs(tiny, trie, [view])[0].double()
    assert torch.isneginf(derived[:, n_student]).all()
    brute = BruteForce(tiny.model, cut, n_student + 1)
    for t, (j, p) in enumerate(zip(view.pos.tolist(), view.piece.tolist())):
        expected = brute.dist(ids[:j], tuple(cut[int(ids[j])][: p + 1]))
        torch.testing.assert_close(derived[t].exp(), expected, atol=1e-5, rtol=0)


def test_malformed_views_raise_one_clear_error(tiny, vocab):
    pieces, _, trie = vocab
    ids = encode(tiny, TEXTS[1])
    multi = next(j for j in range(len(ids)) if len(pieces[int(ids[j])]) > 1)
    with pytest.raises(DataError, match="context"):  # inside a teacher token at ids[0]: q_j is needed
        trie.plan(TeacherView(ids[multi:], torch.tensor([0]), torch.tensor([0])))
    with pytest.raises(DataError, match="index"):
        trie.plan(TeacherView(ids, torch.tensor([len(ids)]), torch.tensor([0])))
    with pytest.raises(DataError, match="pieces"):
        trie.plan(TeacherView(ids, torch.tensor([1]), torch.tensor([len(pieces[int(ids[1])])])))
    with pytest.raises(DataError, match="same number"):
        exact_log_probs(tiny, trie, [full_view(ids, pieces), full_view(ids, pieces, (2, 0))])


# ------------------------------------------------------------------------------------------ branch tokens
def test_branch_tokens_equal_separate_forwards(tiny):
    rows = [torch.tensor([5, 17, 40, 3, 99, 250, 7]), torch.tensor([11, 12, 13])]
    branches = [(torch.tensor([1, 4, 4, 7]), torch.tensor([60, 61, 2, 8])), (torch.tensor([2]), torch.tensor([9]))]
    assert tiny.tree_mask_ok()
    states = tiny.branched(rows, branches)
    for row, (at, tok), h in zip(rows, branches, states):
        with torch.no_grad():
            own = tiny.model(row[None]).logits[0]
            torch.testing.assert_close(tiny.head(h[: len(row)]), own, atol=1e-5, rtol=0)
            for k, (a, b) in enumerate(zip(at.tolist(), tok.tolist())):
                alone = tiny.model(torch.cat([row[:a], torch.tensor([b])])[None]).logits[0, -1]
                torch.testing.assert_close(tiny.head(h[len(row) + k]), alone, atol=1e-5, rtol=0)


def test_a_prefill_takes_one_branch_step(tiny):
    """The step appends the branch tokens to the prefill's KV cache: a second step would see them."""
    prefill = tiny.prefill([torch.tensor([5, 17, 40, 3])])
    assert prefill.cache is not None and [h.shape[0] for h in prefill.states] == [4]
    tiny.branch_step(prefill, [(torch.tensor([2]), torch.tensor([60]))])
    with pytest.raises(TeacherError, match="prefill the rows again"):
        tiny.branch_step(prefill, [(torch.tensor([3]), torch.tensor([61]))])


@pytest.mark.slow
def test_branch_step_equals_separate_forwards_on_smollm2(smollm2):
    """The bundled teacher (Llama architecture, fp32): each branch token's logits after the prefill and one
    cached step equal a separate forward of its prefix + token within 1e-5 of the logits' scale (measured
    3.3e-6: fp32 rounding of differently shaped matmuls; the one-forward 4D-mask path it replaced differed as
    much), and its next-token distribution within 1e-5 in total variation."""
    ids = encode(smollm2, "It is a truth universally acknowledged, that a single man")
    rows = [ids, ids[:7]]
    branches = [(torch.tensor([1, 5, 5, len(ids)]), torch.tensor([256, 1030, 30, 9])),
                (torch.tensor([3, 7]), torch.tensor([88, 17]))]
    assert smollm2.tree_mask_ok()
    prefill = smollm2.prefill(rows)
    assert prefill.cache is not None
    for row, (at, tok), h in zip(rows, branches, smollm2.branch_step(prefill, branches)):
        for k, (a, b) in enumerate(zip(at.tolist(), tok.tolist())):
            with torch.no_grad():
                alone = smollm2.model(torch.cat([row[:a], torch.tensor([b])])[None]).logits[0, -1].double()
            ours = smollm2.head(h[k]).double()
            assert float((ours - alone).abs().max() / alone.abs().max()) < 1e-5
            assert float((ours.softmax(-1) - alone.softmax(-1)).abs().sum() / 2) < 1e-5


def test_a_model_ignoring_the_4d_mask_gets_separate_forwards(tiny_teacher_dir, monkeypatch):
    teacher, reference = load_teacher(tiny_teacher_dir), load_teacher(tiny_teacher_dir)
    base = teacher.model.base_model
    forward = base.forward

    def no_tree(*args, attention_mask=None, position_ids=None, **kwargs):  # drops any 4D mask
        mask = attention_mask if attention_mask is None or attention_mask.ndim == 2 else None
        return forward(*args, attention_mask=mask, **kwargs)

    monkeypatch.setattr(base, "forward", no_tree)
    assert not teacher.tree_mask_ok() and reference.tree_mask_ok()
    rows, branches = [torch.tensor([5, 17, 40, 3])], [(torch.tensor([2, 3]), torch.tensor([60, 61]))]
    torch.testing.assert_close(teacher.branched(rows, branches)[0], reference.branched(rows, branches)[0],
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- branch floor
# A hand-made teacher vocabulary over student pieces a, b, c, d (ids 0-3): "a" and "ab" are teacher tokens, so
# the first two pieces of "abc" and "abd" are branch positions.
HAND_PIECES = [(3,), (0,), (0, 1), (0, 1, 2), (0, 1, 3), (1,), (2,)]  # d, a, ab, abc, abd, b, c
HAND_Q = torch.tensor([  # q rows 0-3 over the 7 teacher tokens: q_1, q_2, q_3, and the distribution after T_3
    [0.1, 0.01, 0.09, 0.5, 0.2, 0.05, 0.05],
    [0.2, 0.3, 0.001, 0.2, 0.1, 0.1, 0.099],
    [0.05, 1e-4, 0.4, 0.1, 0.4, 0.0498, 1e-4],
    [0.3, 0.1, 0.1, 0.1, 0.1, 0.2, 0.1],
], dtype=torch.float64)


def hand_case() -> tuple[PieceTrie, TeacherView, torch.Tensor]:
    ids = torch.tensor([0, 3, 3, 4])  # d | abc | abc | abd: every piece of the last three is a position
    view = TeacherView(ids, torch.tensor([1, 1, 1, 2, 2, 2, 3, 3, 3]), torch.tensor([0, 1, 2] * 3))
    return PieceTrie(HAND_PIECES, 4), view, HAND_Q.log().float()


def test_skipped_branches_counted_by_hand():
    """Relative ending masses, by hand (q of the shorter token / q of every token starting with its pieces):
    T_1 = abc under q_1: a .01/.80, ab .09/.79; T_2 = abc under q_2: a .3/.601, ab .001/.301; T_3 = abd under q_3:
    a 1e-4/.9001, ab .4/.9. Below 0.01: 2 of them; below 0.1: 3; below 0.5: all 6."""
    trie, view, logprobs = hand_case()
    plan = trie.plan(view)
    assert plan.branch_at.tolist() == [1, 1, 2, 2, 3, 3] and plan.branch_tok.tolist() == [1, 2] * 3
    hand = torch.tensor([0.01 / 0.8, 0.09 / 0.79, 0.3 / 0.601, 0.001 / 0.301, 1e-4 / 0.9001, 0.4 / 0.9],
                        dtype=torch.float64)
    share = trie.ending_share(plan, logprobs)
    torch.testing.assert_close(share, hand, atol=1e-6, rtol=1e-5)
    for floor, skipped in ((0.0, 0), (0.01, 2), (0.1, 3), (0.5, 6)):
        skip = share < floor
        count = BranchCount()
        count.add(plan, share, skip)
        assert (count.positions, count.needed, count.evaluated) == (9, 6, 6 - skipped), floor
        assert count.skipped_share == pytest.approx(float(hand[hand < floor].sum()), rel=1e-5)
        kept = trie.skip_branches(plan, skip)
        assert kept.n_branches == 6 - skipped and kept.branch_at.tolist() == plan.branch_at[~skip].tolist()
        # a skipped branch reads T_j's own row (the distribution after T_j); kept ones the branch rows in order
        inner = torch.tensor([0, 1, 3, 4, 6, 7])
        assert kept.next_row[inner][skip].tolist() == plan.branch_at[skip].tolist()
        assert kept.next_row[inner][~skip].tolist() == list(range(4, 4 + 6 - skipped))


def test_a_skipped_branch_splits_its_ending_mass_by_the_distribution_after_the_whole_token():
    """At T_1 = abc after its first piece a (skipped at floor 0.1): continuing mass b: .09 + .5 + .2 (ab, abc,
    abd); the ending mass q_1(a) = .01 is split by q_2 (after abc, T_1's own row) summed by first piece: a-tokens
    .601, b .1, c .099, d .2."""
    trie, view, logprobs = hand_case()
    plan = trie.plan(view)
    skipped = trie.skip_branches(plan, trie.ending_share(plan, logprobs) < 0.1)
    derived = trie.derive(skipped, logprobs[: plan.n_main], torch.arange(plan.n_main))[0].double().exp()
    hand = torch.tensor([0.0, 0.79, 0.0, 0.0], dtype=torch.float64) + 0.01 * torch.tensor([0.601, 0.1, 0.099, 0.2],
                                                                                            dtype=torch.float64)
    torch.testing.assert_close(derived, hand / hand.sum(), atol=1e-6, rtol=0)


def independent_shares(model, pieces, view: TeacherView) -> torch.Tensor:
    """Per position: q_j(t_pi) / (mass of the teacher tokens whose pieces start with pi) where the emitted pieces
    pi spell a shorter teacher token t_pi inside T_j, else NaN; from a plain float64 forward and the pieces list."""
    q = torch.softmax(model(view.ids[None]).logits[0].double(), -1)
    spelled = {tuple(p): t for t, p in enumerate(pieces) if p}
    out = torch.full((len(view.pos),), float("nan"), dtype=torch.float64)
    for i, (j, p) in enumerate(zip(view.pos.tolist(), view.piece.tolist())):
        own = tuple(pieces[int(view.ids[j])])
        shorter = spelled.get(own[: p + 1])
        if p + 1 < len(own) and shorter is not None:
            under = [t for t, x in enumerate(pieces) if tuple(x[: p + 1]) == own[: p + 1]]
            out[i] = q[j - 1, shorter] / q[j - 1, under].sum()
    return out


@pytest.mark.parametrize("floor", [0.1, 0.3])
def test_branch_floor_moves_each_target_by_at_most_its_ending_share(tiny, vocab, floor):
    """Skipping a branch of relative ending mass r moves that position's distribution by at most r in total
    variation (module docstring), so by less than the floor; positions without a skipped branch are unchanged.
    The branches skipped are exactly those an independent count finds below the floor."""
    pieces, _, trie = vocab
    total = BranchCount()
    for text in TEXTS:
        view = full_view(encode(tiny, text), pieces)
        exact = exact_log_probs(tiny, trie, [view])[0].double().exp()
        count = BranchCount()
        approx = exact_log_probs(tiny, trie, [view], branch_floor=floor, count=count)[0].double().exp()
        tv = (approx - exact).abs().sum(-1) / 2
        with torch.no_grad():
            share = independent_shares(tiny.model, pieces, view)
        skipped = share < floor  # NaN (no branch) compares False
        assert (count.needed, count.needed - count.evaluated) == (int((~share.isnan()).sum()), int(skipped.sum()))
        assert count.max_skipped == pytest.approx(float(share[skipped].max()) if skipped.any() else 0.0, rel=1e-4)
        assert float(tv.max()) <= floor
        assert bool((tv[skipped] <= share[skipped] + 1e-6).all()) and float(tv[~skipped].max()) < 1e-6
        total.needed += count.needed
        total.evaluated += count.evaluated
    assert 0 < total.evaluated < total.needed  # the floor skipped some branches and kept others


def test_branch_floor_zero_evaluates_every_branch(tiny, vocab):
    pieces, _, trie = vocab
    view = full_view(encode(tiny, TEXTS[0]), pieces)
    count = BranchCount()
    exact = exact_log_probs(tiny, trie, [view], branch_floor=0.0, count=count)
    assert count.evaluated == count.needed > 0 and count.skipped_share == 0.0
    assert torch.equal(exact, exact_log_probs(tiny, trie, [view]))
    with pytest.raises(ValueError, match="branch_floor"):
        exact_log_probs(tiny, trie, [view], branch_floor=1.0)


# ------------------------------------------------------------------------------------------- invariant
WINDOW, CONTEXT = 512, 64  # teacher tokens per row, and the context each later row repeats


def windows(n: int):
    """(s, a, b): row X[s:b] scores teacher tokens [a, b), each token once (a >= 2: the student's first
    scored position, the last piece of T_{a-1}, needs a teacher token of context before it)."""
    s = 0
    while True:
        b = min(s + WINDOW, n)
        yield s, s + (2 if s == 0 else CONTEXT), b
        if b == n:
            return
        s = b - CONTEXT


def scored_view(row: torch.Tensor, pieces, a: int, b: int) -> tuple[TeacherView, torch.Tensor]:
    """The view predicting every piece of row[a:b] (row-relative), and those target student ids [L]."""
    pos, piece, target = [], [], []
    prev = (a - 1, len(pieces[int(row[a - 1])]) - 1)
    for j in range(a, b):
        for p, u in enumerate(pieces[int(row[j])]):
            pos.append(prev[0])
            piece.append(prev[1])
            target.append(u)
            prev = (j, p)
    return TeacherView(row, torch.tensor(pos), torch.tensor(piece)), torch.tensor(target)


class Accounting:
    """The terms by which a text's derived student log-likelihood differs from the teacher's own, computed
    with plain prefix sums (no trie): at each student position, with s the actual next student token,
      boundary (T_j ends):  kept = q_j(T_j) Q_{j+1}(s),  alt = M_j(pieces(T_j) + s)   (a longer teacher token);
      inside T_j at pi:     kept = M_j(pi + s),          alt = q_j(t_pi) Q_branch(s)  (t_pi, then a token
                                                          starting with s)
    where M_j(x) = sum of q_j over teacher tokens whose pieces start with x and Q the next-token distribution
    summed by first piece. Telescoping: log P_student(text) = log P_teacher(own tokens) + sum log(1 + alt/kept)
    + per row log(q(T_{a-1}) / M(pieces(T_{a-1}))) + log(M(pieces(T_{b-1})) / q(T_{b-1})). alt is the mass of
    teacher paths other than the teacher's own tokenization that spell the same student tokens."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.spelled = {tuple(p): t for t, p in enumerate(pieces) if p}
        under: dict[tuple[int, ...], list[int]] = {}
        for t, p in enumerate(pieces):
            for d in range(1, len(p) + 1):
                under.setdefault(tuple(p[:d]), []).append(t)
        self.under = {k: torch.tensor(v) for k, v in under.items()}

    def mass(self, q: torch.Tensor, prefix: tuple[int, ...]) -> float:
        ids = self.under.get(prefix)
        return 0.0 if ids is None else float(q[ids].sum())

    def terms(self, row, view, target, q, branch_q) -> tuple[float, float, float]:
        """(sum of log(1 + alt/kept), edge terms, sum of alt / (kept + alt)) of one row; q(j): q_j [V] float64
        probabilities; branch_q(j, t): the distribution after t at T_j's position."""
        alt_sum = share = 0.0
        for j, p, s in zip(view.pos.tolist(), view.piece.tolist(), target.tolist()):
            own = self.pieces[int(row[j])]
            if p + 1 == len(own):
                kept, alt = float(q(j)[row[j]]) * self.mass(q(j + 1), (s,)), self.mass(q(j), own + (s,))
            else:
                shorter = self.spelled.get(own[: p + 1])
                kept = self.mass(q(j), own[: p + 2])
                alt = 0.0 if shorter is None else float(q(j)[shorter]) * self.mass(branch_q(j, shorter), (s,))
            alt_sum += math.log1p(alt / kept)
            share += alt / (kept + alt)
        first, last = int(view.pos[0]), len(row) - 1  # T_{a-1} and T_{b-1}
        edge = (math.log(float(q(first)[row[first]]) / self.mass(q(first), self.pieces[int(row[first])]))
                + math.log(self.mass(q(last), self.pieces[int(row[last])]) / float(q(last)[row[last]])))
        return alt_sum, edge, share


@pytest.fixture(scope="module")
def smollm2():
    return load_teacher("smollm2-135m", dtype=torch.float32)


@pytest.mark.slow
def test_invariant_bits_per_byte_on_persuasion(smollm2):
    """Teacher bits/byte through the derived student distributions vs its own, first 20 kB of Persuasion,
    rows of 512 teacher tokens repeating 64 of context, one forward per row for both vocabularies.

    They are NOT equal within 1e-3: the derived targets count the mass of teacher paths other than the
    teacher's own tokenization that spell the same student tokens (e.g. "ĠSomerset" + "shire" where the
    tokenizer writes "ĠSomers" + "etshire"), so the student-side likelihood is higher. Measured (pytest -s):
    relative gap -6.28e-3 at subset:1024, -1.73e-3 at subset:8192; those paths hold on average 0.64% / 0.30%
    of the actual next student token's mass. What is asserted is the exact accounting, within 1e-5 relative
    (measured 2.3e-6): derived = own + sum log(1 + alt/kept) + row edges (`Accounting`), every term computed
    from plain prefix sums of the teacher's own distributions.
    """
    raw = read_text(bundled_corpus()["persuasion"]).encode()[:20_000].decode(errors="ignore")
    text_ids = encode(smollm2, raw)
    vocabs = {}
    for n in (1024, 8192):
        vocab = derived_vocab(smollm2.tokenizer, f"subset:{n}")
        vocabs[n] = (vocab.pieces, PieceTrie.from_vocab(vocab), Accounting(vocab.pieces))
    # derived, alt, edge, alternative share, positions, branch tokens
    own, sums = 0.0, {n: torch.zeros(6, dtype=torch.float64) for n in vocabs}
    for s, a, b in windows(len(text_ids)):
        row_own, row_sums = score_row(smollm2, text_ids[s:b], a - s, vocabs)
        own += row_own
        for n in vocabs:
            sums[n] += row_sums[n]
    for n, (derived, alt, edge, share, positions, branches) in sums.items():
        print(f"N={n}: own {own:.3f} nats, derived {derived:.3f}, relative gap {(derived - own) / own:.3e}, "
              f"alt {alt:.3f}, edges {edge:.3f}, mean alternative share {share / positions:.4f}, "
              f"positions with a branch token {branches / positions:.3f}")
        assert float(derived) == pytest.approx(own - float(alt) - float(edge), rel=1e-5), (n, own)


def score_row(teacher, row: torch.Tensor, a: int, vocabs) -> tuple[float, dict[int, torch.Tensor]]:
    """One row, scoring teacher tokens row[a:]: (the teacher's own nats, {N: [derived nats, alt, edge]}),
    from one forward holding the branch tokens of every vocabulary."""
    scored = {n: scored_view(row, pieces, a, len(row)) for n, (pieces, _, _) in vocabs.items()}
    plans = {n: vocabs[n][1].plan(view) for n, (view, _) in scored.items()}
    union = sorted({(j, t) for plan in plans.values() for j, t in zip(plan.branch_at.tolist(),
                                                                      plan.branch_tok.tolist())})
    index = {key: i for i, key in enumerate(union)}
    at, tok = (torch.tensor([key[i] for key in union], dtype=torch.long) for i in (0, 1))
    h = teacher.branched([row], [(at, tok)])[0]
    main = torch.log_softmax(teacher.head(h[: len(row)]).float(), -1)
    own = -float(main[a - 1 : -1].gather(1, row[a:, None]).sum())
    probs: dict[int, torch.Tensor] = {}

    def q(j):  # q_j: the teacher's distribution of T_j, from row j - 1
        if j not in probs:
            probs[j] = main[j - 1].double().exp()
        return probs[j]

    def branch_logprobs(keys) -> torch.Tensor:
        rows = torch.tensor([len(row) + index[k] for k in keys], dtype=torch.long)
        return torch.log_softmax(teacher.head(h[rows]).float(), -1)

    out = {}
    for n, (view, target) in scored.items():
        plan, (_, trie, accounting) = plans[n], vocabs[n]
        keys = list(zip(plan.branch_at.tolist(), plan.branch_tok.tolist()))
        derived = trie.derive(plan, torch.cat([main, branch_logprobs(keys)]))
        alt, edge, share = accounting.terms(row, view, target, q,
                                            lambda j, t: branch_logprobs([(j, t)])[0].double().exp())
        out[n] = torch.tensor([-float(derived.double().gather(1, target[:, None]).sum()), alt, edge, share,
                               len(target), plan.n_branches])
    return own, out
