"""SpAD terms against hand computations; the distillation objective's sums are additive over rows."""

from types import SimpleNamespace

import pytest
import torch

from pipeline.losses import DistillObjective, SpADLoss, head_mix_matrix, lif_rate

SPIKEGPT_LIF = {"tau": 2.0, "v_threshold": 1.0, "reset": "hard", "decay_input": True}
# a neuron that fires when the current reaches 0.5 in one step (no input decay): easy to compute by hand
EAGER_LIF = {"tau": 2.0, "v_threshold": 0.5, "reset": "hard", "decay_input": False}


def test_head_mix_matrix_mean_pools_groups_or_copies():
    torch.testing.assert_close(head_mix_matrix(2, 4), torch.tensor([[.5, .5, 0, 0], [0, 0, .5, .5]]))
    torch.testing.assert_close(head_mix_matrix(4, 2), torch.tensor([[1., 0], [1, 0], [0, 1], [0, 1]]))
    mix = head_mix_matrix(3, 9)
    assert torch.allclose(mix.sum(1), torch.ones(3)) and (mix > 0).sum().item() == 9


def test_lif_rate_of_a_constant_current_by_hand():
    x = torch.tensor([0.6, 1.5, 3.0])
    # H_t = V/2 + x/2; 0.6 never reaches 1; 1.5: 0.75, 1.125 (fire), 0.75, 1.125 (fire); 3.0 fires every step
    torch.testing.assert_close(lif_rate(x, 4, SPIKEGPT_LIF), torch.tensor([0.0, 0.5, 1.0]))


def _spad(weights, layer_map=(0,), hs=1, ht=2, lif=EAGER_LIF, **kw):
    return SpADLoss(student_dim=2, teacher_dim=2, layer_map=list(layer_map), student_heads=hs, teacher_heads=ht,
                    weights=weights, lif=lif, time_steps=1, **kw)


def test_ea_is_projected_mse_summed_over_the_first_n_positions():
    spad = _spad({"ea": 1.0})
    with torch.no_grad():
        spad.ea_proj.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        spad.ea_proj.bias.zero_()
    e_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])        # [B=1, L=3, C=2]
    e_t = torch.tensor([[[1.0, 1.0], [0.0, 3.0], [0.0, 0.0]]])
    out = spad(SimpleNamespace(hidden_states=(e_s,)), SimpleNamespace(embeddings=e_t), n_pos=2)
    # token 0: P e = (2, 0) vs (1, 1) -> (1 + 1)/2 = 1;  token 1: (0, 1) vs (0, 3) -> (0 + 4)/2 = 2
    assert set(out) == {"ea"} and out["ea"].item() == pytest.approx(3.0)


def test_saa_direct_and_rate_terms_by_hand():
    spad = _spad({"saa": 1.0})
    a_s = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])                  # [B=1, H_s=1, L=2, L=2]
    a_t = torch.tensor([[[[1.0, 0.0], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]]])  # H_t = 2
    out = spad(SimpleNamespace(attentions=(a_s,)), SimpleNamespace(attentions=(a_t,)), n_pos=2)
    # mapped teacher = mean of its 2 heads: [[1, 0], [0.4, 0.6]]; rate (fires at >= 0.5): [[1, 0], [0, 1]]
    direct = (0 + 0) / 2 + (0.1**2 + 0.1**2) / 2
    rate = (0 + 0) / 2 + (0.5**2 + 0.5**2) / 2
    assert out["saa"].item() == pytest.approx(direct + rate)


def test_saa_learned_head_mix_is_a_parameter_initialised_to_the_mean():
    spad = _spad({"saa": 1.0}, head_mapping="learned", layer_map=(0, 1))
    assert len(spad.head_mix) == 2
    torch.testing.assert_close(spad.head_mix[1].data, head_mix_matrix(1, 2))


def test_sfa_uses_the_layer_map_and_the_rate_term():
    spad = _spad({"sfa": 1.0}, layer_map=(1, 0))
    h_s = [torch.randn(1, 3, 2) for _ in range(3)]                      # embedding + 2 student layers
    h_t = [torch.randn(1, 3, 2) for _ in range(2)]
    out = spad(SimpleNamespace(hidden_states=tuple(h_s)), SimpleNamespace(hidden_states=tuple(h_t)), n_pos=3)
    want = 0.0
    for i, t in enumerate((1, 0)):  # student layer i (hidden_states[i + 1]) -> teacher layer t
        z = spad.sfa_proj[i](h_s[i + 1])
        want += ((z - h_t[t]) ** 2).mean(-1).sum() + \
            ((lif_rate(z, 1, EAGER_LIF) - lif_rate(h_t[t], 1, EAGER_LIF)) ** 2).mean(-1).sum()
    assert out["sfa"].item() == pytest.approx(want.item() / 2, rel=1e-6)


def test_sfa_target_norm_compares_against_the_normalised_teacher_state():
    spad = _spad({"sfa": 1.0}, sfa_target_norm=True)
    h_s, h_t = [torch.randn(1, 2, 2) for _ in range(2)], [100.0 * torch.randn(1, 2, 2)]
    out = spad(SimpleNamespace(hidden_states=tuple(h_s)), SimpleNamespace(hidden_states=tuple(h_t)), n_pos=2)
    z, t = spad.sfa_proj[0](h_s[1]), torch.nn.functional.layer_norm(h_t[0], (2,))
    want = ((z - t) ** 2).mean(-1).sum() + ((lif_rate(z, 1, EAGER_LIF) - lif_rate(t, 1, EAGER_LIF)) ** 2).mean(-1).sum()
    assert out["sfa"].item() == pytest.approx(want.item(), rel=1e-6)


def test_only_weighted_terms_get_parameters():
    spad = _spad({"ea": 0.2, "saa": 0.0, "sfa": 0.0})
    assert {n.split(".")[0] for n, _ in spad.named_parameters()} == {"ea_proj"}
    with pytest.raises(ValueError, match="align.head_mapping"):
        _spad({"saa": 1.0}, head_mapping="max")


@pytest.fixture(scope="module")
def objective(tiny_teacher_dir):
    from students import SpikeGPTConfig, SpikeGPTForCausalLM
    from teachers import layer_map, load_teacher

    teacher = load_teacher(str(tiny_teacher_dir), attn_maps=True)
    torch.manual_seed(0)
    cfg = SpikeGPTConfig.from_preset("tiny", n_layer=2, d_model=16, n_head=2, vocab_size=teacher.vocab_size,
                                     token_mixer="sfsa")
    student = SpikeGPTForCausalLM(cfg)
    weights = {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}
    spad = SpADLoss(student_dim=16, teacher_dim=teacher.hidden_size, layer_map=layer_map(2, teacher.num_layers),
                    student_heads=2, teacher_heads=teacher.num_heads, weights=weights, lif=SPIKEGPT_LIF)
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
