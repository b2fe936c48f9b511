"""Model outputs and the recurrent-state keyword, defined in one place for every transformers release we support.

transformers 5.24 renamed the cache field of model outputs, and the forward argument that carries it, from
`past_key_values` to `cache`; the old name still works there but logs a deprecation warning, and a
`ModelOutput` subclass that declares `past_key_values` can no longer be built. `CACHE_FIELD` is the name the
installed release expects. Everything in this project that builds an output, passes a state to a forward or
reads one back goes through this module, so the next rename is a one-line change to `CACHE_FIELD`.
"""
from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from .config import StudentError

# 5.24+ exposes the old name only as a deprecated read-only property of ModelOutput.
CACHE_FIELD = "cache" if isinstance(getattr(ModelOutput, "past_key_values", None), property) else "past_key_values"

SpikeGPTCausalLMOutput = make_dataclass(
    "SpikeGPTCausalLMOutput",
    [
        ("loss", torch.Tensor | None, field(default=None)),
        ("logits", torch.Tensor | None, field(default=None)),
        (CACHE_FIELD, Any, field(default=None)),
        ("hidden_states", tuple | None, field(default=None)),
        ("attentions", tuple | None, field(default=None)),
        ("head_input", torch.Tensor | None, field(default=None)),
    ],
    bases=(ModelOutput,),
    namespace={
        "__module__": __name__,
        "__doc__": f"""Output of SpikeGPTForCausalLM.forward.

    loss (scalar), logits [B, L, V] (None with skip_logits), {CACHE_FIELD} (SpikeGPTState, the recurrent state;
    the field is called `past_key_values` before transformers 5.24 and `cache` from 5.24 on),
    hidden_states (n_layer+1 x [B, L, C]), attentions (n_layer x [B, H, L, L_keys]), head_input [B, L, C].""",
    },
)


def state_of(output: Any) -> Any:
    """The recurrent state (cache) of any HF model output, under whichever name the installed release uses.

    Reading it this way never triggers transformers' deprecation warning."""
    return getattr(output, CACHE_FIELD, None)


def cache_kwargs(state: Any) -> dict[str, Any]:
    """Keyword arguments that hand `state` to an HF model's forward: {CACHE_FIELD: state}."""
    return {CACHE_FIELD: state}


def one_cache(cache: Any, past_key_values: Any) -> Any:
    """The state a caller passed to a forward under either name (`cache` or the older `past_key_values`).

    Raises StudentError when both are given."""
    if cache is not None and past_key_values is not None:
        raise StudentError("pass the recurrent state as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values
