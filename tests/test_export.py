"""The self-contained export (`spikedistill export` and the export stage): the folder loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` in an interpreter that holds only torch,
transformers and their dependencies (no spikedistill), with our logits and greedy generation; its modeling code
is the package's own source; with spikedistill importable the folder's code runs the fused kernels."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from eval.testing import save_model_dir, tiny_student
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "It is a truth universally"

# Loads the exported folder; prints JSON with logits, a greedy continuation, and what was importable.
REMOTE = r"""
import importlib, importlib.util, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ops = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".spikegpt_ops")
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].tolist()
out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
train = model.train()(torch.tensor([ids]), labels=torch.tensor([ids]))  # HF-style training: loss, no logits
train.loss.backward()
grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
print(json.dumps({"logits": logits, "generated": out[0].tolist(), "module": type(model).__module__,
                  "fast_kernels": ops.FAST_KERNELS, "eos": tok.eos_token_id, "train_loss": train.loss.item(),
                  "train_logits": train.logits is not None, "grad_norms": grads,
                  "importable": sorted(m for m in ("students", "teachers", "pipeline", "eval", "lm_eval",
                                                   "accelerate", "spikedistill")
                                       if importlib.util.find_spec(m) is not None)}))
"""


def dependency_closure(*names: str) -> dict[str, object]:
    """{name: Distribution} of the named installed distributions and everything they require (no extras)."""
    found: dict[str, object] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # an optional or other-platform requirement that is not installed
            continue
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def isolated_site(tmp: Path) -> Path:
    """A folder of symlinks to the files of torch, transformers and their dependencies only (dist-info too,
    which transformers reads for version checks)."""
    site = tmp / "site"
    site.mkdir()
    for dist in dependency_closure("torch", "transformers").values():
        root = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            if (root / top).exists() and not (site / top).exists():
                (site / top).symlink_to(root / top)
    assert not (site / "students").exists() and not (site / "spikedistill.egg-info").exists()
    return site


def run_remote(folder: Path, ids: list[int], tmp: Path, isolated: bool) -> dict:
    """Run REMOTE in a fresh interpreter: isolated = `python -I -S` whose sys.path is the standard library plus
    isolated_site(); else the same venv with this checkout importable (students not imported beforehand)."""
    env = {"HF_MODULES_CACHE": str(tmp / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": os.environ.get("PATH", ""), "HOME": str(tmp)}
    if isolated:
        code = f"import sys; sys.path.append({str(isolated_site(tmp))!r})\n" + REMOTE
        argv = [sys.executable, "-I", "-S", "-c", code]
    else:
        env["PYTHONPATH"] = str(ROOT)
        argv = [sys.executable, "-c", REMOTE]
    proc = subprocess.run([*argv, str(folder), json.dumps(ids)], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """(our student, its self-contained folder): every mixer and T = 2, so every op's reference runs."""
    from students import SpikeLinear

    model = tiny_student(len(tiny_tokenizer), seed=6, n_layer=3, token_mixer=["sfsa", "srwkv", "sfsa_linear"],
                         time_steps=2, eos_token_id=None)
    with torch.no_grad():  # louder weights: every neuron fires, so every path reaches the logits being compared
        for name, module in model.named_modules():
            if isinstance(module, SpikeLinear) and name != "lm_head":
                module.weight.mul_(4.0)
        model(torch.tensor([tiny_tokenizer.encode(PROMPT)]))
    assert all(0.0 < rate < 1.0 for rate in model.spike_rates().values()), model.spike_rates()
    tmp = tmp_path_factory.mktemp("export")
    src = save_model_dir(model, tiny_tokenizer, tmp / "src")
    assert main(["export", str(src), "--out", str(tmp / "out")]) == 0
    return model, tmp / "out"


def _ours(model, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    generated = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=0)
    return logits, generated[0].tolist()


def _ours_training(model, ids: list[int]) -> tuple[float, dict[str, float]]:
    """Today's loss path (logits materialised, then F.cross_entropy) in training mode: loss, gradient norms."""
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids]), skip_logits=False).loss
        loss.backward()
        grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    finally:
        model.eval()
    return loss.item(), grads


