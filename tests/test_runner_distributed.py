"""The runner under a real 2-process launch (torchrun, gloo on CPU): only rank 0 writes config.yaml and
done.json and runs the non-training stages; every rank runs the training stages; a rerun skips on all ranks."""

from __future__ import annotations

import json
import os
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
