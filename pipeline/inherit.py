"""Weight inheritance: a student whose embedding, LM head and EA projection start from its teacher.

DistilBERT (Sanh et al., arXiv 1910.01108) initialises its student from the teacher's layers, and Minitron
(Muralidharan et al., arXiv 2407.14679) prunes the teacher's widths; a student narrower than its teacher can
still inherit the geometry of the teacher's token embeddings through a low-rank projection. Here
(`student.init_from_teacher: true`):

  coords = (E - mean(E)) V_d R        E [V, C_t] the teacher's embedding matrix, V_d [C_t, d] its top-d right
                                       singular vectors (PCA of the centred rows), R [d, d] a random
                                       orthogonal matrix drawn from `seed` (signs of V_d fixed, so that the
                                       result is deterministic)
  student.emb.weight     = coords * (initializer_range / std(coords))   (the default init's scale)
  student.lm_head.weight = coords with each row scaled to unit norm      (LeCun's expected row norm)
  EA projection P        = least-squares map from the student's initial embedding output (its binary spikes,
                           or the embedding itself) to E, over the vocabulary

Why each choice (measured on SmolLM2-135M, d = 128):
- centring: every student channel gets a zero-mean coordinate, so the binary embedding (spike where
  emb >= 0) fires on half of the vocabulary in every channel (0.501) instead of a channel-dependent share;
- the rotation R: PCA's leading channels carry most of the variance, so their signs say little about the
  rest; after a random rotation within the top-d subspace every channel is an equally informative random
  hyperplane. The Hamming similarity of the binary codes then follows the teacher's cosine similarity (Pearson
  0.94 over the 2,000 most frequent Austen tokens, against 0.18 without R and 0.85 for random hyperplanes of
  the full space), and a linear map recovers 49% of E's variance from the bits (31% without R);
- the head uses the output embedding (the input one when they are tied), the embedding the input one.

A student vocabulary derived from the teacher's (student.vocab = subset:N | bytes, teachers/vocab.py) takes,
for each of its tokens, the rows of that token's teacher id (init_student_from_teacher's teacher_ids).

The projections are computed once per teacher (its fingerprint and dtype), width and seed, and cached as
safetensors under $SPIKEDISTILL_CACHE/inherit (default ~/.cache/spikedistill/inherit).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

VERSION = 1  # bump when the construction changes, so old cache files are not reused


@dataclass
class EmbeddingProjection:
    """A d-dimensional projection of a [V, C_t] embedding matrix E: coords [V, d] = (E - mean) @ basis,
    basis [C_t, d] with orthonormal columns, mean [C_t]."""

    coords: torch.Tensor
    basis: torch.Tensor
    mean: torch.Tensor


def embedding_projection(matrix: torch.Tensor, d_model: int, seed: int) -> EmbeddingProjection:
    """PCA of the centred rows of `matrix` [V, C_t] to `d_model` dimensions, rotated by a seeded random
    orthogonal matrix (see the module docstring). Deterministic for a given matrix, width and seed.

    Raises ConfigError when d_model exceeds the teacher's width or vocabulary.
    """
    e = matrix.detach().to("cpu", torch.float64)
    if d_model > min(e.shape):
        raise ConfigError(f"student.init_from_teacher: the student's d_model={d_model} exceeds the teacher's "
                          f"embedding width {e.shape[1]}; turn init_from_teacher off or narrow the student")
    mean = e.mean(0)
    _, _, vh = torch.linalg.svd(e - mean, full_matrices=False)
    basis = vh[:d_model].T
    # SVD fixes each singular vector only up to its sign: make each one's largest entry positive.
    basis = basis * torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d_model, d_model, generator=gen, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))  # Haar-distributed (the sign fix makes QR unique)
    basis = basis @ rotation
    return EmbeddingProjection(((e - mean) @ basis).float(), basis.float(), mean.float())


def cached_projection(teacher: Any, which: str, d_model: int, seed: int,
                      cache_dir: str | os.PathLike | None = None) -> EmbeddingProjection:
    """embedding_projection of the teacher's "input" or "output" embedding matrix, computed once and cached
    (keyed by the teacher's fingerprint and dtype, the matrix, d_model, seed and VERSION)."""
    from safetensors.torch import load_file, save_file

    from teachers.loading import cache_root

    matrix = _teacher_matrix(teacher, which)
    key = f"{teacher.fingerprint}|{matrix.dtype}|{which}|{d_model}|{seed}|v{VERSION}"
    name = f"{teacher.fingerprint[:16]}-{which}-d{d_model}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    path = cache_root(cache_dir) / "inherit" / f"{name}.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        return EmbeddingProjection(saved["coords"], saved["basis"], saved["mean"])
    proj = embedding_projection(matrix, d_model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    save_file({"coords": proj.coords.contiguous(), "basis": proj.basis.contiguous(), "mean": proj.mean}, tmp)
    os.replace(tmp, path)  # concurrent writers write the same bytes; a killed one leaves only a temp file
    log.info("init_from_teacher: cached the %s embedding projection (d=%d) in %s", which, d_model, path)
    return proj


def _teacher_matrix(teacher: Any, which: str) -> torch.Tensor:
    model = teacher.model
    layer = model.get_input_embeddings() if which == "input" else model.get_output_embeddings()
    return layer.weight


def teacher_projections(teacher: Any, d_model: int, seed: int,
                        cache_dir: str | os.PathLike | None = None) -> dict[str, EmbeddingProjection]:
    """{"input": projection of the input embedding, "output": of the output embedding (the same object when
    the teacher ties them)}."""
    inp = cached_projection(teacher, "input", d_model, seed, cache_dir)
    tied = _teacher_matrix(teacher, "input").data_ptr() == _teacher_matrix(teacher, "output").data_ptr()
    return {"input": inp, "output": inp if tied else cached_projection(teacher, "output", d_model, seed, cache_dir)}


@torch.no_grad()
def init_student_from_teacher(student: Any, projections: dict[str, EmbeddingProjection],
                              teacher_ids: torch.Tensor | None = None) -> dict[str, float]:
    """Overwrite a fresh SpikeGPT student's embedding and LM head from the teacher's projections (in place).

    student.emb.weight [V, d] = input coords scaled to std config.initializer_range; student.lm_head.weight
    [V, d] = output coords with unit-norm rows. The std is that of the whole teacher vocabulary's coords.

    teacher_ids: None when the student has the teacher's vocabulary; for one derived from it (student.vocab =
    subset:N | bytes), LongTensor [V_s], the teacher id of each student token: student row i is then the
    row teacher token teacher_ids[i] gets in a student with the teacher's whole vocabulary (the PCA is of the
    whole teacher matrix). Rows with id -1 (bytes the teacher's tokenizer lacks) have no teacher row: they
    keep the student's own fresh initialisation (its head rows rescaled to unit norm like every other row),
    since the teacher gives those bytes zero mass and training text never holds them.
    Returns stats for the log: the embedding's spike rate (share of entries >= 0) and the mean row norm of the
    head. Raises ConfigError when the projections do not fit the student.
    """
    emb, head = projections["input"].coords, projections["output"].coords
    rows = torch.arange(emb.shape[0]) if teacher_ids is None else teacher_ids.long()
    fits = (emb.shape[1] == head.shape[1] == student.emb.weight.shape[1] and emb.shape[0] == head.shape[0]
            and rows.shape == student.emb.weight.shape[:1] and int(rows.max()) < emb.shape[0])
    if not fits:
        raise ConfigError(f"student.init_from_teacher: teacher projections {tuple(emb.shape)} / {tuple(head.shape)}"
                          f" do not fit the student's embedding {tuple(student.emb.weight.shape)}")
    known = rows >= 0
    scale = student.config.initializer_range / emb.std()
    student.emb.weight[known] = (emb[rows[known]] * scale).to(student.emb.weight.dtype)
    student.lm_head.weight[known] = head[rows[known]].to(student.lm_head.weight.dtype)
    student.lm_head.weight.copy_(torch.nn.functional.normalize(student.lm_head.weight, dim=1))
    return {"emb_spike_rate": float((student.emb.weight >= 0).float().mean()),
            "head_row_norm": float(student.lm_head.weight.norm(dim=1).mean())}


@torch.no_grad()
def init_ea_projection(ea_proj: torch.nn.Linear, student: Any, teacher_embedding: torch.Tensor) -> float:
    """Set EA's projection (Linear d -> C_t, with bias) to the least-squares map from the student's embedding
    output (what SpADLoss's EA term reads: the binary spikes of emb, or emb itself) to the teacher's embedding
    rows [V, C_t], over the whole vocabulary. Returns the share of E's variance it explains (R^2)."""
    out = student.emb.weight.detach().to("cpu", torch.float32)
    if student.config.binary_embedding:
        out = (out >= 0).float()
    target = teacher_embedding.detach().to("cpu", torch.float64)
    design = torch.cat([out.double(), torch.ones(out.shape[0], 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target).solution  # [d + 1, C_t]
    ea_proj.weight.copy_(solution[:-1].T.float())
    ea_proj.bias.copy_(solution[-1].float())
    residual = design @ solution - target
    return float(1.0 - residual.pow(2).sum() / (target - target.mean(0)).pow(2).sum())
