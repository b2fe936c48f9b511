"""Convert a checkpoint of the original SpikeGPT (Zhu et al., arXiv 2302.13939; github ridgerchu/SpikeGPT,
`src/model.py`, class GPT with model_type "RWKV") into a SpikeGPTForCausalLM.

The source checkpoint is the `state_dict()` of that GPT saved with torch.save (a `.pth` file). Its keys, with
V = vocabulary, C = n_embd, N = n_layer, i = 0..N-1, and where each goes here:

| SpikeGPT key                                   | shape     | SpikeGPTForCausalLM key                 |
|------------------------------------------------|-----------|-----------------------------------------|
| emb.weight                                     | [V, C]    | emb.weight                              |
| blocks.0.ln0.weight, .bias                     | [C]       | ln0.weight, .bias                       |
| blocks.i.ln1.weight, .bias / ln2.weight, .bias | [C]       | blocks.i.ln1.* / blocks.i.ln2.*         |
| blocks.i.att.time_decay, .time_first           | [C]       | blocks.i.mixer.time_decay, .time_first  |
| blocks.i.att.time_mix_k, _v, _r                | [1, 1, C] | blocks.i.mixer.shift.mix rows 0, 1, 2   |
| blocks.i.att.key/value/receptance/output.weight| [C, C]    | blocks.i.mixer.key/value/receptance/output.weight |
| blocks.i.ffn.time_mix_k, _r                    | [1, 1, C] | blocks.i.ffn.shift.mix rows 0, 1        |
| blocks.i.ffn.key.weight                        | [4C, C]   | blocks.i.ffn.key.weight                 |
| blocks.i.ffn.receptance.weight                 | [C, C]    | blocks.i.ffn.receptance.weight          |
| blocks.i.ffn.value.weight                      | [C, 4C]   | blocks.i.ffn.value.weight               |
| ln_out.weight, .bias                           | [C]       | ln_out.weight, .bias                    |
| head.weight                                    | [V, C]    | lm_head.weight                          |

The architecture is our student with spike_driven=False (only the embedding and the two LIFs per block spike,
every Linear reads a float), T = 1, token_mixer="srwkv", LIF tau 2 / threshold 1 / hard reset / ATan alpha 2,
LayerNorm eps 1e-5: today's config fields express it, so no new flag was needed. `binary_embedding` is not
recorded in a checkpoint: src/model.py binarises the embedding (the default here); pass False for a model trained
without it. SpikeGPT's dropout (0.03, training only) has no counterpart. Not supported, and reported as an
unknown key: the "RWKV-ffnPre" variant (`blocks.0.ffnPre.*`) and RWKV_HEAD_QK_DIM > 0 (`head_q`, `head_k`,
`copy_mask`).

Compatibility: the conversion matches `src/model.py` (the GPT the checkpoints were trained with). SpikeGPT's
RNN runner `src/model_run.py` (behind its `run.py`) disagrees with `model.py` in two places, so a released
checkpoint (e.g. the 216M model) generates different text in `run.py` than in `model.py` and here:
  - it binarises the embedding only when vocab_size == 77 (the 216M model, vocabulary 50,277, reads a float
    embedding there); binary_embedding=False reproduces that part;
  - it rescales every RWKV_RESCALE_LAYER = 6 layers: block i's att.output and ffn.value weights are divided by
    2^(i // 6), so the current into both LIFs of blocks 6-11 is halved (12-17 quartered), and the residual
    stream is halved after every sixth block. Nothing here does that rescaling.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import SpikeGPTConfig, StudentError
from .model import SpikeGPTForCausalLM

_BLOCK_KEYS = {  # per-block SpikeGPT key (after "blocks.i.") -> (our key, expected shape as a function of C)
    "ln1.weight": ("ln1.weight", lambda c: (c,)),
    "ln1.bias": ("ln1.bias", lambda c: (c,)),
    "ln2.weight": ("ln2.weight", lambda c: (c,)),
    "ln2.bias": ("ln2.bias", lambda c: (c,)),
    "att.time_decay": ("mixer.time_decay", lambda c: (c,)),
    "att.time_first": ("mixer.time_first", lambda c: (c,)),
    "att.time_mix_k": ("mixer.shift.mix[0]", lambda c: (1, 1, c)),
    "att.time_mix_v": ("mixer.shift.mix[1]", lambda c: (1, 1, c)),
    "att.time_mix_r": ("mixer.shift.mix[2]", lambda c: (1, 1, c)),
    "att.key.weight": ("mixer.key.weight", lambda c: (c, c)),
    "att.value.weight": ("mixer.value.weight", lambda c: (c, c)),
    "att.receptance.weight": ("mixer.receptance.weight", lambda c: (c, c)),
    "att.output.weight": ("mixer.output.weight", lambda c: (c, c)),
    "ffn.time_mix_k": ("ffn.shift.mix[0]", lambda c: (1, 1, c)),
    "ffn.time_mix_r": ("ffn.shift.mix[1]", lambda c: (1, 1, c)),
    "ffn.key.weight": ("ffn.key.weight", lambda c: (4 * c, c)),
    "ffn.receptance.weight": ("ffn.receptance.weight", lambda c: (c, c)),
    "ffn.value.weight": ("ffn.value.weight", lambda c: (c, 4 * c)),
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_UNSUPPORTED = (" (ridgerchu/SpikeGPT's GPT with model_type 'RWKV' has no such key; the 'RWKV-ffnPre' variant and "
                "RWKV_HEAD_QK_DIM > 0 are not supported)")


def expected_keys(vocab_size: int, n_embd: int, n_layer: int) -> dict[str, tuple[int, ...]]:
    """Every key of a SpikeGPT GPT state dict with its shape."""
    keys = {"emb.weight": (vocab_size, n_embd), "blocks.0.ln0.weight": (n_embd,), "blocks.0.ln0.bias": (n_embd,),
            "ln_out.weight": (n_embd,), "ln_out.bias": (n_embd,), "head.weight": (vocab_size, n_embd)}
    for i in range(n_layer):
        keys.update({f"blocks.{i}.{k}": shape(n_embd) for k, (_, shape) in _BLOCK_KEYS.items()})
    return keys


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, read with torch.load(weights_only=True) (no pickled code runs).

    Raises StudentError naming the file when it is missing, unreadable or not a {name: tensor} dict."""
    path = Path(path)
    if not path.is_file():
        raise StudentError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for a bad or unsafe file)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StudentError(f"{path}: not a loadable weights-only checkpoint ({first})") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StudentError(f"{path}: expected a state dict (name -> tensor) as saved by SpikeGPT's trainer")
    return obj


