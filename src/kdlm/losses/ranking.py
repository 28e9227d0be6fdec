"""RLKD ranking loss and peak-alignment metrics, with a differentiable soft rank of our own.

Sources
-------
* Soft rank: M. Blondel, O. Teboul, Q. Berthet, J. Djolonga, "Fast Differentiable Sorting and Ranking",
  ICML 2020 (arXiv 2002.08871). With l2 regularisation of strength ``eps`` the soft rank is the Euclidean
  projection of ``z = ±values / eps`` onto the permutahedron ``P(rho)``, ``rho = (n, n-1, ..., 1)``::

      r(values) = argmin_{mu in P(rho)} 0.5 * ||mu - z||^2

  (Prop. 3 there) ``r = z - v[inverse sort]`` where ``s = sort_desc(z)`` and ``v`` is the non-increasing
  isotonic regression of ``s - rho``. ``v`` is constant (the block mean of ``s - rho``) on the pooled blocks,
  so the Jacobian ``dr/dz = I - (block averaging)`` is exact; forward and backward here are exact (up to
  float rounding), no unrolling or approximation.
* Ranking loss and peak-alignment metrics: Peng & Zhang, "Enhancing Knowledge Distillation of Large
  Language Models through Efficient Multi-Modal Distribution Alignment", COLING 2025 (arXiv 2409.12545),
  RLKD; see ``docs/METHODS.md`` (RLKD section).

Conventions (established against the golden fixture ``rank_k5``, see ``tests/test_ranking.py``)
----------------------------------------------------------------------------------------------
* ``direction="ascending"`` (the default, same as torchsort / fast-soft-sort's default): as
  ``regularization_strength -> 0`` the smallest value gets rank 1 and the largest rank ``n``.
  ``"descending"`` gives the largest value rank 1; ``rank_desc = n + 1 - rank_asc`` exactly (the
  permutahedron is symmetric under ``mu -> (n+1) - mu``), so the Pearson correlation in the ranking loss does
  not depend on the direction.
* Ties: tied inputs are always pooled into the same isotonic block, so they get exactly equal soft ranks
  (for any strength; in the hard limit, the average of the ranks they share) and equal gradients. Blocks
  are pooled only on a strict violation; at the measure-zero points where two adjacent blocks have equal
  means the map is not differentiable and the backward uses the unpooled Jacobian (one valid choice).
* Ranking loss: ranks are of the raw LOGITS (the soft rank is shift- but not scale-invariant, so logits and
  log-probs give the same ranks, probabilities would not), over ``U = topk(teacher) ∪ topk(student)`` per
  position with duplicates removed (``k <= |U| <= 2k``); both soft ranks use the same strength; Pearson is
  computed per position (centre, normalise, dot) over ``U`` only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "soft_rank",
    "ranking_loss",
    "rlkd_token",
    "topk_overlap",
    "peak_alignment_metrics",
    "peak_alignment_tokens",
]

_DIRECTIONS = ("ascending", "descending")


# ---------------------------------------------------------------------------------------------------------
# Soft rank (projection onto the permutahedron by isotonic regression)
# ---------------------------------------------------------------------------------------------------------


def _isotonic_blocks(y: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
    """Non-increasing isotonic regression (uniform weights, squared loss) of every row of ``y`` [R, n].

    Only the first ``length[r]`` entries of row ``r`` are used; the rest are padding. Returns ``(v, block)``:
    the fitted values (padding gets 0) and a block id per entry (entries with equal id were pooled; each
    padding entry is a block of its own).

    Pool-adjacent-violators, vectorised over rows: every pass pools *all* adjacent blocks that violate the
    order (previous mean < next mean) at once. That is a valid PAV schedule: pooling two violators gives a
    mean between theirs, so a chain of violators stays violating while it is pooled pair by pair, and PAV's
    result does not depend on the order of the pooling. At most ``n - 1`` passes, usually a few; each is a
    handful of [R, n] tensor ops, with no python loop over rows.
    """
    rows, n = y.shape
    idx = torch.arange(n, device=y.device)
    valid = idx.unsqueeze(0) < length.unsqueeze(1)  # [R, n]
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    y = torch.where(valid, y, zero)
    ones = valid.to(y.dtype)
    start = torch.ones_like(valid)  # start[r, i]: entry i opens a new block
    pad_start = ~valid[:, 1:]
    while True:
        block = torch.cumsum(start.to(torch.long), dim=-1) - 1  # [R, n], ids 0..n-1
        bsum = torch.zeros_like(y).scatter_add_(1, block, y)
        bcnt = torch.zeros_like(y).scatter_add_(1, block, ones)
        mean = (bsum / bcnt.clamp_min(1)).gather(1, block)  # per entry: the mean of its block
        if n < 2:
            break
        # a block start i (>0) violates when the previous block's mean is below its own
        viol = start[:, 1:] & (mean[:, :-1] < mean[:, 1:]) & ~pad_start
        if not bool(viol.any()):
            break
        start[:, 1:] &= ~viol
    return torch.where(valid, mean, zero), block


def _block_mean(g: Tensor, block: Tensor) -> Tensor:
    s = torch.zeros_like(g).scatter_add_(1, block, g)
    c = torch.zeros_like(g).scatter_add_(1, block, torch.ones_like(g))
    return (s / c.clamp_min(1)).gather(1, block)


class _SoftRankFn(torch.autograd.Function):
    """Projection of ``z`` [R, n] onto the permutahedron of (len, ..., 1), rows padded to ``length``."""

    @staticmethod
    def forward(ctx, z: Tensor, length: Tensor) -> Tensor:  # type: ignore[override]
        rows, n = z.shape
        idx = torch.arange(n, device=z.device)
        valid = idx.unsqueeze(0) < length.unsqueeze(1)
        # sort valid entries descending, padding last
        z_key = z.masked_fill(~valid, -math.inf)
        perm = torch.argsort(z_key, dim=-1, descending=True, stable=True)
        s = z.gather(1, perm)
        w = (length.unsqueeze(1) - idx.unsqueeze(0)).to(z.dtype)  # rho sorted descending: len, ..., 1
        v, block = _isotonic_blocks(s - w, length)
        r_sorted = torch.where(valid, s - v, torch.zeros((), dtype=z.dtype, device=z.device))
        r = torch.empty_like(r_sorted).scatter_(1, perm, r_sorted)
        ctx.save_for_backward(perm, block, valid)
        return r

    @staticmethod
    def backward(ctx, grad_r: Tensor):  # type: ignore[override]
        perm, block, valid = ctx.saved_tensors
        g = grad_r.gather(1, perm)
        g = torch.where(valid, g - _block_mean(g, block), torch.zeros((), dtype=g.dtype, device=g.device))
        grad_z = torch.empty_like(g).scatter_(1, perm, g)
        return grad_z, None


def _soft_rank_rows(values: Tensor, length: Tensor | None, strength: float, direction: str) -> Tensor:
    """Soft rank of ``values`` [R, n] where row ``r`` holds ``length[r]`` real entries then padding.

    Padding entries get rank 0 and receive zero gradient; real entries are ranked among themselves only.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if not strength > 0:
        raise ValueError(f"regularization_strength must be > 0, got {strength}")
    rows, n = values.shape
    if length is None:
        length = torch.full((rows,), n, dtype=torch.long, device=values.device)
    # float64 inside for the block sums of the isotonic regression (small tensors), cast back at the end
    work = values.to(torch.float64) if values.dtype != torch.float64 else values
    z = work / strength if direction == "ascending" else -work / strength
    return _SoftRankFn.apply(z, length).to(values.dtype)


