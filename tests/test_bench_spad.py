"""bench/spad_grads.py: each SpAD term's gradient norm on the student's block weights, on a tiny model."""

import pytest
import torch

from bench.spad_grads import main, parameter_groups, term_gradient_norms
from pipeline.losses import DistillObjective

WEIGHTS = {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}
WEIGHT_OF = {"ea": "ea", "saa": "saa", "sfa": "sfa", "kd": "sta", "ce": "hta"}


@pytest.fixture(scope="module")
def joint(tiny_teacher_dir):
    import logging

    from pipeline.build import build_spad, build_student
    from pipeline.schema import Recipe
    from teachers import load_teacher

    recipe = Recipe()
    recipe.student.preset = "tiny"
    recipe.student.config = {"n_layer": 2, "d_model": 16, "n_head": 2}
    teacher = load_teacher(str(tiny_teacher_dir), attn_maps=True)
    student = build_student(recipe, teacher.vocab_size)
    spad = build_spad(recipe, student, teacher, WEIGHTS, logging.getLogger("test"))
    kd = {"temperature": 2.0, "chunk_size": 5, "impl": "chunked"}
    return DistillObjective(student, WEIGHTS, teacher=teacher, spad=spad, kd=kd)


def test_each_terms_norm_is_that_of_the_term_trained_alone(joint):
    ids = torch.randint(1, 320, (2, 10), generator=torch.Generator().manual_seed(7))
    groups = parameter_groups(joint.student)
    assert len(groups["blocks"]) == sum(1 for n, _ in joint.student.named_parameters() if n.startswith("blocks."))
    norms = term_gradient_norms(joint, ids, groups)
    assert set(norms) == set(WEIGHT_OF)
    n_tokens = 2 * 9
    for term, weight in WEIGHT_OF.items():
        alone = DistillObjective(joint.student, {weight: 1.0}, teacher=joint.teacher, spad=joint.spad, kd=joint.kd)
        joint.zero_grad(set_to_none=True)
        out = alone(ids)
        (out["loss"] / n_tokens).backward()
        assert norms[term]["loss"] == pytest.approx(float(out[term]) / n_tokens, rel=1e-6)
        for name, params in groups.items():
            want = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None) ** 0.5
            assert norms[term][name] == pytest.approx(want, rel=1e-5, abs=1e-12), (term, name)
    assert norms["ea"]["blocks"] == 0.0 and norms["ea"]["embedding"] > 0  # EA reads the embedding only
    assert all(norms[t]["blocks"] > 0 for t in ("saa", "sfa", "kd", "ce"))


def test_the_fused_kd_path_is_refused(joint):
    fused = DistillObjective(joint.student, WEIGHTS, teacher=joint.teacher, spad=joint.spad,
                             kd={**joint.kd, "impl": "fused"})
    with pytest.raises(ValueError, match="chunked"):
        term_gradient_norms(fused, torch.ones(1, 4, dtype=torch.long), parameter_groups(joint.student))


def test_the_command_prints_both_tables_for_a_tiny_recipe(tmp_path, tiny_teacher_dir, capsys):
    (tmp_path / "corpus.txt").write_text("It is a truth universally acknowledged, that a single man. " * 40)
    (tmp_path / "r.yaml").write_text(
        f"data: {{sources: [{tmp_path / 'corpus.txt'}], seq_len: 12, val_fraction: 0.1}}\n"
        f"teacher: {{spec: {tiny_teacher_dir}, dtype: fp32}}\n"
        "student: {preset: tiny, config: {n_layer: 2, d_model: 16, n_head: 2}}\n"
        "distill: {train: {steps: 8, batch_size: 2}, weights: {ea: 0.2, saa: 0.1, sfa: 0.1, sta: 0.3, hta: 0.3}}\n")
    main(["--recipe", str(tmp_path / "r.yaml"), "--steps", "2", "student.config.token_mixer=sfsa"])
    text = capsys.readouterr().out
    assert "(sfsa, T = 1), 2 x 12 rows" in text and "### at initialisation" in text and "### after 2 steps" in text
    rows = [line for line in text.splitlines() if line.startswith(("| ea ", "| saa ", "| sfa ", "| kd ", "| ce "))]
    assert len(rows) == 10
