"""Weight inheritance (student.init_from_teacher): the projection is the centred PCA, rotated, seeded and cached
once per teacher; the student's embedding, head and EA projection start from it."""

import logging

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.inherit import (
    cached_projection,
    embedding_projection,
    init_ea_projection,
    init_student_from_teacher,
    teacher_projections,
)


def _matrix(rows=320, width=32, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # correlated columns and a non-zero mean, like a real embedding matrix
    return torch.randn(rows, width, generator=gen) @ torch.randn(width, width, generator=gen) + 0.5


def _top_projector(e: torch.Tensor, d: int) -> torch.Tensor:
    """Projector onto the top-d principal directions, from the covariance's eigenvectors (not an SVD)."""
    centred = e.double() - e.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    top = vectors[:, -d:]
    return top @ top.T


def test_projection_is_the_rotated_centred_pca_and_seeded():
    e = _matrix()
    proj = embedding_projection(e, 8, seed=0)
    basis = proj.basis.double()
    torch.testing.assert_close(basis.T @ basis, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis @ basis.T, _top_projector(e, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(proj.mean, e.mean(0))
    torch.testing.assert_close(proj.coords, (e - e.mean(0)) @ proj.basis, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proj.coords.mean(0), torch.zeros(8), atol=1e-4, rtol=0)  # centred channels
    again = embedding_projection(e, 8, seed=0)
    assert torch.equal(again.coords, proj.coords) and torch.equal(again.basis, proj.basis)
    other = embedding_projection(e, 8, seed=1)
    assert not torch.allclose(other.coords, proj.coords, atol=1e-3)  # another rotation of the same subspace
    torch.testing.assert_close(other.basis.double() @ other.basis.double().T, _top_projector(e, 8),
                               atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="init_from_teacher"):
        embedding_projection(e, 33, seed=0)


def test_rotation_spreads_the_variance_over_the_channels():
    e = _matrix()
    rotated = embedding_projection(e, 8, seed=0).coords.var(0)
    centred = e.double() - e.double().mean(0)
    pca_var = torch.linalg.svdvals(centred)[:8].pow(2) / (e.shape[0] - 1)  # per-channel variance of plain PCA
    assert rotated.max() / rotated.min() < 0.8 * pca_var.max() / pca_var.min()  # measured: 1.46 against 2.63
    torch.testing.assert_close(rotated.sum().double(), pca_var.sum(), rtol=1e-4, atol=0)  # same total variance


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    from teachers import load_teacher

    return load_teacher(str(tiny_teacher_dir))


def test_cached_once_per_teacher_width_and_seed(teacher, tmp_path, monkeypatch):
    from pipeline import inherit

    first = cached_projection(teacher, "input", 16, 0, cache_dir=tmp_path)
    files = sorted((tmp_path / "inherit").glob("*.safetensors"))
    assert len(files) == 1 and teacher.fingerprint[:16] in files[0].name

    def not_again(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(inherit, "embedding_projection", not_again)
    cached = cached_projection(teacher, "input", 16, 0, cache_dir=tmp_path)
    assert torch.equal(cached.coords, first.coords) and torch.equal(cached.basis, first.basis)
    monkeypatch.undo()
    cached_projection(teacher, "input", 16, 1, cache_dir=tmp_path)
    cached_projection(teacher, "input", 8, 0, cache_dir=tmp_path)
    assert len(list((tmp_path / "inherit").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "inherit").glob("*.tmp"))


def _student(vocab: int, **overrides):
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    torch.manual_seed(0)
    cfg = SpikeGPTConfig.from_preset("tiny", vocab_size=vocab, d_model=16, n_head=2, **overrides)
    return SpikeGPTForCausalLM(cfg)


def test_student_embedding_and_head_come_from_the_teacher(teacher, tmp_path):
    projections = teacher_projections(teacher, 16, seed=0, cache_dir=tmp_path)
    # the tiny Llama does not tie its embeddings: the head follows the output matrix, the embedding the input
    assert projections["output"] is not projections["input"]
    student = _student(teacher.vocab_size)
    stats = init_student_from_teacher(student, projections)
    emb, head = student.emb.weight, student.lm_head.weight
    assert float(emb.detach().std()) == pytest.approx(student.config.initializer_range, rel=1e-4)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(teacher.vocab_size))
    for got, proj in ((emb, projections["input"]), (head, projections["output"])):
        cosine = torch.nn.functional.cosine_similarity(got, proj.coords, dim=1)
        torch.testing.assert_close(cosine, torch.ones_like(cosine), atol=1e-5, rtol=0)
    assert 0.4 < stats["emb_spike_rate"] < 0.6  # centred coordinates: half the vocabulary spikes per channel


@pytest.mark.parametrize("binary", [True, False])
def test_ea_projection_is_the_least_squares_decoder_of_the_embedding(teacher, tmp_path, binary):
    student = _student(teacher.vocab_size, binary_embedding=binary)
    init_student_from_teacher(student, teacher_projections(teacher, 16, seed=0, cache_dir=tmp_path))
    e_t = teacher.model.get_input_embeddings().weight.double()
    ea = torch.nn.Linear(16, e_t.shape[1])
    default_error = _ea_error(ea, student, e_t)
    explained = init_ea_projection(ea, student, e_t)
    # normal equations, solved independently in float64 with a pseudo-inverse
    x = student.emb.weight.detach().double()
    x = (x >= 0).double() if binary else x
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    solution = torch.linalg.pinv(design) @ e_t
    torch.testing.assert_close(ea.weight.detach().double(), solution[:-1].T, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ea.bias.detach().double(), solution[-1], atol=1e-3, rtol=1e-3)
    assert 0.0 < explained < 1.0 and _ea_error(ea, student, e_t) < 0.5 * default_error


def _ea_error(ea, student, e_t) -> float:
    """EA's mean squared error over the vocabulary (what SpADLoss's EA term measures per token)."""
    with torch.no_grad():
        out = student(torch.arange(e_t.shape[0])[None], output_hidden_states=True, skip_logits=True)
        return float((ea(out.hidden_states[0][0]).double() - e_t).pow(2).mean())


def test_build_student_and_spad_inherit_when_the_recipe_asks(teacher, tiny_teacher_dir, tmp_path, monkeypatch):
    from pipeline.build import build_spad, build_student
    from pipeline.recipe import load_recipe

    monkeypatch.setenv("SPIKEDISTILL_CACHE", str(tmp_path))
    base = [f"teacher.spec={tiny_teacher_dir}", "student.preset=tiny", "student.config.d_model=16",
            "student.config.n_head=2"]
    plain = build_student(load_recipe(None, base), teacher.vocab_size)
    recipe = load_recipe(None, [*base, "student.init_from_teacher=true"])
    student = build_student(recipe, teacher.vocab_size, teacher)
    proj = teacher_projections(teacher, 16, seed=0)
    assert not torch.allclose(plain.lm_head.weight, student.lm_head.weight)
    torch.testing.assert_close(student.lm_head.weight, torch.nn.functional.normalize(proj["output"].coords, dim=1))
    assert torch.equal(build_student(recipe, teacher.vocab_size, teacher).emb.weight, student.emb.weight)
    spad = build_spad(recipe, student, teacher, {"ea": 0.2, "saa": 0.0, "sfa": 0.0}, logging.getLogger("t"))
    reference = torch.nn.Linear(16, teacher.hidden_size)
    init_ea_projection(reference, student, teacher.model.get_input_embeddings().weight)
    torch.testing.assert_close(spad.ea_proj.weight, reference.weight)
    from pipeline.errors import StageError

    with pytest.raises(StageError, match="init_from_teacher"):
        build_student(recipe, teacher.vocab_size)
    with pytest.raises(ConfigError, match="student.init_from_teacher"):
        load_recipe(None, [*base, "student.init_from_teacher=true", "student.arch=llama"])


def _expected_rows(teacher, projection, matrix, ids, scale_to=None):
    """Rows of the whole-vocabulary projection in float64: centred teacher rows times the basis, picked by id."""
    coords = (matrix.double() - matrix.double().mean(0)) @ projection.basis.double()
    rows = coords[ids]
    return rows * (scale_to / coords.std()) if scale_to else torch.nn.functional.normalize(rows, dim=1)


@pytest.mark.parametrize("case", ["derived", "shuffled_with_missing_bytes"])
def test_a_derived_vocabulary_inherits_the_rows_of_its_teacher_tokens(teacher, tmp_path, case):
    """student.vocab = subset:N | bytes: student row i starts from teacher token ids[i]'s row of the projection
    of the whole teacher matrix; a byte the teacher lacks (id -1) keeps the student's fresh row (the head's
    at unit norm)."""
    from teachers.vocab import student_tokenizer, teacher_ids

    if case == "derived":
        ids = teacher_ids(teacher.tokenizer, student_tokenizer(teacher.tokenizer, "subset:280", cache_dir=tmp_path))
        assert ids.tolist() == list(range(280))  # the tiny teacher's order: special, bytes, merges
    else:
        ids = torch.randperm(teacher.vocab_size, generator=torch.Generator().manual_seed(1))[:40]
        ids[[3, 17]] = -1
    projections = teacher_projections(teacher, 16, seed=0, cache_dir=tmp_path)
    fresh, student = _student(len(ids)), _student(len(ids))
    init_student_from_teacher(student, projections, ids)
    known = ids >= 0
    inputs, outputs = teacher.model.get_input_embeddings().weight, teacher.model.get_output_embeddings().weight
    emb = _expected_rows(teacher, projections["input"], inputs, ids[known], student.config.initializer_range)
    head = _expected_rows(teacher, projections["output"], outputs, ids[known])
    torch.testing.assert_close(student.emb.weight[known].double(), emb, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(student.lm_head.weight[known].double(), head, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(student.emb.weight[~known], fresh.emb.weight[~known])
    torch.testing.assert_close(student.lm_head.weight[~known],
                               torch.nn.functional.normalize(fresh.lm_head.weight[~known], dim=1))
    with pytest.raises(ConfigError, match="do not fit the student's embedding"):
        init_student_from_teacher(_student(len(ids) + 1), projections, ids)
