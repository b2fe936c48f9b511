"""Stage export (and `spikedistill export`): the student alone, as a folder anyone with transformers can load.

Its generation stops at the tokenizer's EOS and at the document separator the student was trained on (the
prepared data's meta.json): config.json and generation_config.json list both in eos_token_id.

The folder holds config.json (with `auto_map`), the modeling code generated from the `students` package's own
sources (students/remote_code.py: plain-PyTorch reference ops, spikedistill's fused kernels when it is
installed), model.safetensors, the tokenizer and a model card (README.md) with the metrics and the recipe:
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)      # no spikedistill needed
    import students; AutoModelForCausalLM.from_pretrained(dir)             # the installed package's class
The stage's output is {"model": dir}; the evaluate stage rewrites the card with its results. The matched
non-spiking baseline (student.arch) is a stock transformers model and gets no remote code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import StageError
from pipeline.schema import Recipe
from pipeline.stages import StageContext, StageResult
from pipeline.stages.teacher_cache import teacher_dtype


def _metrics_table(metrics: dict) -> str:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return "_No metrics yet._\n"
    body = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows)
    return "| metric | value |\n|---|---|\n" + body + "\n"


def _architecture(recipe: Recipe | None, config) -> tuple[str, str, str, str]:
    """(kind sentence, tags, title, architecture rows) of the card."""
    if getattr(config, "model_type", "") == "spikegpt":
        mixers = config.token_mixer if isinstance(config.token_mixer, str) else ",".join(config.token_mixer)
        rows = (f"| layers x width | {config.n_layer} x {config.d_model} ({config.n_head} heads) |\n"
                f"| token mixer | {mixers} |\n| time steps per token | {config.time_steps} |\n"
                f"| spike-driven | {config.spike_driven} |\n| binary embedding | {config.binary_embedding} |")
        return ("A SpikeGPT-style spiking student (binary spikes between layers)",
                "spiking-neural-network, spikegpt", "a binary spiking language model", rows)
    arch = f" (student.arch={recipe.student.arch})" if recipe is not None else ""
    rows = f"| layers x width | {config.num_hidden_layers} x {config.hidden_size} ({config.num_attention_heads} heads) |"
    return (f"A non-spiking {config.model_type} baseline{arch}", config.model_type,
            f"a non-spiking {config.model_type} baseline", rows)


def _data_cap(data) -> str:
    if data.max_train_bytes is not None:
        return f"max_train_bytes {data.max_train_bytes}"
    return f"max_train_tokens {data.max_train_tokens}"


def _training(recipe: Recipe) -> str:
    from pipeline.recipe import recipe_to_yaml

    d = recipe.distill
    align = (f"{recipe.align.train.steps} SpAD alignment steps (weights {vars(recipe.align.weights)}), then "
             if recipe.align.enabled else "")
    return f"""{align}{d.train.steps} distillation steps ({d.kd.kind}, temperature {d.kd.temperature}, weights {vars(d.weights)}),
batch {d.train.batch_size} x {d.train.grad_accum} accumulation x {recipe.data.seq_len} tokens, lr {d.train.optim.lr}.
Data: {", ".join(recipe.data.sources)} ({_data_cap(recipe.data)}).

<details><summary>The resolved recipe (spikedistill run RECIPE.yaml)</summary>

```yaml
{recipe_to_yaml(recipe).rstrip()}
```
</details>
"""


def model_card(recipe: Recipe | None, config, n_params: int, metrics: dict, extra: str = "",
               origin: str | None = None) -> str:
    """README.md text of an exported student: front matter, architecture, training (the recipe), metrics, usage.

    recipe None: a student made outside a spikedistill run; `origin` then says where it came from.
    """
    kind, tags, title, rows = _architecture(recipe, config)
    if recipe is not None:
        heading = f"{recipe.run.name}: {title} distilled from `{recipe.teacher.spec}`"
        training = _training(recipe)
    else:
        heading = title[0].upper() + title[1:]
        training = (origin or "Not recorded: this student was not exported from a spikedistill run.") + "\n"
    spiking = getattr(config, "model_type", "") == "spikegpt"
    load = ('AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)  # no spikedistill needed'
            if spiking else 'AutoModelForCausalLM.from_pretrained("PATH")')
    tok_args = ", trust_remote_code=True" if spiking else ""  # else AutoTokenizer asks about config.json's code
    remote = ("\nThe folder's modeling code (`modeling_spikegpt.py` and its modules) is generated from spikedistill's\n"
              "`students` package; it runs on the plain-PyTorch reference ops, or on spikedistill's fused kernels\n"
              "where spikedistill is installed. With spikedistill, `import students` and loading without\n"
              "`trust_remote_code` uses the installed package's class instead.\n" if spiking else "")
    return f"""---
