"""Masking and normalisation: the one place where per-token values become a loss.

Convention (METHODS.md, DESIGN.md principle 3): a loss is a *sum* over response tokens divided by a
token count. By default the count is the number of masked tokens in the batch at hand; under gradient
accumulation or several processes the training loop passes ``num_tokens`` = the number of response
tokens in the whole global batch, so that summing the micro-batch losses gives the global masked mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kdlm.losses.divergences import resolve_divergence, token_nll

Tensor = torch.Tensor


@dataclass
class KDTerms:
    """Sums over one (micro-)batch, ready to be normalised and mixed by the training loop.

    divergence_sum: differentiable Σ over masked tokens of the per-token divergence.
    ce_sum: differentiable Σ over tokens with a valid label (≠ −100) of −log q(label) (τ = 1); 0 if no labels.
    count: number of masked tokens (int64, 0-dim).
    ce_count: number of valid labels (int64, 0-dim).
    aux: detached float32 0-dim sums over masked tokens of per-token diagnostics; AKL adds
        ``akl_head_weight`` and ``akl_tail_weight`` (divide by ``count`` for the mean weights).
    loss_sum: with ``kd_ratio`` = r, the differentiable (1 − r)·ce_sum + r·divergence_sum; else None.
    """

    divergence_sum: Tensor
    ce_sum: Tensor
    count: Tensor
    ce_count: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    loss_sum: Tensor | None = None


def normalize(total: Tensor, count: Tensor | int, num_tokens: Tensor | int | None = None) -> Tensor:
    """``total / num_tokens`` if given, else ``total / count``; a zero denominator counts as 1.

    An all-masked batch thus gives exactly 0 with a zero gradient.
    """
    denominator = count if num_tokens is None else num_tokens
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(device=total.device, dtype=torch.float32).clamp_min(1.0)
    else:
        denominator = float(max(denominator, 1))
    return total / denominator


def kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    labels: Tensor | None = None,
    divergence: str | Callable[..., Tensor] = "fkl",
    temperature: float = 1.0,
    *,
    kd_ratio: float | None = None,
    label_weights: Tensor | None = None,
    **params,
) -> KDTerms:
    """Dense twin of :func:`kdlm.losses.fused_kd_terms`, for logits already materialised.

    With ``kd_ratio`` = r (needs ``labels``), ``loss_sum`` = (1 − r)·ce_sum + r·divergence_sum.

    ``student_logits``/``teacher_logits`` [..., V], ``mask`` [...] (true = response token),
    ``labels`` [...] long with −100 = ignore. Per-token values are computed on masked rows only.
    """
    fn, full_params = resolve_divergence(divergence, params)
    mask = mask.bool()
    vocab = student_logits.shape[-1]
    student_rows = student_logits.reshape(-1, vocab)[mask.reshape(-1)]
    teacher_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])[mask.reshape(-1)]
    aux_tokens: dict[str, Tensor] = {}
    values = fn(student_rows, teacher_rows, temperature=temperature, aux=aux_tokens, **full_params)
    count = mask.sum()
    if labels is not None:
        valid = labels.reshape(-1) != -100
        nll = token_nll(student_logits.reshape(-1, vocab)[valid], labels.reshape(-1)[valid])
        if label_weights is not None:  # per-token weights of the cross-entropy (see fused_kd_terms)
            nll = nll * label_weights.reshape(-1)[valid].float()
        ce_sum = nll.sum()
        ce_count = valid.sum()
    else:
        ce_sum = student_logits.new_zeros((), dtype=torch.float32)
        ce_count = torch.zeros((), dtype=torch.int64, device=count.device)
    aux = {key: value.detach().float().sum() for key, value in aux_tokens.items()}
    divergence_sum = values.sum()
    loss_sum = None
    if kd_ratio is not None:
        if labels is None:
            raise ValueError("kd_terms: kd_ratio mixes in cross-entropy, so it needs labels")
        loss_sum = (1.0 - kd_ratio) * ce_sum + kd_ratio * divergence_sum
    return KDTerms(divergence_sum, ce_sum, count, ce_count, aux, loss_sum=loss_sum)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    divergence: str | Callable[..., Tensor] = "fkl",
    temperature: float = 1.0,
    *,
    num_tokens: Tensor | int | None = None,
    **params,
) -> Tensor:
    """Masked mean of ``DIVERGENCES[divergence]`` over positions where ``mask`` is true.

    With ``num_tokens`` the result is Σ over masked positions / ``num_tokens`` (global normalisation).
    All positions masked out → 0.0 with a zero, finite gradient.
    """
    terms = kd_terms(student_logits, teacher_logits, mask, None, divergence, temperature, **params)
    return normalize(terms.divergence_sum, terms.count, num_tokens)
