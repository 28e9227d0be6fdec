"""Per-token divergences between a teacher distribution p and a student distribution q.

Every function here maps ``(student_logits [..., V], teacher_logits [..., V])`` to per-token values
``[...]`` in float32 (whatever the input dtype), with p = softmax(teacher_logits / T) and
q = softmax(student_logits / T). Each divergence is written exactly once, in this file; the dense
reducer (:func:`kdlm.losses.distill_loss`), the fused chunked path (:mod:`kdlm.losses.fused`) and every
other caller go through :data:`DIVERGENCES`. Gradients come from autograd on these functions.

Formulas, directions and sources: ``docs/losses.md`` (and ``shared/docs/METHODS.md``).

Numerics
--------
* log-probabilities are floored at ``LOG_FLOOR = log(2**-149)`` (the log of the smallest positive
  float32, so the floor only touches entries whose probability is already 0 in float32, e.g. −inf
  logits of a padded vocabulary). The floor is *straight-through*: the value is floored, the gradient
  passes unchanged, so a student log-prob below the floor still gets its exact gradient.
  Consequences: 0·log 0 terms are 0, ``KL(q‖p)`` with a teacher-only −inf entry is large but finite,
  and no NaN appears in values or gradients.
* mixtures (JSD, skew KL) are formed in probability space with ``torch.lerp`` and floored at the
  smallest positive float32 before the log.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from kdlm import registry

Tensor = torch.Tensor

# log of the smallest positive (subnormal) float32, 2**-149.
LOG_FLOOR: float = -149.0 * math.log(2.0)
_TINY: float = 2.0**-149


class _StraightThroughFloor(torch.autograd.Function):
    """``max(x, LOG_FLOOR)`` in the value, identity in the gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: D102
        return x.clamp_min(LOG_FLOOR)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        return grad


def _floor_log(x: Tensor) -> Tensor:
    if x.requires_grad:
        return _StraightThroughFloor.apply(x)
    return x.clamp_min(LOG_FLOOR)


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """float32 ``log_softmax(logits / temperature)`` with the straight-through floor (see module doc)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return _floor_log(torch.log_softmax(x, dim=-1))


def _kl(log_a: Tensor, log_b: Tensor, a: Tensor | None = None) -> Tensor:
    """Σ_v a·(log a − log b) over the last dim, for floored log-probabilities (so a > 0, finite logs).

    ``a`` = exp(log_a) when the caller already has it (saves a pass over V)."""
    if a is None:
        a = log_a.exp()
    return (a * (log_a - log_b)).sum(-1)


def _log_mixture(a: Tensor, b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a·a + (1 − weight_a)·b) of probabilities, floored at the smallest positive float32."""
    return torch.log(torch.lerp(b, a, weight_a).clamp_min(_TINY))


# --------------------------------------------------------------------------------------------------
# The divergences. Each takes log-probabilities internally; the public wrappers below take logits.
# --------------------------------------------------------------------------------------------------


def _fkl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    return _kl(teacher_logp, student_logp)


def _rkl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    return _kl(student_logp, teacher_logp)


def _jsd(teacher_logp: Tensor, student_logp: Tensor, beta: float) -> Tensor:
    if beta == 0.0:  # exact endpoints, not a limit through a mixture with a zero weight
        return _fkl(teacher_logp, student_logp)
    if beta == 1.0:
        return _rkl(teacher_logp, student_logp)
    p, q = teacher_logp.exp(), student_logp.exp()
    log_m = _log_mixture(p, q, beta)  # m = β·p + (1 − β)·q
    return beta * _kl(teacher_logp, log_m, p) + (1.0 - beta) * _kl(student_logp, log_m, q)


