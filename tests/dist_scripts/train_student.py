"""Train a tiny spiking student against a tiny teacher with pipeline.trainer, on 1 or more CPU ranks.

Usage (what tests/test_distributed.py runs):
    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/train_student.py \
        --teacher DIR --out DIR --strategy ddp|fsdp|deepspeed [--zero 1|2|3] --batch-size 2 --steps 4 [--joint]
Writes OUT/final.safetensors (the trained module's full state dict, main rank) and OUT/metrics.jsonl.
The objective is STA + HTA against the online teacher, or with --joint BiSpikCLM's five terms (EA, SAA, SFA with
their projections, STA, HTA at 0.2 / 0.1 / 0.1 / 0.3 / 0.3).
The accelerator comes from pipeline.runner.make_accelerator, exactly as in a real run.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset


class PatternRows(Dataset):
    """Deterministic rows of a shifted repeating pattern over the vocabulary: [seq_len] int64 each."""

    def __init__(self, n: int, seq_len: int, vocab: int):
        self.rows = [(torch.arange(seq_len) * 3 + 7 * i) % 40 + 1 for i in range(n)]
        self.bytes_per_token = 1.0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--zero", type=int, default=2, choices=(1, 2, 3), help="DeepSpeed ZeRO stage (recipes/deepspeed)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--checkpoint-every", type=int, default=10**6)
    ap.add_argument("--sigterm-at-call", type=int, default=0, help="rank 0 sends itself SIGTERM at this forward")
    ap.add_argument("--joint", action="store_true", help="the five SpAD terms instead of STA + HTA")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from pipeline.build import load_stage_teacher
    from pipeline.losses import DistillObjective, SpADLoss, lif_kwargs
    from pipeline.runner import make_accelerator
    from pipeline.schema import OptimConfig, Recipe, TrainConfig
    from pipeline.trainer import Trainer
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    recipe = Recipe()
    recipe.distributed.strategy = args.strategy
    recipe.teacher.spec, recipe.teacher.dtype = args.teacher, "fp32"
    if args.strategy == "deepspeed":
        recipe.distributed.deepspeed_config = str(Path(__file__).resolve().parents[2]
                                                  / f"recipes/deepspeed/zero{args.zero}.json")
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        eval_every=10**6, checkpoint_every=args.checkpoint_every, log_every=1,
                        optim=OptimConfig(lr=args.lr, min_lr=args.lr / 10, grad_clip=1.0))
    accelerator = make_accelerator(recipe, train)
    teacher = load_stage_teacher(recipe, accelerator, attn_maps=args.joint)
    torch.manual_seed(0)
    config = SpikeGPTConfig.from_preset("tiny", n_layer=2, d_model=16, n_head=2, vocab_size=teacher.vocab_size)
    student = SpikeGPTForCausalLM(config)
    weights = {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3} if args.joint else {"sta": 0.3, "hta": 0.3}
    spad = SpADLoss(student_dim=16, teacher_dim=teacher.hidden_size, layer_map=[0, teacher.num_layers - 1],
                    student_heads=2, teacher_heads=teacher.num_heads, weights=weights, lif=lif_kwargs(config),
                    sfa_target_norm=True) if args.joint else None
    objective = DistillObjective(student, weights, teacher=teacher, spad=spad,
                                 kd={"temperature": 2.0, "chunk_size": 16})
    if args.sigterm_at_call and accelerator.is_main_process:
        calls = [0]

        def pre_forward(module, inputs):
            calls[0] += 1
            if calls[0] == args.sigterm_at_call:
                os.kill(os.getpid(), signal.SIGTERM)

        objective.register_forward_pre_hook(pre_forward)
    out = Path(args.out)
    trainer = Trainer(objective, train, accelerator, out, PatternRows(64, 16, teacher.vocab_size), seed=0,
                      name=f"{args.strategy}-rank{accelerator.process_index}", fsdp=args.strategy == "fsdp")
    trainer.fit()
    state = trainer.full_state_dict()
    if accelerator.is_main_process:
        info = {"wrapper": type(trainer.model).__name__, "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type)}
        (out / "info.json").write_text(json.dumps(info))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / "final.safetensors")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
