"""Evaluation: lm-eval adapter and local tasks, bits-per-byte, energy accounting, leaderboard, generation.

Submodules are imported on demand (`import eval.bpb`); importing `eval` itself stays cheap because, once
installed, the lm-eval plug-in hook (eval/lm_eval_hook.py) imports it at every interpreter start-up.
"""


class EvalError(Exception):
    """A user-facing evaluation error; the message is one line naming the path or key and the fix."""


__all__ = ["EvalError"]