def _tvd(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def _skew_fkl(teacher_logp: Tensor, student_logp: Tensor, alpha: float) -> Tensor:
    # KL(p ‖ α·p + (1 − α)·q)
    p = teacher_logp.exp()
    return _kl(teacher_logp, _log_mixture(p, student_logp.exp(), alpha), p)


def _skew_rkl(teacher_logp: Tensor, student_logp: Tensor, alpha: float) -> Tensor:
    # KL(q ‖ (1 − α)·p + α·q)
    q = student_logp.exp()
    return _kl(student_logp, _log_mixture(teacher_logp.exp(), q, 1.0 - alpha), q)


# How many of the teacher's top tokens AKL looks at first. For LLM teachers the top-64 mass is almost
# always above μ, so the head is found in them; other rows go through _head_abs_diff (no full sort).
_AKL_TOPK = 64
# Value bins for _head_abs_diff, and the log-probability span they cover below the row's maximum (tokens
# further down share the last bin, which stays exact, just possibly less selective).
_AKL_BINS = 4096
_AKL_SPAN = 30.0


def _head_abs_diff(p: Tensor, teacher_logp: Tensor, abs_diff: Tensor, mu: float) -> Tensor:
    """Σ over AKL's head of |p − q| for rows ``[r, V]``, exactly as if every row were sorted, without sorting.

    Bin the tokens by log p (bin 0 = the largest p; the binning is monotone, so every token of a lower bin has a
    larger p than every token of a higher one). Whole bins whose cumulative mass stays ≤ μ are head; only the
    one bin where the cumulative mass crosses μ is sorted (a top-k over its few tokens) to place the boundary
    token by token. The top-1 token is always head.
    """
    rows = p.shape[0]
    hi = teacher_logp.max(-1, keepdim=True).values
    lo = torch.maximum(teacher_logp.min(-1, keepdim=True).values, hi - _AKL_SPAN)
    scale = _AKL_BINS / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    bins = ((hi - teacher_logp.clamp_min(lo)) * scale).long().clamp_(0, _AKL_BINS - 1)
    cum_mass = p.new_zeros(rows, _AKL_BINS).scatter_add_(1, bins, p).cumsum(-1)
    cum_diff = p.new_zeros(rows, _AKL_BINS).scatter_add_(1, bins, abs_diff).cumsum(-1)
    crossing = (cum_mass <= mu).sum(-1, keepdim=True).clamp_max(_AKL_BINS - 1)
    has_prev = crossing > 0
    previous = (crossing - 1).clamp_min(0)
    base_mass = torch.where(has_prev, cum_mass.gather(-1, previous), 0.0)
    base_diff = torch.where(has_prev, cum_diff.gather(-1, previous), 0.0).squeeze(-1)
    in_bin = bins == crossing
    k = int(in_bin.sum(-1).max())
    values, index = torch.where(in_bin, p, -1.0).topk(k, dim=-1)  # the crossing bin, sorted descending
    take = (values >= 0) & (base_mass + values.clamp_min(0).cumsum(-1) <= mu)
    take[:, 0] |= ~has_prev.squeeze(-1)  # the top-1 token is head even when its own mass exceeds μ
    return base_diff + (abs_diff.gather(-1, index) * take).sum(-1)


def _akl_weights(teacher_logp: Tensor, student_logp: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """AKL's detached head and tail weights g_head/(g_head+g_tail), g_tail/(g_head+g_tail).

    Head (AKL.py ``get_ratio``): sort p descending; the top-1 token plus every token whose cumulative
    teacher mass, itself included, is ≤ μ. g = Σ |p − q| over the head / the tail, q detached.
    """
    with torch.no_grad():
        teacher_logp = teacher_logp.detach()
        p = teacher_logp.exp()
        q = student_logp.detach().exp()
        abs_diff = (p - q).abs()
        total = abs_diff.sum(-1)
        vocab = p.shape[-1]
        k = min(_AKL_TOPK, vocab)
        top_p, top_idx = p.topk(k, dim=-1, sorted=True)
        cum = top_p.cumsum(-1)
        head = cum <= mu
        head[..., 0] = True
        g_head = (abs_diff.gather(-1, top_idx) * head).sum(-1)
        # Rows whose head may extend beyond the top-k (top-k mass ≤ μ) are redone over the whole vocabulary.
        incomplete = cum[..., -1] <= mu
        if k < vocab and bool(incomplete.any()):
            g_head = g_head.clone()
            g_head[incomplete] = _head_abs_diff(
                p[incomplete], teacher_logp[incomplete], abs_diff[incomplete], mu
            )
        g_tail = (total - g_head).clamp_min(0.0)
        denom = (g_head + g_tail).clamp_min(torch.finfo(torch.float32).tiny)
        return g_head / denom, g_tail / denom


def _akl(teacher_logp: Tensor, student_logp: Tensor, mu: float, aux: dict | None = None) -> Tensor:
    w_head, w_tail = _akl_weights(teacher_logp, student_logp, mu)
    if aux is not None:
        aux["akl_head_weight"] = w_head
        aux["akl_tail_weight"] = w_tail
    return w_head * _fkl(teacher_logp, student_logp) + w_tail * _rkl(teacher_logp, student_logp)


# --------------------------------------------------------------------------------------------------
# Public per-token functions: (student_logits, teacher_logits, *, temperature, **params) -> [...]
# The optional ``aux`` dict receives detached per-token diagnostics (only AKL writes any).
# --------------------------------------------------------------------------------------------------


def fkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
        aux: dict | None = None) -> Tensor:
    """Forward KL, KL(p‖q) = Σ p·(log p − log q) (true KL, teacher entropy included). Word-level KD."""
    return _fkl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def rkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
        aux: dict | None = None) -> Tensor:
    """Reverse KL, KL(q‖p) = Σ q·(log q − log p)."""
    return _rkl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5,
        aux: dict | None = None) -> Tensor:
    """Generalized JSD (GKD): β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q.

    β = 0 is exactly :func:`fkl`, β = 1 exactly :func:`rkl` (dispatched, not a limit).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    return _jsd(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature), beta)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
        aux: dict | None = None) -> Tensor:
    """Total variation distance, ½·Σ |p − q|."""
    return _tvd(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def skew_fkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
             alpha: float = 0.1, aux: dict | None = None) -> Tensor:
    """Skew forward KL (DistiLLM): KL(p ‖ α·p + (1−α)·q)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew_fkl: alpha must be in [0, 1], got {alpha}")
    return _skew_fkl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature), alpha)


