"""SpAD terms against hand computations; the distillation objective's sums are additive over rows."""

from types import SimpleNamespace

import pytest
import torch

from pipeline.losses import (
    DistillObjective,
    SpADLoss,
    attention_rate_code,
    feature_rate_code,
    head_mix_matrix,
    lif_kwargs,
    lif_rate,
    rate_code,
    row_distribution,
)
from students import SpikeGPTConfig

# The pipeline's real neuron: the student's own LIF (SpikeGPT's tau 2, threshold 1, hard reset, input decay),
# run by students.ops.lif_scan, exactly as build_spad configures SpADLoss.
STUDENT_LIF = lif_kwargs(SpikeGPTConfig())


def hand_lif_rate(current: float, steps: int) -> float:
    """SpikeGPT's LIF by hand: H = V + (X - V) / 2, spike when H >= 1, then V = 0 (else V = H)."""
    v, spikes = 0.0, 0
    for _ in range(steps):
        h = v + (current - v) / 2
        v, spikes = (0.0, spikes + 1) if h >= 1.0 else (h, spikes)
    return spikes / steps


def hand_feature_rate_code(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Each row divided by its rms; an entry equal to the rms reaches the threshold in one step (current 2)."""
    rows = []
    for row in x.reshape(-1, x.shape[-1]).tolist():
        rms = (sum(v * v for v in row) / len(row)) ** 0.5
        rows.append([hand_lif_rate(2.0 * (1 + 1e-5) * v / rms, steps) for v in row])
    return torch.tensor(rows).reshape(x.shape)


def test_head_mix_matrix_mean_pools_groups_or_copies():
    torch.testing.assert_close(head_mix_matrix(2, 4), torch.tensor([[.5, .5, 0, 0], [0, 0, .5, .5]]))
    torch.testing.assert_close(head_mix_matrix(4, 2), torch.tensor([[1., 0], [1, 0], [0, 1], [0, 1]]))
    mix = head_mix_matrix(3, 9)
    assert torch.allclose(mix.sum(1), torch.ones(3)) and (mix > 0).sum().item() == 9


def test_lif_rate_of_a_constant_current_by_hand():
    x = torch.tensor([0.6, 1.5, 3.0])
    # H_t = V/2 + x/2; 0.6 never reaches 1; 1.5: 0.75, 1.125 (fire), 0.75, 1.125 (fire); 3.0 fires every step
    torch.testing.assert_close(lif_rate(x, 4, STUDENT_LIF), torch.tensor([0.0, 0.5, 1.0]))
    assert [hand_lif_rate(v, 4) for v in x.tolist()] == [0.0, 0.5, 1.0]


def test_rate_code_reaches_every_rate_a_t_step_neuron_can_take():
    # f = x / scale; current 2 f: f >= 1 fires every step; 2/3 <= f < 1 fires at steps 2 and 4; f = 0.6
    # reaches 0.6, 0.9, 1.05 (fire), 0.6: once in 4 steps; f < 1/2 never; negative never.
    x = torch.tensor([[2.0, 1.0, 0.7, 0.6, 0.4, -1.0]])
    want = torch.tensor([[1.0, 1.0, 0.5, 0.25, 0.0, 0.0]])
    torch.testing.assert_close(rate_code(x, torch.tensor([[1.0]]), 4, STUDENT_LIF), want)
    assert want.tolist()[0] == [hand_lif_rate(2.0 * v, 4) for v in x.tolist()[0]]
    torch.testing.assert_close(rate_code(x, torch.tensor([[0.0]]), 4, STUDENT_LIF), torch.zeros_like(x))
    at_one_step = rate_code(x, torch.tensor([[1.0]]), 1, STUDENT_LIF)  # T = 1: fires iff f >= 1
    torch.testing.assert_close(at_one_step, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]))


def test_attention_rate_code_fires_on_keys_above_their_uniform_share():
    maps = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.5, 0.3, 0.2]])  # causal rows, each sums to 1
    # row 2: uniform share 1/3 -> f = 1.5, 0.9, 0.6 -> rates 1, 1/2, 1/4 at T = 4; row 1: f = 0.6, 1.4
    want = torch.tensor([[1.0, 0.0, 0.0], [0.25, 1.0, 0.0], [1.0, 0.5, 0.25]])
    torch.testing.assert_close(attention_rate_code(maps, 4, STUDENT_LIF), want)


def test_row_distribution_floors_the_sum_at_one_step():
    maps = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(row_distribution(maps, 2), torch.tensor([[0.5, 0.5, 0], [1.0, 0, 0], [0, 0, 0]]))


def _spad(weights, layer_map=(0,), hs=1, ht=2, lif=STUDENT_LIF, time_steps=1, **kw):
    return SpADLoss(student_dim=2, teacher_dim=2, layer_map=list(layer_map), student_heads=hs, teacher_heads=ht,
                    weights=weights, lif=lif, time_steps=time_steps, **kw)


def _terms(spad, student_out, teacher_out, n_pos):
    """The SpAD terms against an online teacher output (n_pos + 1 keys, as the objective passes them)."""
    return spad(student_out, spad.teacher_targets(teacher_out, n_pos, n_pos + 1), n_pos)


def test_ea_is_projected_mse_summed_over_the_first_n_positions():
    spad = _spad({"ea": 1.0})
    with torch.no_grad():
        spad.ea_proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        spad.ea_proj.bias.zero_()
    e_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])        # [B=1, L=3, C=2]
    e_t = torch.tensor([[[1.0, 1.0], [0.0, 3.0], [0.0, 0.0]]])
    out = _terms(spad, SimpleNamespace(hidden_states=(e_s,)), SimpleNamespace(embeddings=e_t), n_pos=2)
    # token 0: P e = (2, 0) vs (1, 1) -> (1 + 1)/2 = 1;  token 1: (0, 1) vs (0, 3) -> (0 + 4)/2 = 2
    assert set(out) == {"ea"} and out["ea"].item() == pytest.approx(3.0)


@pytest.mark.parametrize("binary", [False, True])
def test_saa_mixes_direct_and_rate_terms_by_hand(binary):
    spad = _spad({"saa": 1.0})
    # [B=1, H_s=1, L=2, L=2]: a row distribution (srwkv, sfsa_linear) or a binary sfsa map with the same rows
    # once each row is divided by its sum
    a_s = torch.tensor([[[[1.0, 0.0], [1.0, 1.0] if binary else [0.5, 0.5]]]])
    a_t = torch.tensor([[[[1.0, 0.0], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]]])  # H_t = 2
    out = _terms(spad, SimpleNamespace(attentions=(a_s,)), SimpleNamespace(attentions=(a_t,)), n_pos=2)
    # mapped teacher = mean of its 2 heads: [[1, 0], [0.4, 0.6]]; uniform shares 1 and 1/2, so f = [1, 0] and
    # [0.8, 1.2]: at T = 1 only f >= 1 fires -> rate code [[1, 0], [0, 1]] (rows already distributions).
    # Student rows [1, 0] and [0.5, 0.5]; per query the squared distance summed over keys, summed over queries
    direct = 0 + (0.1**2 + 0.1**2)
    rate = 0 + (0.5**2 + 0.5**2)
    assert out["saa"].item() == pytest.approx(0.5 * direct + 0.5 * rate)
    only_rate = _terms(_spad({"saa": 1.0}, rate_mix=1.0), SimpleNamespace(attentions=(a_s,)),
                       SimpleNamespace(attentions=(a_t,)), n_pos=2)
    assert only_rate["saa"].item() == pytest.approx(rate)


@pytest.mark.parametrize("length", [4, 64])
def test_saa_per_query_is_a_distance_between_rows_whatever_the_context_length(length):
    """Every query of the student on key 0, every teacher query i >= 1 on key i: each of those L - 1 queries is
    2 apart (1^2 + 1^2), at any L. (A mean over the L key columns would give 2 / L per query.)"""
    spad = _spad({"saa": 1.0}, hs=2, ht=2, rate_mix=0.0)
    a_s = torch.zeros(1, 2, length, length)
    a_s[..., 0] = 1.0
    a_t = torch.eye(length).expand(1, 2, length, length)
    out = _terms(spad, SimpleNamespace(attentions=(a_s,)), SimpleNamespace(attentions=(a_t,)), n_pos=length)
    assert out["saa"].item() == pytest.approx(2.0 * (length - 1))


def test_saa_learned_head_mix_is_a_parameter_initialised_to_the_mean():
    spad = _spad({"saa": 1.0}, head_mapping="learned", layer_map=(0, 1))
    assert len(spad.head_mix) == 2
    torch.testing.assert_close(spad.head_mix[1].data, head_mix_matrix(1, 2))


@pytest.mark.parametrize("steps", [1, 4])
def test_sfa_uses_the_layer_map_and_the_rate_term(steps):
    spad = _spad({"sfa": 1.0}, layer_map=(1, 0), time_steps=steps)
    gen = torch.Generator().manual_seed(0)
    h_s = [torch.randn(1, 3, 2, generator=gen) for _ in range(3)]      # embedding + 2 student layers
    h_t = [torch.randn(1, 3, 2, generator=gen) for _ in range(2)]
    out = _terms(spad, SimpleNamespace(hidden_states=tuple(h_s)), SimpleNamespace(hidden_states=tuple(h_t)), 3)
    want = 0.0
    for i, t in enumerate((1, 0)):  # student layer i (hidden_states[i + 1]) -> teacher layer t
        z = spad.sfa_proj[i](h_s[i + 1]).detach()
        rates = hand_feature_rate_code(z, steps) - hand_feature_rate_code(h_t[t], steps)
        want += 0.5 * ((z - h_t[t]) ** 2).mean(-1).sum() + 0.5 * (rates**2).mean(-1).sum()
    assert out["sfa"].item() == pytest.approx(want.item() / 2, rel=1e-6)


def test_sfa_target_norm_compares_against_the_normalised_teacher_state():
    spad = _spad({"sfa": 1.0}, sfa_target_norm=True)
    h_s, h_t = [torch.randn(1, 2, 2) for _ in range(2)], [100.0 * torch.randn(1, 2, 2)]
    out = _terms(spad, SimpleNamespace(hidden_states=tuple(h_s)), SimpleNamespace(hidden_states=tuple(h_t)), 2)
    z, t = spad.sfa_proj[0](h_s[1]).detach(), torch.nn.functional.layer_norm(h_t[0], (2,))
    rates = hand_feature_rate_code(z, 1) - hand_feature_rate_code(t, 1)
    want = 0.5 * ((z - t) ** 2).mean(-1).sum() + 0.5 * (rates**2).mean(-1).sum()
    assert out["sfa"].item() == pytest.approx(want.item(), rel=1e-6)


def test_only_weighted_terms_get_parameters():
    spad = _spad({"ea": 0.2, "saa": 0.0, "sfa": 0.0})
    assert {n.split(".")[0] for n, _ in spad.named_parameters()} == {"ea_proj"}
    with pytest.raises(ValueError, match="align.head_mapping"):
        _spad({"saa": 1.0}, head_mapping="max")


@pytest.fixture(scope="module")
def objective(tiny_teacher_dir):
    from students import SpikeGPTForCausalLM
    from teachers import layer_map, load_teacher

    teacher = load_teacher(str(tiny_teacher_dir), attn_maps=True)
    torch.manual_seed(0)
    cfg = SpikeGPTConfig.from_preset("tiny", n_layer=2, d_model=16, n_head=2, vocab_size=teacher.vocab_size,
                                     token_mixer="sfsa")
    student = SpikeGPTForCausalLM(cfg)
    weights = {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}
    spad = SpADLoss(student_dim=16, teacher_dim=teacher.hidden_size, layer_map=layer_map(2, teacher.num_layers),
                    student_heads=2, teacher_heads=teacher.num_heads, weights=weights, lif=lif_kwargs(cfg))
    return DistillObjective(student, weights, teacher=teacher, spad=spad, kd={"temperature": 2.0, "chunk_size": 5})


def test_objective_sums_are_additive_over_rows(objective):
    """Per-token normalisation needs sums: 1 batch of 4 rows == 2 batches of 2 rows, term by term."""
    ids = torch.randint(1, 320, (4, 9), generator=torch.Generator().manual_seed(3))
    whole = objective(ids)
    halves = [objective(ids[:2]), objective(ids[2:])]
    assert set(whole) == {"loss", "ea", "saa", "sfa", "kd", "ce"}
    for k in whole:
        torch.testing.assert_close(whole[k], halves[0][k] + halves[1][k], rtol=1e-5, atol=1e-5)
    w = objective.weights
    manual = w["ea"] * whole["ea"] + w["saa"] * whole["saa"] + w["sfa"] * whole["sfa"] + w["sta"] * whole["kd"] + \
        w["hta"] * whole["ce"]
    torch.testing.assert_close(whole["loss"].detach(), manual)


def test_objective_gradients_reach_student_and_projections(objective):
    objective.zero_grad(set_to_none=True)
    objective(torch.randint(1, 320, (2, 9), generator=torch.Generator().manual_seed(4)))["loss"].backward()
    for name in ("spad.ea_proj.weight", "spad.sfa_proj.0.0.weight", "student.emb.weight", "student.lm_head.weight"):
        grad = dict(objective.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name


# ---------------------------------------------------------------------- the rate terms on the bundled teacher
@pytest.fixture(scope="module")
def smollm2_outputs():
    """The bundled SmolLM2-135M on 65 tokens of held-out Persuasion: (token ids [1, 65], teacher outputs)."""
    from teachers import load_teacher
    from teachers.data import bundled_corpus, read_text

    teacher = load_teacher("smollm2-135m", attn_maps=True)
    text = read_text(bundled_corpus()["persuasion"])[5000:9000]
    ids = teacher.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :65]
    with torch.no_grad():
        return teacher, ids, teacher(ids, logits=False, hidden_states=True)


def _rate_only_spad(teacher, cfg, term):
    from teachers import layer_map

    return SpADLoss(student_dim=cfg.d_model, teacher_dim=teacher.hidden_size,
                    layer_map=layer_map(cfg.n_layer, teacher.num_layers), student_heads=cfg.n_head,
                    teacher_heads=teacher.num_heads, weights={term: 1.0}, lif=lif_kwargs(cfg),
                    time_steps=cfg.time_steps, sfa_target_norm=True, rate_mix=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_rate_targets_of_the_bundled_teacher_are_not_all_zero(smollm2_outputs, steps):
    teacher, _, t_out = smollm2_outputs
    cfg = SpikeGPTConfig.from_preset("tiny", vocab_size=teacher.vocab_size, time_steps=steps)
    spad = SpADLoss(student_dim=cfg.d_model, teacher_dim=teacher.hidden_size, layer_map=[4, 14, 29],
                    student_heads=cfg.n_head, teacher_heads=teacher.num_heads, weights={"saa": 1.0, "sfa": 1.0},
                    lif=lif_kwargs(cfg), time_steps=steps, sfa_target_norm=True)
    for i in range(3):
        targets = spad.teacher_targets(t_out, 64, 65)
        _, rates = spad.saa_target(i, targets, 64, 65)
        beyond_sink = (rates[..., 1:] > 0).float().sum(-1).mean()  # keys other than the attention sink (key 0)
        assert (rates.sum(-1) > 0).all() and beyond_sink > 0.2, (i, float(beyond_sink))
        features = feature_rate_code(targets.features[i], steps, spad.lif)
        assert 0.01 < float((features > 0).float().mean()) < 0.5
        assert set(rates.unique().tolist()) <= {k / steps for k in range(steps + 1)}


@pytest.mark.slow
@pytest.mark.parametrize("term", ["saa", "sfa"])
@pytest.mark.parametrize("steps", [1, 4])
def test_one_step_on_the_rate_term_alone_moves_the_student_toward_the_targets(smollm2_outputs, term, steps):
    """rate_mix=1 leaves only the rate term; one Adam step lowers it and raises the overlap between the
    student's rates (the sfsa map's spike rates, or the rate code of its projected features) and the targets."""
    from students import SpikeGPTForCausalLM

    teacher, ids, t_out = smollm2_outputs
    torch.manual_seed(0)
    cfg = SpikeGPTConfig.from_preset("tiny", vocab_size=teacher.vocab_size, token_mixer="sfsa", time_steps=steps)
    student = SpikeGPTForCausalLM(cfg)
    spad = _rate_only_spad(teacher, cfg, term)
    opt = torch.optim.Adam([*student.parameters(), *spad.parameters()], lr=1e-2)

    def loss_and_overlap():
        out = student(ids, output_hidden_states=True, output_attentions=True, skip_logits=True)
        loss = _terms(spad, out, t_out, 64)[term]
        if term == "saa":
            ours = row_distribution(out.attentions[0][:, :, :64].float(), steps)
            target = row_distribution(spad.saa_target(0, spad.teacher_targets(t_out, 64, 65), 64, 65)[1], steps)
        else:
            ours = feature_rate_code(spad.sfa_proj[0](out.hidden_states[1][:, :64].float()), steps, spad.lif)
            target = feature_rate_code(spad.teacher_targets(t_out, 64, 65).features[0], steps, spad.lif)
        return loss, float((ours.detach() * target).sum())

    before, overlap_before = loss_and_overlap()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after, overlap_after = loss_and_overlap()
    assert after < 0.97 * before and overlap_after > overlap_before, (float(before), float(after))


# ---------------------------------------------------------------------- the joint objective (BiSpikCLM's SpAD)
JOINT = {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}


def _joint_objective(teacher_dir, mixer: str):
    """What the distill stage builds for g_snn_spad_joint, at tiny size: a 2 x 16 student of `mixer`, the tiny
    teacher online with attention maps, SpAD through pipeline.build.build_spad (SFA against LN(h_T))."""
    import logging

    from pipeline.build import build_spad, build_student
    from pipeline.schema import Recipe
    from teachers import load_teacher

    recipe = Recipe()
    recipe.student.preset = "tiny"
    recipe.student.config = {"n_layer": 2, "d_model": 16, "n_head": 2, "token_mixer": mixer}
    teacher = load_teacher(str(teacher_dir), attn_maps=True)
    student = build_student(recipe, teacher.vocab_size)
    spad = build_spad(recipe, student, teacher, JOINT, logging.getLogger("test"))
    return DistillObjective(student, JOINT, teacher=teacher, spad=spad, kd={"temperature": 2.0, "chunk_size": 5})


def _independent_terms(objective, ids) -> dict[str, float]:
    """The five terms from the student's and teacher's full outputs, in float64 where the loss is plain torch:
    dense full-vocabulary KD at tau = 2, CE, and the SpAD terms written out from their definitions."""
    import torch.nn.functional as F

    student, spad, teacher = objective.student, objective.spad, objective.teacher
    n = ids.shape[1] - 1
    lif, heads = spad.lif, student.config.n_head
    with torch.no_grad():
        s = student(ids, output_hidden_states=True, output_attentions=True)
        t = teacher(ids, logits=True, hidden_states=True)
        ea = ((spad.ea_proj(s.hidden_states[0][:, :n]) - t.embeddings[:, :n]) ** 2).mean(-1).sum()
        saa, sfa = 0.0, 0.0
        for i, layer in enumerate(spad.layer_map):
            a_s = s.attentions[i][:, :, :n].double()
            a_s = a_s / a_s.sum(-1, keepdim=True).clamp_min(1.0)              # T = 1: rows as distributions
            a_t = t.attentions[layer][:, :, :n].double()
            mapped = torch.einsum("st,btqk->bsqk", head_mix_matrix(heads, a_t.shape[1]).double(), a_t)
            rates = attention_rate_code(mapped.float(), 1, lif).double()
            rates = rates / rates.sum(-1, keepdim=True).clamp_min(1.0)
            saa += 0.5 * ((a_s - mapped) ** 2).sum(-1).mean(1).sum() + 0.5 * ((a_s - rates) ** 2).sum(-1).mean(1).sum()
            z = spad.sfa_proj[i](s.hidden_states[i + 1][:, :n])
            h = F.layer_norm(t.hidden_states[layer][:, :n], z.shape[-1:])
            rate_gap = feature_rate_code(z, 1, lif) - feature_rate_code(h, 1, lif)
            sfa += 0.5 * ((z - h) ** 2).mean(-1).sum() + 0.5 * (rate_gap**2).mean(-1).sum()
        logits, t_logits = s.logits[:, :-1].double(), t.logits[:, :-1].double()
        log_p, log_q = (logits / 2).log_softmax(-1), (t_logits / 2).log_softmax(-1)
        kd = 4 * (log_q.exp() * (log_q - log_p)).sum()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    layers = len(spad.layer_map)
    return {"ea": float(ea), "saa": float(saa) / layers, "sfa": float(sfa) / layers, "kd": float(kd), "ce": float(ce)}


@pytest.mark.parametrize("mixer", ["srwkv", "sfsa", "sfsa_linear"])
def test_joint_loss_is_the_weighted_sum_of_the_five_terms(tiny_teacher_dir, mixer):
    objective = _joint_objective(tiny_teacher_dir, mixer)
    ids = torch.randint(1, 320, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = objective(ids)
    want = _independent_terms(objective, ids)
    assert set(out) == {"loss", *want}
    for term, value in want.items():
        assert out[term].item() == pytest.approx(value, rel=1e-4, abs=1e-6), term
    weight = {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "kd": 0.3, "ce": 0.3}
    assert all(want[k] > 0 for k in want)
    assert out["loss"].item() == pytest.approx(sum(weight[k] * want[k] for k in want), rel=1e-4)


@pytest.mark.parametrize("mixer", ["srwkv", "sfsa", "sfsa_linear"])
def test_joint_objective_reaches_every_parameter(tiny_teacher_dir, mixer):
    """DDP needs a gradient for every trainable parameter at every step: nothing is left to freeze."""
    from pipeline.trainer import freeze_unreached_parameters

    objective = _joint_objective(tiny_teacher_dir, mixer)
    ids = torch.randint(1, 320, (2, 10), generator=torch.Generator().manual_seed(6))
    assert freeze_unreached_parameters(objective, {"input_ids": ids}) == []
    assert {n.split(".")[0] for n, _ in objective.named_parameters()} == {"student", "spad"}
