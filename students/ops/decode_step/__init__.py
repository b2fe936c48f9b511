"""The fused decode step: one C call per generated token (csrc/decode_ops.cpp, cpu.py).

A decode step of the module path runs ~90 module calls, 25 LIF and 4 WKV kernel calls and 29 matmuls per token
for the demo student; at batch 1 their Python and dispatcher overhead costs more than its 49,152-wide head
(bench/README.md, bench/decode.py --profile). For a spike-driven student with srwkv blocks and T = 1 (`unsupported` says why
another cannot), `FusedDecoder.step` runs embedding, blocks, head neuron and head in one call instead: every
Linear reads spikes, so each is the gather-add of the rows of its W^T picked by the spikes (the layer's cached
W^T, shared with `event_linear`), and the recurrent state is updated in place. The reference is the model's
module path, built from the other ops' references: the step equals it up to float summation order (the Linears
and the LayerNorm moments; tests/test_fused_decode.py).

The model uses it for forwards of one token per row continuing a state, without gradients, inside
`model.decoding()` (generate's greedy and sampling loops enter it), unless SPIKEDISTILL_SPARSE=off. In `auto`
mode it runs at one row always (the module path's call overhead alone costs more than the whole fused step), and
for more rows up to the most rows at which the event path wins on this CPU
(`event_linear.calibrate.max_event_rows`); the head takes the gather-add up to the crossover rate
`calibrate.crossover` gives for its size and rows (above it, the head runs as a dense matmul on the spikes); a
head under MIN_WEIGHTS always takes it (inside the one call it has no call overhead to repay).
"""
from ..event_linear import sparse_mode
from .cpu import FusedDecoder, unsupported


def fused_decoder(model) -> FusedDecoder | None:
    """A FusedDecoder for `model` (a SpikeGPTForCausalLM), or None where it cannot run (`unsupported(model)`)
    or SPIKEDISTILL_SPARSE=off. Raises ValueError for a malformed SPIKEDISTILL_SPARSE."""
    if sparse_mode() == "off" or unsupported(model) is not None:
        return None
    return FusedDecoder(model)


__all__ = ["FusedDecoder", "fused_decoder", "unsupported"]