def skew_rkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
             alpha: float = 0.1, aux: dict | None = None) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ (1−α)·p + α·q)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew_rkl: alpha must be in [0, 1], got {alpha}")
    return _skew_rkl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature), alpha)


def akl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mu: float = 0.5,
        aux: dict | None = None) -> Tensor:
    """Adaptive KL (Wu et al. 2025): w_head·KL(p‖q) + w_tail·KL(q‖p), weights detached.

    If ``aux`` is a dict, the per-token weights are stored in it under ``akl_head_weight`` and
    ``akl_tail_weight`` (detached float32 tensors shaped like the output).
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"akl: mu must be in [0, 1], got {mu}")
    return _akl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature), mu, aux)


# Every divergence named in kdlm.registry.DIVERGENCES is the function of that name in this module; its parameters
# and their defaults are the table's.
DIVERGENCES: dict[str, Callable[..., Tensor]] = {name: globals()[name] for name in registry.DIVERGENCES}

DEFAULT_PARAMS: dict[str, dict[str, float]] = {name: dict(spec.params) for name, spec in registry.DIVERGENCES.items()}


def resolve_divergence(
    name: str | Callable[..., Tensor], params: dict[str, Any]
) -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """The function for ``name`` and its full parameter dict (defaults filled in).

    ``name`` may also be a per-token function with the divergences' signature
    ``fn(student_logits, teacher_logits, temperature=, aux=, **params)`` (e.g. a ``functools.partial`` of
    :func:`kdlm.losses.rlkd_token`); it is returned as is, with ``params``.
    Raises KeyError for an unknown divergence and TypeError, naming the parameter and the divergence,
    for a parameter the divergence does not take.
    """
    if callable(name):
        return name, dict(params)
    if name not in DIVERGENCES:
        raise KeyError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    defaults = DEFAULT_PARAMS[name]
    unknown = [key for key in params if key not in defaults]
    if unknown:
        takes = ", ".join(sorted(defaults)) or "no parameters"
        raise TypeError(f"divergence {name!r} got unexpected parameter {unknown[0]!r} (it takes: {takes})")
    return DIVERGENCES[name], {**defaults, **params}


def token_nll(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-token −log softmax(logits)[label] in float32; 0 where ``labels == ignore_index``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, nll, torch.zeros_like(nll))


__all__ = [
    "DEFAULT_PARAMS", "DIVERGENCES", "LOG_FLOOR", "akl", "fkl", "jsd", "log_probs", "resolve_divergence",
    "rkl", "skew_fkl", "skew_rkl", "token_nll", "tvd",
]