def _check_training(got: dict, model, ids: list[int]) -> None:
    """The folder's HF-style training call returns no logits and today's loss and gradients."""
    loss, grads = _ours_training(model, ids)
    assert got["train_logits"] is False
    assert got["train_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["grad_norms"].keys() == grads.keys() and len(grads) > 10
    for name, norm in grads.items():
        assert got["grad_norms"][name] == pytest.approx(norm, rel=1e-4, abs=1e-7), name


def test_loads_and_matches_without_spikedistill(exported, tiny_tokenizer, tmp_path):
    model, folder = exported
    ids = tiny_tokenizer.encode(PROMPT)
    got = run_remote(folder, ids, tmp_path, isolated=True)
    assert got["importable"] == []  # no spikedistill package, nor lm_eval or accelerate: only torch+transformers
    assert got["module"].startswith("transformers_modules.") and got["fast_kernels"] is False
    logits, generated = _ours(model, ids)
    assert (torch.tensor(got["logits"]) - logits).abs().max() <= 1e-5
    assert got["generated"] == generated and len(generated) > len(ids)
    assert got["eos"] == tiny_tokenizer.eos_token_id
    _check_training(got, model, ids)  # the plain-PyTorch reference of the head + cross-entropy


def test_folder_code_uses_the_fused_kernels_where_spikedistill_is_importable(exported, tiny_tokenizer, tmp_path):
    model, folder = exported
    ids = tiny_tokenizer.encode(PROMPT)
    got = run_remote(folder, ids, tmp_path, isolated=False)
    assert got["module"].startswith("transformers_modules.") and got["fast_kernels"] is True
    logits, generated = _ours(model, ids)
    assert (torch.tensor(got["logits"]) - logits).abs().max() <= 1e-5
    assert got["generated"] == generated
    _check_training(got, model, ids)  # spikedistill's fused head + cross-entropy


def test_exported_code_is_the_package_source(exported):
    from students.remote_code import IMPORTS, SOURCES

    _, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_spikegpt.SpikeGPTForCausalLM"
    for module, source in SOURCES.items():
        theirs = (folder / f"{module}.py").read_text().splitlines()
        ours = (ROOT / "students" / source).read_text().splitlines()
        body = [line for line in theirs if not line.startswith("# Generated by spikedistill")][1:]
        assert len(body) == len(ours), module
        for mine, exported_line in zip(ours, body):
            if mine != exported_line:  # only relative imports differ, and only in the module they name
                rel = re.match(r"(\s*from )(\.+[\w.]*)( import .*)", mine)
                assert rel, f"{module}: {mine!r} changed to {exported_line!r}"
                assert exported_line == f"{rel.group(1)}.{IMPORTS[(source, rel.group(2))]}{rel.group(3)}"
    # every module the model imports, directly or not, is in the folder
    pending, seen = ["modeling_spikegpt"], set()
    while pending:
        name = pending.pop()
        seen.add(name)
        text = (folder / f"{name}.py").read_text()
        pending += [m for m in re.findall(r"^\s*from \.(\w+) import", text, flags=re.MULTILINE) if m not in seen]
    assert seen == set(SOURCES) | {"spikegpt_ops"}


def test_an_unknown_relative_import_stops_the_export():
    from students import StudentError
    from students.remote_code import rewrite_source

    with pytest.raises(StudentError, match="students/model.py imports '.newmodule'"):
        rewrite_source("model.py", "from .newmodule import thing\n")


def test_export_inside_a_run_carries_the_recipe_and_metrics(tiny_tokenizer, tmp_path, capsys):
    from pipeline.recipe import load_recipe, recipe_to_yaml
    from students import SpikeGPTForCausalLM

    run = tmp_path / "runs" / "demo-x"
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["run.name=demo-x"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(recipe_to_yaml(recipe))
    for stage, metrics in (("distill", {"loss": 3.25}), ("evaluate", {"bpb_persuasion": 2.5})):
        (run / stage).mkdir()
        done = {"stage": stage, "config_hash": "x", "metrics": metrics, "outputs": {}}
        (run / stage / "done.json").write_text(json.dumps(done))
    model = tiny_student(len(tiny_tokenizer), seed=1)
    save_model_dir(model, tiny_tokenizer, run / "export" / "model")
    out = tmp_path / "shared"
    assert main(["export", str(run / "export" / "model"), "--out", str(out), "--dtype", "bf16"]) == 0
    card = (out / "README.md").read_text()
    assert "demo-x" in card and "| bpb_persuasion | 2.5 |" in card and "| loss | 3.25 |" in card
    assert "trust_remote_code=True" in card and "run:\n  name: demo-x" in card  # the resolved recipe
    loaded = SpikeGPTForCausalLM.from_pretrained(out)
    assert loaded.emb.weight.dtype == torch.bfloat16


def test_export_errors_are_one_line(tmp_path, tiny_tokenizer, capsys):
    model = tiny_student(len(tiny_tokenizer), seed=1)
    no_tok = tmp_path / "no_tok"
    model.save_pretrained(no_tok)
    for argv, text in (([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "no config.json"),
                       ([str(no_tok), "--out", str(tmp_path / "o")], "--tokenizer"),
                       ([str(no_tok), "--out", str(no_tok)], "--out must differ")):
        capsys.readouterr()
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        lines = re.findall(r"spikedistill: error: [^\r\n]*", err)
        assert len(lines) == 1 and text in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_the_exported_stop_set_holds_the_eos_and_the_training_separator(chain_export):
    """The issue's smallest case: after the prompt the student chooses " a", the separator, " b", " c";
    the export lists the tokenizer's EOS and the separator of the prepared data ([2, 0], as for the bundled
    teacher's tokenizer), so transformers' own generate stops at the separator (on today's main: eos 2 only,
    and generate ran on to " b c")."""
    from transformers import AutoModelForCausalLM

    import students  # noqa: F401  (registers spikegpt)

    folder, _, ids = chain_export
    want = [ids["eos"], ids["sep"]]
    for name in ("config.json", "generation_config.json"):
        assert json.loads((Path(folder) / name).read_text())["eos_token_id"] == want, name
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = model.generate(torch.tensor([[ids["Once"]]]), max_new_tokens=4, do_sample=False)
    assert out[0].tolist() == [ids["Once"], ids[" a"], ids["sep"]]


def test_the_separator_comes_from_the_prepared_data_not_a_fixed_id(tmp_path):
    """A recipe's own data.separator (here <|im_start|>, id 1) is the one exported; a meta.json whose id the
    tokenizer holds for another token is refused in one line."""
    from eval.testing import CHAT_TRAIN_TEXT, chat_tokenizer
    from pipeline.errors import StageError
    from pipeline.stages.export import separator_stop
    from teachers.data import prepare_corpus

    tok = chat_tokenizer()
    (tmp_path / "corpus.txt").write_text(CHAT_TRAIN_TEXT)
    prepare_corpus([tmp_path / "corpus.txt"], tok, tmp_path / "data", seq_len=8, val_fraction=0.0,
                   separator="<|im_start|>")
    assert separator_stop(tmp_path / "data", tok) == [tok.convert_tokens_to_ids("<|im_start|>")] == [1]
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta | {"separator_id": 5}))
    with pytest.raises(StageError, match="is id 5 there but not in the exported tokenizer"):
        separator_stop(tmp_path / "data", tok)
