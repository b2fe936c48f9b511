"""Safety (issue 7): no pickle is ever executed from a run directory, checkpoint, cache, student or teacher;
trust_remote_code is off unless asked for and warns when on; recipes and eval tasks cannot pull in files
from outside their directory.

A "malicious pickle" here is a torch.save'd object whose __reduce__ opens (creates) a marker file: loading it
with plain pickle creates the file (checked first, so the plant is real); a safe loader must not.
"""

from __future__ import annotations

import ast
import logging
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "fault_scripts"))
sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from common import ROOT, write_recipe
from toy import ToyData, ToyLM

pytestmark = pytest.mark.faults
PACKAGES = ("students", "teachers", "pipeline", "eval")


class Evil:
    """Unpickling this creates `marker` (open(marker, "w") runs inside the unpickler)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Write a malicious pickle to `path` and prove an unsafe load of it would run code."""
    torch.save({"state": Evil(marker)}, path)
    probe = marker.with_name("probe.pt")  # a neutral name: torch.load treats *.safetensors differently
    shutil.copy(path, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists(), "the planted pickle must be live"
    marker.unlink()
    probe.unlink()


# ----------------------------------------------------------------------------------------- code audit
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node, name in _calls(tree):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                kw = {k.arg: k.value for k in node.keywords}
                if name.endswith("torch.load"):
                    safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not safe:
                        offenders.append(f"{where} {name} without weights_only=True")
                if re.fullmatch(r"(c?pickle|dill|joblib|marshal)\.loads?", name):
                    offenders.append(f"{where} {name}")
                if name.endswith("np.load") and isinstance(kw.get("allow_pickle"), ast.Constant) and \
                        kw["allow_pickle"].value:
                    offenders.append(f"{where} np.load(allow_pickle=True)")
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------ checkpoint
def _toy_checkpoint(tmp_path: Path):
    from accelerate import Accelerator

    from pipeline.schema import OptimConfig, TrainConfig
    from pipeline.trainer import Trainer

    cfg = TrainConfig(steps=2, batch_size=4, eval_every=100, checkpoint_every=2, log_every=1,
                      optim=OptimConfig(lr=0.01))
    make = lambda: Trainer(ToyLM(), cfg, Accelerator(cpu=True), tmp_path, ToyData(), seed=0,
                           config_hash="h")
    make().fit()
    return make, tmp_path / "checkpoints" / "step-0000002"


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt", "rng-rank0.pt"])
def test_malicious_pickle_in_a_checkpoint_is_never_executed(tmp_path, victim):
    from pipeline import checkpoint as ckpt
    from pipeline.errors import PipelineError

    make, folder = _toy_checkpoint(tmp_path)
    marker = tmp_path / "PWNED"
    plant(folder / victim, marker)
    ckpt._write_manifest(folder)  # an attacker who can write the folder can also fix the checksums
    with pytest.raises(PipelineError, match=rf"{victim}.*weights_only"):
        make().fit()  # resumes from the planted checkpoint
    assert not marker.exists()


def test_malicious_pickle_as_student_weights_is_never_executed(tmp_path):
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    student = tmp_path / "student"
    SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("tiny", vocab_size=64)).save_pretrained(student)
    (student / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    plant(student / "pytorch_model.bin", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        SpikeGPTForCausalLM.from_pretrained(student)  # transformers reads *.bin with weights_only=True
    assert not marker.exists()


def test_malicious_pickle_as_teacher_weights_is_never_executed(tmp_path, tiny_teacher_dir):
    from teachers import TeacherError, load_teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    plant(teacher / "pytorch_model.bin", marker)
    with pytest.raises(TeacherError):
        load_teacher(teacher)
    assert not marker.exists()


def test_malicious_pickle_in_a_run_directory_is_never_executed(tmp_path, tiny_teacher_dir, capsys):
    """Pickles planted as a cache shard, done.json, stage.json and config.yaml: read as data or refused."""
    from pipeline.cli import main

    recipe = write_recipe(tmp_path / "recipe", tiny_teacher_dir)
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare,teacher_cache,align"]) == 0
    marker = tmp_path / "PWNED"
    plant(run_dir / "teacher_cache" / "cache" / "shard_00000.safetensors", marker)
    plant(run_dir / "align" / "done.json", marker)
    plant(run_dir / "align" / "stage.json", marker)
    capsys.readouterr()
    # align reruns (its done.json is unreadable, so not done); distill then meets the planted shard
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "align,distill"]) == 2
    err = capsys.readouterr().err
    assert "shard_00000.safetensors" in err and "Traceback" not in err
    assert not marker.exists()
    plant(run_dir / "config.yaml", marker)
    # read with yaml.safe_load (not UTF-8, so unreadable: refused as a different config)
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare"]) == 2
    assert not marker.exists()


# ---------------------------------------------------------------------------------- trust_remote_code
def test_trust_remote_code_is_off_by_default_and_warns_when_on(tmp_path, tiny_teacher_dir, caplog):
    from pipeline.recipe import load_recipe
    from teachers import load_teacher

    assert load_recipe(None).teacher.trust_remote_code is False
    with caplog.at_level(logging.WARNING):
        load_teacher(tiny_teacher_dir)
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_teacher(tiny_teacher_dir, trust_remote_code=True)
    assert "trust_remote_code is on" in caplog.text and str(tiny_teacher_dir) in caplog.text


def test_trust_remote_code_from_the_recipe_warns_in_a_run(tmp_path, tiny_teacher_dir, caplog):
    from pipeline.cli import main

    recipe = write_recipe(tmp_path / "recipe", tiny_teacher_dir)
    for stages in ("prepare", "align"):  # prepare loads only the tokenizer; align the whole teacher
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["run", str(recipe), "teacher.trust_remote_code=true", "--run-dir",
                         str(tmp_path / "r"), "--stages", stages]) == 0
        assert "trust_remote_code is on" in caplog.text, stages


# ------------------------------------------------------------------------------------------- includes
@pytest.mark.parametrize("key", ["defaults: [../../secret]", "include: /etc/passwd", "imports: [x.yaml]"])
def test_recipes_have_no_include_mechanism(tmp_path, capsys, key):
    from pipeline.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: {{name: x}}\n{key}\n")
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert key.split(":")[0] in err and not (tmp_path / "run").exists()


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_multi_constructor("!", lambda loader, tag, node: f"{tag} {loader.construct_scalar(node)}")


def test_eval_task_files_stay_inside_eval_tasks():
    tasks = ROOT / "eval" / "tasks"
    for path in tasks.glob("*.yaml"):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        for value in _strings(doc):
            if value.startswith("!function "):
                module = value.split()[1].rsplit(".", 1)[0]
                assert (tasks / f"{module}.py").is_file(), (path, value)
        include = doc.get("include") if isinstance(doc, dict) else None
        if include:
            assert (path.parent / include).resolve().is_relative_to(tasks.resolve()), (path, include)
    data_dir = tasks / "data"
    for f in data_dir.rglob("*"):
        assert f.resolve().is_relative_to(data_dir.resolve()), f  # no symlink out of the folder


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_eval_task_names_cannot_be_paths():
    from eval.harness import local_task_names

    names = local_task_names()
    assert names and not [n for n in names if "/" in n or n.startswith(".")]
