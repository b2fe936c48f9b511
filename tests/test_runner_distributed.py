"""The runner under a real 2-process launch (torchrun, gloo on CPU): only rank 0 writes config.yaml and
done.json and runs the non-training stages; every rank runs the training stages; a rerun skips on all ranks.
Through the real CLI: one end-of-run summary, printed commands that keep the launcher, and a resume on
another number of processes refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import json, os, sys
from pathlib import Path
from pipeline.recipe import load_recipe
from pipeline.runner import run_pipeline
from pipeline.stages import STAGE_ORDER, StageResult, register_stage

rank = int(os.environ["RANK"])

def stub(name):
    def run(ctx):
        (ctx.stage_dir / f"ran-rank{rank}").write_text(str(ctx.is_main))
        out = ctx.stage_dir / "out"
        if ctx.is_main:
            out.write_text(name)
        return StageResult(outputs={"out": str(out)}, metrics={"rank": rank})
    return run

for name in STAGE_ORDER:
    register_stage(name, stub(name))
rows = run_pipeline(load_recipe(None, ["run.name=dist"]), run_dir=Path(sys.argv[1]))
Path(sys.argv[1], f"summary-rank{rank}-{sys.argv[2]}.json").write_text(json.dumps([r.status for r in rows]))
'''


def _launch(script: Path, run_dir: Path, tag: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(run_dir), tag], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_share_one_run_directory(tmp_path):
    script = tmp_path / "run_stubs.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "run"
    _launch(script, run_dir, "first")
    for stage in ("prepare", "align", "distill", "export", "evaluate"):
        done = json.loads((run_dir / stage / "done.json").read_text())
        assert done["metrics"] == {"rank": 0}
        assert (run_dir / stage / "ran-rank0").exists()
        assert (run_dir / stage / "ran-rank1").exists() == (stage in ("align", "distill"))
    for rank in (0, 1):
        assert json.loads((run_dir / f"summary-rank{rank}-first.json").read_text()) == ["ran"] * 5
    assert not (run_dir / "lock").exists() and (run_dir / "config.yaml").exists()
    _launch(script, run_dir, "again")
    for rank in (0, 1):
        assert json.loads((run_dir / f"summary-rank{rank}-again.json").read_text()) == ["skipped"] * 5
    assert Path(run_dir / "prepare" / "out").read_text() == "prepare"


@pytest.mark.slow
def test_a_two_rank_run_prints_one_summary_and_commands_that_keep_its_launcher(tmp_path, tiny_teacher_dir):
    """After `torchrun ... -m pipeline run`, the printed --extend command starts with the same launcher and
    continues at the same global batch; run on one process instead, it is refused in one line."""
    import shlex

    sys.path.insert(0, str(Path(__file__).parent / "fault_scripts"))
    from common import ROOT, write_recipe

    recipe = write_recipe(tmp_path / "recipe", tiny_teacher_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "pipeline"]
    args = ["run", str(recipe), "--run-dir", "run", "--stages", "prepare,distill", "align.enabled=false",
            "teacher_cache.enabled=false", "distill.train.steps=2", "distill.train.checkpoint_every=1"]

    def launch(argv):
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)

    def tokens() -> float:
        return json.loads((tmp_path / "run" / "distill" / "done.json").read_text())["metrics"]["tokens_seen"]

    first = launch([*launcher, *args])
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("reason / metrics") == 1 and first.stdout.count("next:") == 1, first.stdout
    assert tokens() == 2 * 2 * 2 * 15  # steps x ranks x batch 2 x 15 next-token targets per 16-token row
    line = next(x for x in first.stdout.splitlines() if "# train longer" in x)
    printed = shlex.split(line.split("#")[0])
    assert printed[1:len(launcher)] == launcher[1:], printed
    assert os.path.samefile(shutil.which(printed[0]) or printed[0], sys.executable)
    assert "--extend" in printed and "distill.train.steps=4" in printed
    alone = launch([sys.executable, "-m", "pipeline", *printed[len(launcher):]])
    errors = [x for x in alone.stderr.splitlines() if x.startswith("spikedistill: error:")]
    assert alone.returncode == 2 and len(errors) == 1, alone.stderr[-3000:]
    assert "was written by 2 process(es) (global batch 4 rows), this run has 1 (2 rows)" in errors[0]
    assert tokens() == 2 * 2 * 2 * 15  # nothing trained
    again = launch(printed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert tokens() == 4 * 2 * 2 * 15  # 2 more steps at the same global batch
