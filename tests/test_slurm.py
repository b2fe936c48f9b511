"""recipes/slurm/distill.sbatch, run as Slurm would run it on two nodes, on this one machine.

The template's own text runs under bash with the environment sbatch gives a 2-node job (SLURM_NNODES=2,
SLURM_JOB_NODELIST); `scontrol` and `srun` are the small stubs in tests/slurm_stubs/ (srun starts the launch
line once per node with SLURM_NODEID 0 and 1). Every node is 127.0.0.1 and runs one CPU process (gloo), so
the two machine ranks must rendezvous over c10d, train together on the tiny recipe, and leave one set of
outputs. Running it found two bugs, now fixed: DeepSpeed configs launched accelerate's default "pdsh"
multi-node launcher (needs ssh and a hostfile), and a second stage under DeepSpeed failed on accelerate's
"second Accelerator with a deepspeed_plugin" check.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).parent / "slurm_stubs"
STEPS, BATCH, NODES, TARGETS = 2, 2, 2, 15  # seq_len 16 -> 15 next-token targets per row

RECIPE = """\
run: {{name: slurm, seed: 0, runs_dir: {runs}}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 1, d_model: 16, n_head: 2}}}}
align:
  train: {{steps: {steps}, batch_size: {batch}, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
distill:
  train: {{steps: {steps}, batch_size: {batch}, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
evaluate: {{texts: [persuasion], max_text_bytes: 300, context_length: 32, energy: false, teacher: false,
           sample_tokens: 2}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.latest
@pytest.mark.parametrize("accel_config, overrides", [
    ("recipes/accelerate/ddp.yaml", []),
    (None, ["distributed.strategy=deepspeed", "distributed.deepspeed_config=recipes/deepspeed/zero2.json"]),
], ids=["ddp", "deepspeed-zero2-default-config"])
def test_sbatch_template_on_two_simulated_nodes(tmp_path, tiny_teacher_dir, accel_config, overrides):
    (tmp_path / "corpus.txt").write_text("It is a truth universally acknowledged, that a single man. " * 40)
    recipe, runs, logs = tmp_path / "tiny.yaml", tmp_path / "runs", tmp_path / "logs"
    recipe.write_text(RECIPE.format(runs=runs, corpus=tmp_path / "corpus.txt", teacher=tiny_teacher_dir,
                                    steps=STEPS, batch=BATCH))
    logs.mkdir()
    env = {**os.environ, "PATH": f"{STUBS}:{os.environ['PATH']}", "SLURM_NNODES": str(NODES),
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_ID": "1", "GPUS_PER_NODE": "1", "RECIPE": str(recipe),
           "MASTER_PORT": str(_free_port()), "VENV": str(Path(sys.executable).parents[1]),
           "SRUN_LOG_DIR": str(logs), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if accel_config:
        env["ACCEL_CONFIG"] = accel_config
    proc = subprocess.run(["bash", "recipes/slurm/distill.sbatch", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    node_logs = {i: (logs / f"node{i}.log").read_text() for i in range(NODES)}
    assert proc.returncode == 0, proc.stdout + "".join(text[-3000:] for text in node_logs.values())
    assert f"nodes={NODES} processes={NODES} master=127.0.0.1" in proc.stdout

    run_dir = runs / "slurm"
    # both machine ranks trained in one process group: the global token count is the sum over the two ranks
    for stage in ("align", "distill"):
        done = json.loads((run_dir / stage / "done.json").read_text())
        assert done["metrics"]["tokens_seen"] == STEPS * BATCH * NODES * TARGETS, stage
    # one set of outputs: rank 0 alone writes config.yaml, done.json and the exported model; both nodes ran
    # every stage, and only rank 0 (node 0) printed the end-of-run summary
    assert sorted(p.name for p in runs.iterdir()) == ["slurm"]
    for stage in ("prepare", "align", "distill", "export", "evaluate"):
        assert (run_dir / stage / "done.json").is_file()
    assert (run_dir / "export" / "model" / "model.safetensors").is_file()
    assert not list(run_dir.glob("**/*.tmp*")) and not (run_dir / "lock").exists()
    assert "distill       ran" in node_logs[0] and "distill       ran" not in node_logs[1]
    for text in node_logs.values():
        assert "[distill] running" in text and "Traceback" not in text