def convert_state_dict(sd: dict[str, torch.Tensor], binary_embedding: bool = True,
                       source: str = "checkpoint") -> tuple[SpikeGPTConfig, dict[str, torch.Tensor]]:
    """A SpikeGPT GPT state dict -> (our config, our state dict in fp32).

    Sizes come from emb.weight and the highest block index. Raises StudentError naming `source` and the first
    unknown key, missing key or wrong shape."""
    if "emb.weight" not in sd or sd["emb.weight"].dim() != 2:
        raise StudentError(f"{source}: no 2-D emb.weight, so not a SpikeGPT GPT state dict")
    vocab_size, n_embd = sd["emb.weight"].shape
    blocks = [int(m.group(1)) for k in sd if (m := _BLOCK.fullmatch(k))]
    n_layer = max(blocks) + 1 if blocks else 0
    want = expected_keys(vocab_size, n_embd, n_layer)
    for key, value in sd.items():
        if key not in want:
            raise StudentError(f"{source}: unknown key {key!r}{_UNSUPPORTED}")
        if tuple(value.shape) != want[key]:
            raise StudentError(f"{source}: {key} has shape {list(value.shape)}, expected {list(want[key])} "
                               f"(from emb.weight {[vocab_size, n_embd]})")
    missing = sorted(set(want) - set(sd))
    if missing or not n_layer:
        raise StudentError(f"{source}: missing key {missing[0] if missing else 'blocks.0.*'}")
    config = SpikeGPTConfig(vocab_size=vocab_size, n_layer=n_layer, d_model=n_embd,
                            n_head=n_embd // 64 if n_embd % 64 == 0 else 1, ffn_mult=4, token_mixer="srwkv",
                            time_steps=1, spike_driven=False, binary_embedding=binary_embedding,
                            tie_word_embeddings=False)
    f = {k: v.float() for k, v in sd.items()}
    out = {"emb.weight": f["emb.weight"], "ln0.weight": f["blocks.0.ln0.weight"], "ln0.bias": f["blocks.0.ln0.bias"],
           "ln_out.weight": f["ln_out.weight"], "ln_out.bias": f["ln_out.bias"], "lm_head.weight": f["head.weight"]}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for name, (ours, _) in _BLOCK_KEYS.items():
            if "[" not in ours:
                out[b + ours] = f[b + name]
        out[b + "mixer.shift.mix"] = torch.cat([f[b + f"att.time_mix_{x}"].reshape(1, -1) for x in "kvr"])
        out[b + "ffn.shift.mix"] = torch.cat([f[b + f"ffn.time_mix_{x}"].reshape(1, -1) for x in "kr"])
    return config, out


def import_spikegpt(path: str | Path, binary_embedding: bool = True) -> SpikeGPTForCausalLM:
    """A SpikeGPT `.pth` checkpoint (see the module docstring for its layout) as a SpikeGPTForCausalLM in eval
    mode. Raises StudentError (one line naming the file and the key) for anything it cannot convert."""
    config, state = convert_state_dict(read_checkpoint(path), binary_embedding, source=str(path))
    model = SpikeGPTForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