library_name: transformers
tags: [{tags}, knowledge-distillation, spikedistill]
---
# {heading}

{kind}, made with spikedistill.

## Architecture
| field | value |
|---|---|
| parameters | {n_params:,} |
{rows}
| vocabulary | {config.vocab_size} |

## Training
{training}
## Metrics
{_metrics_table(metrics)}{extra}
## Usage
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = {load}
tokenizer = AutoTokenizer.from_pretrained("PATH"{tok_args})
ids = tokenizer("It is a truth", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```
{remote}Generation is transformers' own `generate` (greedy, sampling, beam search, streamers); the student reads the
prompt once and then one token per step through its recurrent state. Energy figures, where given, count
operations only (45 nm estimates; memory traffic is not counted).
"""


def write_model_card(model_dir: Path, recipe: Recipe | None, n_params: int, metrics: dict, extra: str = "",
                     origin: str | None = None) -> None:
    """(Re)write model_dir/README.md (atomically) from the saved config and the given metrics."""
    from transformers import AutoConfig

    import students  # noqa: F401  (registers spikegpt with AutoConfig)

    config = AutoConfig.from_pretrained(model_dir)
    text = model_card(recipe, config, n_params, metrics, extra, origin)
    tmp = Path(model_dir) / ".README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(Path(model_dir) / "README.md")


def save_student(model, tokenizer, out: str | Path, card: str, stop_ids: Sequence[int] = ()) -> Path:
    """Write the self-contained folder `out`: weights (safetensors), config.json (+ auto_map and remote code for
    a spiking student), generation_config.json, the tokenizer (None: none) and README.md = card.

    The tokenizer's bos/pad ids become the config's; its EOS followed by `stop_ids` (the document separator the
    student was trained on, see separator_stop) becomes eos_token_id, one id or a list (e.g. [2, 0] for the
    bundled teacher's tokenizer), so `generate` stops at the end of a chat turn and at the end of a document.
    The folder is built beside `out` and renamed into place, so a failure never leaves a half-written `out`.
    """
    from students.remote_code import write_remote_code

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spiking = getattr(model.config, "model_type", "") == "spikegpt"
    ids = {}
    if tokenizer is not None:
        ids = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        stops = list(dict.fromkeys(int(t) for t in (ids["eos_token_id"], *stop_ids) if t is not None))
        ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops or None
    for key, value in ids.items():
        if value is not None:
            setattr(model.config, key, value)
            setattr(model.generation_config, key, value)
    try:
        if spiking:
            model.config.auto_map = write_remote_code(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def separator_stop(dataset_dir: str | Path, tokenizer) -> list[int]:
    """[the id of the document separator] of a prepared dataset (its meta.json's separator and separator_id:
    the token that ends every training document), checked against the tokenizer being exported.

    Raises StageError when meta.json is unreadable or the tokenizer holds that token at another id."""
    meta_path = Path(dataset_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        separator, sep_id = meta["separator"], int(meta["separator_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{meta_path}: no readable separator and separator_id ({type(exc).__name__}); rerun "
                         "the prepare stage") from exc
    if tokenizer.convert_ids_to_tokens(sep_id) != separator:
        raise StageError(f"{meta_path}: the separator {separator!r} is id {sep_id} there but not in the exported "
                         "tokenizer; export with the tokenizer the data was prepared with")
    return [sep_id]


def _run_separator(run: Path, tokenizer) -> list[int]:
    """separator_stop of a run's prepared data, or [] when its prepare stage left none."""
    from pipeline.runner import read_done

    dataset = ((read_done(run / "prepare") or {}).get("outputs") or {}).get("dataset")
    return separator_stop(dataset, tokenizer) if dataset and (Path(dataset) / "meta.json").is_file() else []


def _listed(value) -> list[int]:
    """An eos_token_id (None, one id or a list) as a list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def run_of(model_dir: Path) -> Path | None:
    """The run directory a model folder was exported into (`<run>/export/model`), or None."""
    run = Path(model_dir).resolve().parent.parent
    return run if (run / "config.yaml").is_file() and Path(model_dir).resolve().parent.name == "export" else None


def _run_metrics(run: Path) -> dict:
    """Scalar metrics recorded by a run's distill and evaluate stages (done.json)."""
    from pipeline.runner import read_done

    metrics: dict = {}
    for stage in ("distill", "export", "evaluate"):
        metrics.update((read_done(run / stage) or {}).get("metrics", {}))
    return metrics


def _card_body(text: str) -> str:
    """A model card's text without its front matter, headings moved two levels down (to nest in another card)."""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        text = text[4:].split("\n---\n", 1)[1]
    return re.sub(r"^(#+) ", r"\1## ", text.strip(), flags=re.MULTILINE) + "\n"


def export_folder(model_dir: str | Path, out: str | Path, dtype: str | None = None,
                  tokenizer: str | None = None) -> Path:
    """`spikedistill export`: make any student folder self-contained in `out` (see save_student).

    The tokenizer comes from `tokenizer` (a folder or hub id) or the model folder. The card keeps the recipe and
    metrics of the run the folder was exported from (`<run>/export/model`), else the folder's own README.md
    text is kept below a new header. The stop ids are the tokenizer's EOS, the run's document separator (for a
    run's folder) and, with the folder's own tokenizer, the ids the folder already stops at. Raises StageError
    when the folder is not a model or has no tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import students  # noqa: F401  (registers spikegpt with the Auto classes)
    from pipeline.recipe import load_recipe

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise StageError(f"{model_dir}: not a model folder (no config.json); point at a student folder, "
                         "e.g. runs/<name>/export/model")
    if out.resolve() == model_dir.resolve():
        raise StageError(f"{out}: --out must differ from the model folder")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or model_dir)
    except (OSError, ValueError) as exc:
        raise StageError(f"{tokenizer or model_dir}: no tokenizer there ({type(exc).__name__}); pass "
                         "--tokenizer DIR_OR_HUB_ID") from exc
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if dtype is not None:
        model = model.to(teacher_dtype(dtype))
    n_params = sum(p.numel() for p in model.parameters())
    run = run_of(model_dir)
    stops = [] if tokenizer else _listed(model.generation_config.eos_token_id)
    if run is not None:
        card = model_card(load_recipe(run / "config.yaml"), model.config, n_params,
                          {"parameters": n_params, **_run_metrics(run)})
        stops += _run_separator(run, tok)
    else:
        old = model_dir / "README.md"
        origin = (f"Exported from `{model_dir}`, whose model card said:\n\n" + _card_body(old.read_text("utf-8"))
                  if old.is_file() else None)
        card = model_card(None, model.config, n_params, {"parameters": n_params}, origin=origin)
    return save_student(model, tok, out, card, stop_ids=stops)


def import_checkpoint(checkpoint: str | Path, out: str | Path, tokenizer: str | None = None,
                      binary_embedding: bool = True) -> Path:
    """`spikedistill import-spikegpt`: a ridgerchu/SpikeGPT `.pth` checkpoint as a self-contained student folder
    (see students/import_spikegpt.py for the layout it reads). Raises StudentError naming the bad key."""
    from transformers import AutoTokenizer

    from students.import_spikegpt import import_spikegpt

    model = import_spikegpt(checkpoint, binary_embedding=binary_embedding)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    except (OSError, ValueError) as exc:
        raise StageError(f"{tokenizer}: no tokenizer there ({type(exc).__name__}); pass a tokenizer folder "
                         "or hub id to --tokenizer") from exc
    n_params = sum(p.numel() for p in model.parameters())
    origin = (f"Converted by `spikedistill import-spikegpt` from `{Path(checkpoint).name}`, a checkpoint of the "
              "original SpikeGPT (Zhu et al., arXiv 2302.13939; github ridgerchu/SpikeGPT), with "
              f"binary_embedding={binary_embedding}. No tokenizer is recorded in such a checkpoint"
              + ("; the one given to the importer is included." if tok is not None else "; none is included."))
    return save_student(model, tok, out, model_card(None, model.config, n_params, {"parameters": n_params},
                                                    origin=origin))


def run(ctx: StageContext) -> StageResult:
    """Write the distilled student into ctx.stage_dir/model in the export dtype, self-contained, with its card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import students  # noqa: F401  (registers spikegpt with AutoModelForCausalLM)

    r = ctx.recipe
    distill = ctx.upstream["distill"]
    model = AutoModelForCausalLM.from_pretrained(distill["outputs"]["student"])
    model = model.to(teacher_dtype(r.export.dtype))
    prepared = ctx.upstream["prepare"]["outputs"]
    tokenizer = AutoTokenizer.from_pretrained(prepared["tokenizer"])
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {"parameters": n_params, **distill.get("metrics", {})}
    out = save_student(model, tokenizer, ctx.stage_dir / "model", model_card(r, model.config, n_params, metrics),
                       stop_ids=separator_stop(prepared["dataset"], tokenizer))
    return StageResult(outputs={"model": str(out)}, metrics={"parameters": n_params})
