"""The numbers and stage lists that the docs quote for shipped recipes agree with the recipes (issue 17).

Each place that speaks about one recipe (a table row naming `X.yaml`, README's "The demo" section, a recipe
file's own header comment) is a segment; every claim of a known form in it is checked against the recipe
as `load_recipe` resolves it:
  "N x M"                      student layers x width          "first N kB"      evaluate.max_text_bytes
  "Nk tokens" / "NB tokens"    data.max_train_tokens, or steps x batch x accumulation x seq_len x GPUs
  "N align and M distill steps"                                 "T = N"           student time_steps
  "N.NM parameters"            the student's parameter count    srwkv / SFSA      the student's token mixer
  "(one..six) stages", "every stage", "a -> b -> c" stage lists, "teacher cache" / "no teacher cache"
  "ten arms"                   the arm files of recipes/study (names not starting with "_")
A segment with no claim of these forms is not an error; a claim found and not matched is.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.recipe import load_recipe, student_config
from pipeline.runner import plan_stages
from pipeline.stages import STAGE_ORDER

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "recipes/README.md"]
NUMBERS = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                       "nine", "ten", "eleven", "twelve"])}
SCALE = {"k": 1e3, "M": 1e6, "B": 1e9}
# tokens of the bundled training texts with SmolLM2's tokenizer, each followed by its separator; measured with
#   python -c "from pipeline.stages.prepare import load_tokenizer; from teachers.data import *; from teachers.data
#   import _encode; t = load_tokenizer('smollm2-135m'); print(sum(len(_encode(t, read_text(bundled_corpus()[k])))
#   + 1 for k in BUNDLED_TRAIN))"
BUNDLED_TOKENS = 3_718_427
TEACHER_VOCAB = {"smollm2-135m": 49152, "facebook/opt-1.3b": 50272}


def _recipe_file(name: str) -> Path:
    path = ROOT / "recipes" / name.removeprefix("recipes/")
    assert path.exists() or "*" in name, f"the docs name {name}, which does not exist"
    return path


def segments() -> list[tuple[str, str, str]]:
    """(where, recipe file name, text) of every doc segment about one recipe."""
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for line in text.splitlines():
            m = re.match(r"\| `((?:recipes/)?[\w*/.-]+\.yaml)` \|(.*)", line)
            if m:
                out.append((f"{doc} table row", m.group(1), m.group(2)))
        demo = re.search(r"^## The demo\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
        if demo:
            out.append((f"{doc} 'The demo'", "demo.yaml", demo.group(1).split("\n\n")[0]))
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        header = "".join(line.lstrip("#") for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                         if line.startswith("#"))
        out.append((f"{path.name} header", path.name, header))
    return out


def _stages(recipe) -> list[str]:
    return plan_stages(recipe, None)


def _check(recipe_name: str, text: str) -> list[str]:
    """The claims in `text` that disagree with the recipe (messages), [] when all agree."""
    text = " ".join(text.split())
    if recipe_name.startswith(("study/", "recipes/study/")):
        arms = [p for p in (ROOT / "recipes" / "study").glob("*.yaml") if not p.name.startswith("_")]
        return [f"'{m.group(0)}' but recipes/study has {len(arms)} arms"
                for m in re.finditer(r"\b(\w+) arms\b", text) if NUMBERS.get(m.group(1), len(arms)) != len(arms)]
    recipe = load_recipe(_recipe_file(recipe_name))
    config = student_config(recipe, TEACHER_VOCAB.get(recipe.teacher.spec, 256))
    bad = []
    for m in re.finditer(r"\b(\d+) x (\d+)\b(?! \()", text):
        if (int(m.group(1)), int(m.group(2))) != (config.n_layer, config.d_model):
            bad.append(f"'{m.group(0)}' but the student is {config.n_layer} x {config.d_model}")
    for m in re.finditer(r"(~?)\b(\d+(?:\.\d+)?)([kMB]) tokens\b(?!/)", text):
        claimed = float(m.group(2)) * SCALE[m.group(3)]
        if m.group(1) and "whole bundled corpus" in text:  # the corpus's size, not a budget
            actual = BUNDLED_TOKENS
        elif recipe.data.max_train_tokens is not None:
            actual = recipe.data.max_train_tokens
        else:
            gpus = re.search(r"\b(\d+) GPUs\b", text)
            t = recipe.distill.train
            actual = t.steps * t.batch_size * t.grad_accum * recipe.data.seq_len * (int(gpus.group(1)) if gpus else 1)
        if abs(actual - claimed) > 0.05 * claimed:
            bad.append(f"'{m.group(0)}' but the recipe trains on {actual:,.0f}")
    capped = recipe.data.max_train_tokens or recipe.data.max_train_bytes
    if "whole bundled corpus" in text and (capped or list(recipe.data.sources) != ["bundled"]):
        bad.append("'the whole bundled corpus' but data.sources/max_train_tokens/max_train_bytes say otherwise")
    for m in re.finditer(r"\b(\d+) align and (\d+) distill steps\b", text):
        if (int(m.group(1)), int(m.group(2))) != (recipe.align.train.steps, recipe.distill.train.steps):
            bad.append(f"'{m.group(0)}' but the recipe has {recipe.align.train.steps} and {recipe.distill.train.steps}")
    for m in re.finditer(r"\bfirst (\d+) kB\b", text):
        if int(m.group(1)) * 1000 != recipe.evaluate.max_text_bytes:
            bad.append(f"'{m.group(0)}' but evaluate.max_text_bytes is {recipe.evaluate.max_text_bytes}")
    for m in re.finditer(r"\bT = (\d+)\b", text):
        if int(m.group(1)) != config.time_steps:
            bad.append(f"'{m.group(0)}' but time_steps is {config.time_steps}")
    mixers = {config.token_mixer} if isinstance(config.token_mixer, str) else set(config.token_mixer)
    for m in re.finditer(r"\b(srwkv|sfsa_linear|sfsa)\b", text, flags=re.IGNORECASE):
        if m.group(1).lower() not in mixers:
            bad.append(f"'{m.group(0)}' but the token mixer is {config.token_mixer}")
    for m in re.finditer(r"\b(\d+(?:\.\d+)?)M parameters\b", text):
        from students import SpikeGPTForCausalLM

        params = sum(p.numel() for p in SpikeGPTForCausalLM(config).parameters()) / 1e6
        if abs(params - float(m.group(1))) > 0.05:
            bad.append(f"'{m.group(0)}' but the student has {params:.2f}M")
    stages = _stages(recipe)
    for m in re.finditer(r"\b(?:all )?(\w+) stages\b", text):
        if m.group(1) in NUMBERS and NUMBERS[m.group(1)] != len(stages):
            bad.append(f"'{m.group(0)}' but it runs {len(stages)}: {', '.join(stages)}")
    if re.search(r"\bevery stage\b", text) and stages != list(STAGE_ORDER):
        bad.append(f"'every stage' but it runs {', '.join(stages)} (no {set(STAGE_ORDER) - set(stages)})")
    for m in re.finditer(r"\b(?:\w+ -> )+\w+\b", text):
        named = [s.strip() for s in m.group(0).split("->")]
        if set(named) <= set(STAGE_ORDER) and named != stages:
            bad.append(f"'{m.group(0)}' but it runs {' -> '.join(stages)}")
    says_cache = re.search(r"\b(no )?teacher cache\b", text)
    if says_cache and bool(says_cache.group(1)) == recipe.teacher_cache.enabled:
        bad.append(f"'{says_cache.group(0)}' but teacher_cache.enabled is {recipe.teacher_cache.enabled}")
    return bad


SEGMENTS = segments()


def test_the_shipped_recipes_are_all_described():
    described = {Path(name).name for _, name, _ in SEGMENTS if "*" not in name}
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped <= described


@pytest.mark.parametrize("where, recipe_name, text", SEGMENTS, ids=[f"{w}:{n}" for w, n, _ in SEGMENTS])
def test_what_the_docs_say_about_a_recipe_is_what_it_does(where, recipe_name, text):
    assert _check(recipe_name, text) == [], f"{where} about {recipe_name}"


@pytest.mark.parametrize("claim", ["4 x 256 student", "300k tokens", "all six stages", "every stage",
                                   "prepare -> teacher_cache -> align -> distill -> export -> evaluate",
                                   "16 align and 80 distill steps", "first 10 kB", "T = 2", "sfsa student",
                                   "13.9M parameters", "teacher cache"])
def test_each_kind_of_claim_catches_a_wrong_number(claim):
    assert _check("demo.yaml", claim), claim  # the demo recipe disagrees with every one of these
