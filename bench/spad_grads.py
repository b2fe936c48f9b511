"""Each SpAD term's gradient on the student's block weights: does every term of the joint objective matter?

    .venv/bin/python -m bench.spad_grads [--recipe recipes/study/g_snn_spad_joint.yaml] [--steps 32]
                                         [--threads 1] [key=value ...]

Builds what the recipe's distill stage builds (its student, teacher with attention maps, SpAD projections and
weights; `key=value` overrides as for `spikedistill run`, e.g. student.config.token_mixer=sfsa), prepares its
data in a temporary folder, and takes the first train.batch_size rows of its data order at run.seed (the batch
distill reads first). For each term alone (EA, SAA, SFA, STA = "kd", HTA = "ce") it prints the term per
next-token target, the norm of its gradient on the student's block weights (`blocks.*`; the SpAD projections
and the LM head are left out), that norm times the term's weight, and the norm on the embedding (`emb`, `ln0`:
all that EA reaches). Measured at initialisation and after --steps AdamW steps of the joint objective (the
recipe's optimizer settings and learning-rate schedule, on the rows that follow in the data order).
STA is taken from the online teacher's full-vocabulary logits, not the cache; every term backpropagates alone,
so the KD loss runs on the autograd reference (distill.kd.impl=chunked).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_OF = {"ea": "ea", "saa": "saa", "sfa": "sfa", "kd": "sta", "ce": "hta"}
DEFAULT_RECIPE = "recipes/study/g_snn_spad_joint.yaml"
LOG = logging.getLogger("bench.spad_grads")


def parameter_groups(student: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"blocks": the parameters of the student's blocks, "embedding": emb and ln0} of a SpikeGPTForCausalLM."""
    groups: dict[str, list[nn.Parameter]] = {"blocks": [], "embedding": []}
    for name, p in student.named_parameters():
        if name.startswith("blocks."):
            groups["blocks"].append(p)
        elif name.startswith(("emb.", "ln0.")):
            groups["embedding"].append(p)
    return groups


def _norm(grads) -> float:
    return float(torch.sqrt(sum((g.double().pow(2).sum() for g in grads if g is not None), torch.zeros((),
                                dtype=torch.float64))))


def term_gradient_norms(objective: Any, input_ids: torch.Tensor, groups: dict[str, list[nn.Parameter]],
                        targets: Any = None) -> dict[str, dict[str, float]]:
    """Each term of a pipeline.losses.DistillObjective alone, on one batch input_ids [B, L] (targets: cached
    sparse targets [B, L, k] or None): {term: {"loss": its sum / (B (L - 1)), <group>: the L2 norm of that
    per-token term's gradient over the group's parameters}} for the terms forward reports. Unweighted.

    Raises ValueError for distill.kd.impl "fused", whose head gradient exists only for the weighted sum.
    """
    if objective.kd["impl"] != "chunked":
        raise ValueError("term_gradient_norms backpropagates each term alone: build the objective with "
                         "kd impl 'chunked' (distill.kd.impl=chunked)")
    n_tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    sums = objective.term_sums(input_ids, targets)
    params = [p for group in groups.values() for p in group]
    out = {}
    for term, value in sums.items():
        grads = torch.autograd.grad(value / n_tokens, params, retain_graph=True, allow_unused=True)
        row, start = {"loss": float(value.detach()) / n_tokens}, 0
        for name, group in groups.items():
            row[name] = _norm(grads[start:start + len(group)])
            start += len(group)
        out[term] = row
    return out


def table(norms: dict[str, dict[str, float]], weights: dict[str, float]) -> list[str]:
    """Markdown rows of `term_gradient_norms` output with each term's weight and weighted block norm."""
    lines = ["| term | weight | loss / token | grad norm, blocks | weight x grad norm, blocks | grad norm, embedding |",
             "|---|---:|---:|---:|---:|---:|"]
    for term, row in norms.items():
        w = weights[WEIGHT_OF[term]]
        lines.append(f"| {term} | {w:g} | {row['loss']:.4g} | {row['blocks']:.3e} | {w * row['blocks']:.3e} | "
                     f"{row['embedding']:.3e} |")
    return lines