def soft_rank(values: Tensor, regularization_strength: float = 1.0, direction: str = "ascending") -> Tensor:
    """Differentiable soft rank with l2 regularisation (Blondel et al., ICML 2020), batched over ``[..., n]``.

    ``soft_rank(x, eps)`` is the Euclidean projection of ``x / eps`` (``-x / eps`` for ``"descending"``) onto
    the permutahedron of ``(1, 2, ..., n)``, i.e. ``argmin_{r in P} 0.5 * ||r - x / eps||^2``. Ranks are
    1-based: with ``direction="ascending"`` (default, torchsort's convention) the largest value tends to rank
    ``n`` as ``eps -> 0``; with ``"descending"`` it tends to rank 1. Soft ranks always sum to
    ``n (n + 1) / 2``; tied values get equal ranks. As ``eps -> infinity`` every rank tends to ``(n + 1) / 2``.

    Forward and backward are exact (isotonic regression by the pooled-block solution; the Jacobian is
    block-wise constant). Computation is done in float64 internally and returned in ``values.dtype``.
    """
    if values.dim() == 0:
        raise ValueError("soft_rank needs at least one dimension")
    shape = values.shape
    n = shape[-1]
    if n == 0:
        return values.clone()
    flat = values.reshape(-1, n)
    if flat.shape[0] == 0:
        return values.clone()
    return _soft_rank_rows(flat, None, float(regularization_strength), direction).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# RLKD ranking loss
