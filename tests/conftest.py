"""Shared pytest fixtures.

`tiny_teacher_dir` (session scope) -> pathlib.Path of a local HuggingFace directory holding a tiny, randomly
initialised Llama causal LM and its tokenizer, loadable offline with `teachers.load_teacher(path)` or
`AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`:
  - tokenizer: byte-level BPE trained on a fixed English paragraph, vocab size `TINY_VOCAB` (= 320);
    "<|endoftext|>" is id 0 and serves as bos, eos, pad and document separator; any text encodes (byte-level).
  - model: LlamaForCausalLM, 2 layers, hidden 32, 4 heads (2 KV heads), FFN 64, max positions 256,
    vocab 320, seed 0, weights in model.safetensors.
Build time is well under a second; treat the directory as read-only (copy it before changing files).

`tiny_tokenizer` (session scope) -> the PreTrainedTokenizerFast saved in that directory.

The whole suite runs torch on one thread (OMP_NUM_THREADS=1 unless set, inherited by subprocesses).
"""

from __future__ import annotations

import os

# Tiny models run fastest on one thread, and on a shared 2-core box extra threads only oversubscribe it
# (a tiny training step went from 0.03 s to 4 s). Set before torch starts its pools; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 320
EOT = "<|endoftext|>"

_TRAIN_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on his "
    "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
    "that he is considered the rightful property of some one or other of their daughters. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
    "In the beginning God created the heaven and the earth. And the earth was without form, and void. "
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE of TINY_VOCAB entries trained on a fixed paragraph (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=None
    )


def build_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 32-wide random Llama (4 heads, 2 KV heads) with the given vocabulary."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_teacher_dir):
    return PreTrainedTokenizerFast.from_pretrained(tiny_teacher_dir)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_teacher")
    tok = build_tiny_tokenizer()
    assert len(tok) == TINY_VOCAB and tok.convert_tokens_to_ids(EOT) == 0
    build_tiny_llama(len(tok)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def pytest_configure(config):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def chain_export(tmp_path_factory):
    """The smallest case of a student that must stop where a document ends: (exported folder, tokenizer, ids).

    The student (eval.testing.chain_student) chooses, after the prompt "Once", " a", the separator
    <|endoftext|>, " b", " c" (then " c" forever); its data is prepared with eval.testing.chat_tokenizer (EOS
    <|im_end|> = 2, separator <|endoftext|> = 0, as the bundled teacher's), and the export stage writes the
    folder. ids: {"Once", " a", " b", " c", "sep", "eos"} -> token id.
    """
    import logging

    from eval.testing import CHAT_TRAIN_TEXT, chain_student, chat_tokenizer
    from pipeline.recipe import load_recipe
    from pipeline.stages import StageContext, export
    from teachers.data import prepare_corpus

    tmp = tmp_path_factory.mktemp("chain")
    tok = chat_tokenizer()
    ids = {w: tok.encode(w) for w in ("Once", " a", " b", " c")}
    assert all(len(v) == 1 for v in ids.values()), ids
    ids = {w: v[0] for w, v in ids.items()} | {"sep": tok.convert_tokens_to_ids(EOT), "eos": tok.eos_token_id}
    assert (ids["sep"], ids["eos"]) == (0, 2)
    chain = {ids["Once"]: ids[" a"], ids[" a"]: ids["sep"], ids["sep"]: ids[" b"], ids[" b"]: ids[" c"],
             ids[" c"]: ids[" c"]}
    chain_student(len(tok), chain).save_pretrained(tmp / "student")
    tok.save_pretrained(tmp / "tokenizer")
    (tmp / "corpus.txt").write_text(CHAT_TRAIN_TEXT)
    prepare_corpus([tmp / "corpus.txt"], tok, tmp / "dataset", seq_len=8, val_fraction=0.0)
    upstream = {"distill": {"outputs": {"student": str(tmp / "student")}, "metrics": {}},
                "prepare": {"outputs": {"tokenizer": str(tmp / "tokenizer"), "dataset": str(tmp / "dataset")}}}
    ctx = StageContext(recipe=load_recipe(None), run_dir=tmp, stage_dir=tmp / "export", upstream=upstream,
                       accelerator=None, is_main=True, log=logging.getLogger("chain_export"))
    folder = export.run(ctx).outputs["model"]
    return folder, tok, ids