def build(recipe: Any) -> Any:
    """The recipe's distill objective (student, online teacher with attention maps, SpAD projections), with
    kd impl "chunked"."""
    from pipeline.build import build_spad, build_student
    from pipeline.losses import DistillObjective
    from pipeline.stages.teacher_cache import teacher_dtype
    from teachers import load_teacher

    weights = asdict(recipe.distill.weights)
    teacher = load_teacher(recipe.teacher.spec, dtype=teacher_dtype(recipe.teacher.dtype),
                           attn_maps=weights["saa"] > 0, trust_remote_code=recipe.teacher.trust_remote_code)
    student = build_student(recipe, teacher.vocab_size, teacher, LOG)
    spad = build_spad(recipe, student, teacher, weights, LOG)
    kd = recipe.distill.kd
    return DistillObjective(student, weights, teacher=teacher, spad=spad,
                            kd={"kind": kd.kind, "temperature": kd.temperature, "beta": kd.jsd_beta,
                                "chunk_size": kd.chunk_size, "impl": "chunked"})


def training_rows(recipe: Any, folder: Path):
    """The recipe's training split, prepared into `folder` -> (TokenDataset, DataStream at run.seed)."""
    from pipeline.stages import split_seed
    from pipeline.stages.prepare import load_tokenizer
    from pipeline.trainer import DataStream
    from teachers.data import TokenDataset, prepare_corpus

    d = recipe.data
    prepare_corpus(list(d.sources), load_tokenizer(recipe.teacher.spec), folder, seq_len=d.seq_len,
                   val_fraction=d.val_fraction, seed=split_seed(recipe), separator=d.separator,
                   text_field=d.text_field, max_tokens=d.max_train_tokens)
    train = TokenDataset(folder, "train")
    return train, DataStream(train, recipe.run.seed)


def train_steps(objective: Any, stream: Any, recipe: Any, steps: int, start: int) -> None:
    """`steps` AdamW steps of the weighted objective on stream positions from `start`, with the recipe's
    distill optimizer settings and learning-rate schedule (pipeline.trainer.lr_factor over its train.steps)."""
    from pipeline.trainer import lr_factor

    t = recipe.distill.train
    o = t.optim
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    for step in range(steps):
        ids = torch.stack(stream.rows(start + step * t.batch_size, t.batch_size))
        for group in optimizer.param_groups:
            group["lr"] = o.lr * lr_factor(step, t.steps, o.warmup_steps, o.lr, o.min_lr)
        loss = objective(ids)["loss"] / (ids.shape[0] * (ids.shape[1] - 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()


def main(argv: list[str] | None = None) -> None:
    from pipeline.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="a recipe whose distill stage has SpAD terms")
    p.add_argument("--steps", type=int, default=32, help="training steps between the two measurements")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    objective = build(recipe)
    b = recipe.distill.train.batch_size
    weights = objective.weights
    with tempfile.TemporaryDirectory() as tmp:
        _, stream = training_rows(recipe, Path(tmp) / "dataset")
        ids = torch.stack(stream.rows(0, b))
        cfg = objective.student.config
        print(f"## {args.recipe} {' '.join(args.overrides)}: {cfg.n_layer} x {cfg.d_model} student "
              f"({cfg.token_mixer}, T = {cfg.time_steps}), {b} x {ids.shape[1]} rows, {args.threads} thread(s)")
        for step in (0, args.steps) if args.steps else (0,):
            if step:
                train_steps(objective, stream, recipe, step, b)
            print(f"\n### after {step} steps" if step else "\n### at initialisation")
            print("\n".join(table(term_gradient_norms(objective, ids, parameter_groups(objective.student)),
                                  weights)), flush=True)


if __name__ == "__main__":
    main()