# ---------------------------------------------------------------------------------------------------------


def _union_topk(s_idx: Tensor, t_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Per position: indices [..., 2k] of topk(teacher) followed by topk(student), and a validity mask that
    drops the student indices already in the teacher's top-k (the union without duplicates)."""
    dup = (s_idx.unsqueeze(-1) == t_idx.unsqueeze(-2)).any(dim=-1)
    idx = torch.cat([t_idx, s_idx], dim=-1)
    valid = torch.cat([torch.ones_like(dup), ~dup], dim=-1)
    return idx, valid


def _union_rank_correlation(
    student_rows: Tensor,
    teacher_rows: Tensor,
    k: int,
    strength: float,
    top: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Pearson correlation [R] (float64) of the soft ranks of student and teacher logits [R, V] restricted
    to each row's union of top-k indices. ``top`` = (student top-k indices, teacher top-k indices) when the
    caller already has them (the RLKD objective shares one top-k between loss, dynamic weight and metrics)."""
    if top is None:
        with torch.no_grad():
            top = (student_rows.topk(k, dim=-1).indices, teacher_rows.topk(k, dim=-1).indices)
    idx, valid = _union_topk(*top)
    # gather only the [R, 2k] union entries (no copy of whole vocabulary rows)
    s_u = student_rows.gather(1, idx).to(torch.float64)
    t_u = teacher_rows.detach().gather(1, idx).to(torch.float64)
    # move the valid entries first in each row so that padding sits at the end (what _soft_rank_rows wants)
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    s_u = s_u.gather(1, order)
    t_u = t_u.gather(1, order)
    valid = valid.gather(1, order)
    length = valid.sum(-1)
    r_s = _soft_rank_rows(s_u, length, strength, "ascending")
    r_t = _soft_rank_rows(t_u, length, strength, "ascending")
    return _masked_pearson(r_s, r_t, valid)


def _masked_pearson(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Pearson correlation per row of ``a``, ``b`` [R, m] over the entries where ``valid``.

    Degenerate rows: if both rows are constant the correlation is 1 (identical orderings, e.g. a union of
    one token); if exactly one is constant it is 0, with zero gradient.
    """
    vf = valid.to(a.dtype)
    cnt = vf.sum(dim=-1, keepdim=True).clamp_min(1)
    ac = (a - (a * vf).sum(-1, keepdim=True) / cnt) * vf
    bc = (b - (b * vf).sum(-1, keepdim=True) / cnt) * vf
    na2 = (ac * ac).sum(-1)
    nb2 = (bc * bc).sum(-1)
    tiny = torch.finfo(a.dtype).tiny
    a_ok = na2 > tiny
    b_ok = nb2 > tiny
    ok = a_ok & b_ok
    one = torch.ones((), dtype=a.dtype, device=a.device)
    denom = torch.sqrt(torch.where(ok, na2, one)) * torch.sqrt(torch.where(ok, nb2, one))
    rho = torch.where(ok, (ac * bc).sum(-1) / denom, torch.zeros((), dtype=a.dtype, device=a.device))
    return torch.where(~a_ok & ~b_ok, one, rho)


def ranking_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    k: int = 5,
    regularization_strength: float = 1.0,
    *,
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """RLKD ranking loss (Peng & Zhang, COLING 2025, arXiv 2409.12545), soft rank of Blondel et al. 2020.

    Per position ``t`` with ``mask[t]`` set: ``U_t = topk(teacher_logits[t]) ∪ topk(student_logits[t])``
    (a set, ``k <= |U_t| <= 2k``), ``r_s = soft_rank(student_logits[t, U_t])``,
    ``r_t = soft_rank(teacher_logits[t, U_t])`` (l2, strength ``regularization_strength``), and
    ``rho_t = Pearson(r_s, r_t)`` (centre, normalise, dot). Returns ``1 - mean_t rho_t`` over masked
    positions, or, with ``num_tokens``, ``sum_t (1 - rho_t) / max(num_tokens, 1)`` (for a global token
    count, e.g. over all micro-batches and ranks).
    No masked position: returns 0 (connected to the graph, zero gradient).

    Shapes: logits ``[..., V]``, ``mask`` ``[...]`` (nonzero = response token; ``None`` = every position).
    The gradient flows to ``student_logits`` only (the teacher is detached; the top-k selection is
    piecewise constant). Variable union sizes are handled by padding to ``2k`` with a mask, no loop over
    positions. The soft ranks and correlation are computed in float64 and the loss returned in float32
    (or the logits' dtype if that is float64).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    vocab = student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    out_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    teacher_logits = teacher_logits.detach()
    lead = student_logits.shape[:-1]
    if mask is None:
        sel = torch.ones(lead, dtype=torch.bool, device=student_logits.device)
    else:
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(lead)}")
        sel = mask != 0

    rows = sel.reshape(-1).nonzero().squeeze(-1)
    s_rows, t_rows = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if rows.numel() != s_rows.shape[0]:  # copy the selected rows only when some positions are masked out
        s_rows, t_rows = s_rows.index_select(0, rows), t_rows.index_select(0, rows)
    rho = _union_rank_correlation(s_rows, t_rows, k, float(regularization_strength))
    total = (1.0 - rho).sum()
    if num_tokens is None:
        loss = total / max(int(rows.numel()), 1)
    elif isinstance(num_tokens, Tensor):
        loss = total / num_tokens.to(total.dtype).clamp_min(1)
    else:
        loss = total / max(float(num_tokens), 1.0)
    return loss.to(out_dtype)


def rlkd_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    aux: dict[str, Tensor] | None = None,
    base: str = "fkl",
    base_params: dict[str, Any] | None = None,
    k: int = 5,
    rank_weight: float = 2.0,
    regularization_strength: float = 1.0,
    dynamic: bool = False,
) -> Tensor:
    """Per-token RLKD objective (Peng & Zhang, COLING 2025, arXiv 2409.12545), shape ``[...]`` float32::

        rank_weight · (1 − rho_t)  +  w_t · D_base,t

    ``rho_t`` is the Pearson correlation of the soft ranks of the raw logits over the union of both top-k
    sets (exactly the per-token term of :func:`ranking_loss`); ``D_base`` is the divergence ``base`` of
    :data:`kdlm.losses.DIVERGENCES` at ``temperature`` with ``base_params``; ``w_t = 1``, or with
    ``dynamic=True`` the top-k overlap ``|topk(p) ∩ topk(q)| / k`` (no gradient), the paper's dynamic variant.
    Paper defaults: ``rank_weight = 2``, ``k = 5`` on instruction data and 15 on plain text, τ = 1.

    The masked mean of this value is ``rank_weight · ranking_loss + mean(w · D_base)``. It has the signature of
    a divergence, so the dense reducer and the fused chunked path take it as ``divergence=`` (bind the keyword
    arguments with ``functools.partial``): the rank term is then computed from each chunk's logits. One top-k
    per side serves the union, the dynamic weight and the peak-alignment diagnostics written to ``aux``:
    ``rank`` (1 − rho), ``base`` (D_base), ``cr@k`` and ``mor@k`` (see :func:`peak_alignment_metrics`), plus
    the base divergence's own diagnostics.
    """
    from kdlm.losses.divergences import resolve_divergence  # divergences does not import this module

    base_fn, params = resolve_divergence(base, dict(base_params or {}))
    vocab = student_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"rank k must be in [1, {vocab}], got {k}")
    lead = student_logits.shape[:-1]
    s_rows = student_logits.reshape(-1, vocab)
    t_rows = teacher_logits.reshape(-1, vocab).detach()
    with torch.no_grad():
        s_top = s_rows.topk(k, dim=-1).indices
        t_top = t_rows.topk(k, dim=-1).indices
        overlap = (s_top.unsqueeze(-1) == t_top.unsqueeze(-2)).any(dim=-1).sum(dim=-1).to(torch.float32) / k
    rho = _union_rank_correlation(s_rows, t_rows, k, float(regularization_strength), top=(s_top, t_top))
    rank_term = (1.0 - rho).to(torch.float32)
    base_values = base_fn(s_rows, t_rows, temperature=temperature, aux=aux, **params)
    weighted = overlap * base_values if dynamic else base_values
    if aux is not None:
        aux["rank"] = rank_term.detach().reshape(lead)
        aux["base"] = base_values.detach().reshape(lead)
        aux[f"cr@{k}"] = (s_top == t_top).all(dim=-1).to(torch.float32).reshape(lead)
        aux[f"mor@{k}"] = overlap.reshape(lead)
        for key in [key for key in aux if aux[key].shape != lead]:
            aux[key] = aux[key].reshape(lead)
    return (rank_weight * rank_term + weighted).reshape(lead)


# ---------------------------------------------------------------------------------------------------------
# Peak-alignment metrics
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def topk_overlap(student_logits: Tensor, teacher_logits: Tensor, k: int) -> Tensor:
    """``|topk(p) ∩ topk(q)| / k`` per position, shape ``[...]`` (float32, no gradient).

    ``p`` = teacher, ``q`` = student distribution; top-k of the logits equals top-k of the probabilities.
    This is the per-token weight of dynamic RLKD (Peng & Zhang, COLING 2025, arXiv 2409.12545).
    """
    t_idx = teacher_logits.topk(k, dim=-1).indices
    s_idx = student_logits.topk(k, dim=-1).indices
    inter = (s_idx.unsqueeze(-1) == t_idx.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    return inter.to(torch.float32) / k


@torch.no_grad()
def peak_alignment_tokens(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per position ``(cr, mor)`` float32 ``[...]``: 1 where the teacher's and the student's top-k lists are
    identical (order included) else 0, and ``|topk(p) ∩ topk(q)| / k``. See :func:`peak_alignment_metrics`."""
    t_idx = teacher_logits.topk(k, dim=-1).indices
    s_idx = student_logits.topk(k, dim=-1).indices
    same = (t_idx == s_idx).all(dim=-1)
    inter = (s_idx.unsqueeze(-1) == t_idx.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    return same.to(torch.float32), inter.to(torch.float32) / k


@torch.no_grad()
def peak_alignment_metrics(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, k: int
) -> dict[str, float]:
    """Peak-alignment metrics of Peng & Zhang (COLING 2025, arXiv 2409.12545), over masked positions.

    Returns ``{f"cr@{k}": ..., f"mor@{k}": ...}`` (e.g. keys ``"cr@5"``, ``"mor@5"``):

    * ``cr@k`` (consistency rate): share of masked positions where the teacher's and the student's top-k
      token lists are identical, order included (``torch.topk`` sorted by logit, descending).
    * ``mor@k`` (mean overlap ratio): mean over masked positions of ``|topk(p) ∩ topk(q)| / k``.

    ``mask`` nonzero = response token, ``None`` = every position. With no masked position both are NaN.
    """
    lead = student_logits.shape[:-1]
    sel = torch.ones(lead, dtype=torch.bool, device=student_logits.device) if mask is None else mask != 0
    if not bool(sel.any()):
        return {f"cr@{k}": float("nan"), f"mor@{k}": float("nan")}
    cr, mor = peak_alignment_tokens(student_logits[sel], teacher_logits[sel], k)
    return {f"cr@{k}": cr.double().mean().item(), f"mor@{k}": mor.double().mean().item()}
