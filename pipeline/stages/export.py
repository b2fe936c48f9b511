"""Stage export: the student alone (alignment projections dropped) in HF format + tokenizer + model card.

Output: {"model": dir} loadable with `import students; AutoModelForCausalLM.from_pretrained(dir)`.
The model card (README.md) lists the recipe's essentials and the metrics known so far; the evaluate stage
rewrites it with its results.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.schema import Recipe
from pipeline.stages import StageContext, StageResult
from pipeline.stages.teacher_cache import teacher_dtype


def _metrics_table(metrics: dict) -> str:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return "_No metrics yet._\n"
    body = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows)
    return "| metric | value |\n|---|---|\n" + body + "\n"


def model_card(recipe: Recipe, config, n_params: int, metrics: dict, extra: str = "") -> str:
    """README.md text of an exported student: front matter, architecture, training, metrics, usage."""
    d = recipe.distill
    align = (f"{recipe.align.train.steps} SpAD alignment steps (weights {vars(recipe.align.weights)}), then "
             if recipe.align.enabled else "")
    if getattr(config, "model_type", "") == "spikegpt":
        mixers = config.token_mixer if isinstance(config.token_mixer, str) else ",".join(config.token_mixer)
        kind = "A SpikeGPT-style spiking student (binary spikes between layers)"
        tags, title = "spiking-neural-network, spikegpt", "a binary spiking language model"
        rows = (f"| layers x width | {config.n_layer} x {config.d_model} ({config.n_head} heads) |\n"
                f"| token mixer | {mixers} |\n| time steps per token | {config.time_steps} |\n"
                f"| spike-driven | {config.spike_driven} |")
    else:  # the matched non-spiking baseline (student.arch)
        kind = f"A non-spiking {config.model_type} baseline (student.arch={recipe.student.arch})"
        tags, title = config.model_type, f"a non-spiking {config.model_type} baseline"
        rows = (f"| layers x width | {config.num_hidden_layers} x {config.hidden_size} "
                f"({config.num_attention_heads} heads) |")
    return f"""---
library_name: transformers
tags: [{tags}, knowledge-distillation, spikedistill]
---
# {recipe.run.name}: {title} distilled from `{recipe.teacher.spec}`

{kind} trained with spikedistill.

## Architecture
| field | value |
|---|---|
| parameters | {n_params:,} |
{rows}
| vocabulary | {config.vocab_size} (the teacher's tokenizer) |

## Training
{align}{d.train.steps} distillation steps ({d.kd.kind}, temperature {d.kd.temperature}, weights {vars(d.weights)}),
batch {d.train.batch_size} x {d.train.grad_accum} accumulation x {recipe.data.seq_len} tokens, lr {d.train.optim.lr}.
Data: {", ".join(recipe.data.sources)} (max_train_tokens {recipe.data.max_train_tokens}).

## Metrics
{_metrics_table(metrics)}{extra}
## Usage
```python
import students  # registers the "spikegpt" model type
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
ids = tokenizer("It is a truth", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```
Energy figures, where given, count operations only (45 nm estimates; memory traffic is not counted).
"""


def write_model_card(model_dir: Path, recipe: Recipe, n_params: int, metrics: dict, extra: str = "") -> None:
    """(Re)write model_dir/README.md (atomically) from the saved config and the given metrics."""
    from transformers import AutoConfig

    import students  # noqa: F401  (registers spikegpt with AutoConfig)

    config = AutoConfig.from_pretrained(model_dir)
    text = model_card(recipe, config, n_params, metrics, extra)
    tmp = Path(model_dir) / ".README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(Path(model_dir) / "README.md")


def run(ctx: StageContext) -> StageResult:
    """Copy the distilled student into ctx.stage_dir/model in the export dtype, with tokenizer and card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import students  # noqa: F401  (registers spikegpt with AutoModelForCausalLM)

    r = ctx.recipe
    distill = ctx.upstream["distill"]
    model = AutoModelForCausalLM.from_pretrained(distill["outputs"]["student"])
    model = model.to(teacher_dtype(r.export.dtype))
    out = ctx.stage_dir / "model"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(ctx.upstream["prepare"]["outputs"]["tokenizer"]).save_pretrained(out)
    metrics = {"parameters": sum(p.numel() for p in model.parameters()), **distill.get("metrics", {})}
    write_model_card(out, r, metrics["parameters"], metrics)
    return StageResult(outputs={"model": str(out)}, metrics={"parameters": metrics["parameters"]})
