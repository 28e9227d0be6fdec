"""Divergences against a *sparse* teacher signal: the top-k of the teacher with a tail bucket, or sampled tokens.

A cached teacher (``kdlm cache-teacher``, :mod:`kdlm.cache`) stores, per response token, a few token ids with
target log-probabilities instead of the full distribution p over V tokens. Every divergence of
:data:`kdlm.losses.DIVERGENCES` is then evaluated on *collapsed* distributions over the m stored ids plus one
**tail bucket** (all other tokens together):

* teacher p̃ = (p̃_1 … p̃_m, p̃_tail): the stored log-probs and the stored log tail mass;
* student q̃ = (q_{id_1} … q_{id_m}, 1 − Σ_j q_{id_j}): the student's full-softmax probabilities gathered at the
  stored ids, and everything else lumped into the tail bucket, computed exactly as a log-sum-exp over the other
  V − m logits (no 1 − Σ cancellation).

``topk`` (the k most likely teacher tokens + their exact tail mass): with k = V the tail is empty on both sides
and every divergence equals the dense one. With k < V the divergence of the collapsed distributions is a lower
bound of the dense one (data processing inequality for f-divergences; TVD likewise), and its gradient treats
the tail as one token: the student is taught the tail's total mass, not its shape. This is the "tail bucket".

``sampled`` (Sparse Logit Sampling, Anshumann et al., ACL 2025, arXiv 2503.16870, random-sampling KD): K tokens
are drawn from p with replacement and stored with their counts c; the estimate p̂_i = c_i/K has E[p̂_i] = p_i.
Optionally the teacher's top t tokens are stored exactly and the K draws come from p restricted to the other
tokens; then p̂_i = (1 − Σ_top p)·c_i/K for drawn ids, again E[p̂_i] = p_i. The estimate sums to one, so the
teacher's tail bucket is empty. For the forward KL the gradient with respect to the student logits is q − p̂,
whose expectation is the dense gradient q − p: **unbiased** (the paper's point, and what the tests check).
For the other divergences the plug-in is a consistent but biased estimate; reverse KL and AKL (which contains
it) put weight on q·log(q/p̂) where p̂ = 0 and are refused for sampled caches (use a top-k cache).

The payload
-----------
The fused chunked loss hands each chunk's teacher rows to the divergence unchanged, so a sparse teacher travels
as one float32 tensor of rows ``[N, 2m + 1]``: ``m`` ids (exact as float32 up to 2**24 tokens), ``m`` target
log-probs (−inf = empty slot), one log tail mass (−inf = no tail). :func:`pack_payload` / :func:`unpack_payload`
convert; :func:`sparse_divergence` is the per-token function with the divergences' signature.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from kdlm import registry
from kdlm.losses.divergences import resolve_divergence

Tensor = torch.Tensor

_MAX_EXACT_ID = 2**24  # float32 represents every integer up to here exactly
# Divergences whose plug-in value is infinite-ish where the sampled estimate has no mass (q·log(q/0)).
NEEDS_TEACHER_SUPPORT = tuple(name for name, spec in registry.DIVERGENCES.items() if spec.needs_teacher_support)


def pack_payload(ids: Tensor, logp: Tensor, tail_logp: Tensor) -> Tensor:
    """Rows ``[N, 2m + 1]`` float32 from ids ``[N, m]`` (integer), log-probs ``[N, m]`` and tail ``[N]``.

    Empty slots have ``logp = -inf``; their id must still be a valid token id (e.g. a copy of the row's first).
    """
    if ids.shape != logp.shape or ids.dim() != 2 or tail_logp.shape != ids.shape[:1]:
        raise ValueError(f"pack_payload: ids {tuple(ids.shape)}, logp {tuple(logp.shape)}, tail {tuple(tail_logp.shape)}")
    if ids.numel() and int(ids.max()) >= _MAX_EXACT_ID:
        raise ValueError(f"pack_payload: token ids must be < 2**24 to travel exactly as float32, got {int(ids.max())}")
    return torch.cat([ids.float(), logp.float(), tail_logp.float().unsqueeze(-1)], dim=-1)


class TeacherSignal(Protocol):
    """Where a run's sparse teacher signal comes from instead of a live teacher forward: the offline cache
    (:class:`kdlm.cache.TeacherCache`, from disk) or a served teacher (:class:`kdlm.teacher_server.ServedTeacher`,
    from a vLLM server). Both give the same payload for the same top-k signal, so the loss cannot tell them apart."""

    def check_items(self, items: list, what: str = "training data") -> None:
        """Refuse (a KdlmError naming the example) any example this source cannot give a signal for."""
        ...

    def payload(self, batch: dict) -> Tensor:
        """Payload rows (:func:`pack_payload`) of every response token of a right-padded batch, in
        :func:`kdlm.data.format.response_positions` order, on the batch's device."""
        ...


def unpack_payload(payload: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids [.., m] long, logp [.., m] float32, tail_logp [..] float32)`` from payload rows ``[.., 2m + 1]``."""
    width = (payload.shape[-1] - 1) // 2
    if payload.shape[-1] != 2 * width + 1 or width < 1:
        raise ValueError(f"a sparse teacher payload has 2m + 1 columns, got {payload.shape[-1]}")
    return payload[..., :width].long(), payload[..., width:2 * width].float(), payload[..., 2 * width].float()


def collapse_logprobs(logp: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Log-probs ``[.., m + 1]``: ``logp`` [.., V] at ``ids`` (−inf where not ``valid``), then the bucket of the rest.

    The bucket is log Σ over every token not among the *valid* ids, computed as a log-sum-exp with those ids masked
    out (exact in float32 even when the ids hold almost all the mass). Invalid slots may hold any id: they are
    neither gathered nor masked (a token listed twice is masked once). Differentiable in ``logp``.
    """
    gathered = torch.where(valid, logp.gather(-1, ids), float("-inf"))
    listed = torch.zeros_like(logp, dtype=torch.int32).scatter_add_(-1, ids, valid.to(torch.int32)) > 0
    tail = torch.logsumexp(logp.masked_fill(listed, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([gathered, tail], dim=-1)


def collapse_student(student_logits: Tensor, ids: Tensor, valid: Tensor, temperature: float = 1.0) -> Tensor:
    """Student log-probs ``[.., m + 1]``: log softmax(z/τ) collapsed onto the valid ``ids`` + the tail bucket
    (:func:`collapse_logprobs`). Differentiable in ``student_logits``."""
    return collapse_logprobs(torch.log_softmax(student_logits.float() / temperature, dim=-1), ids, valid)


def collapse_teacher(logp: Tensor, tail_logp: Tensor) -> Tensor:
    """Teacher log-probs ``[.., m + 1]``: the stored ones and the tail bucket."""
    return torch.cat([logp, tail_logp.unsqueeze(-1)], dim=-1)


def sparse_divergence(
    student_logits: Tensor,
    teacher_payload: Tensor,
    *,
    temperature: float = 1.0,
    aux: dict | None = None,
    base: str | Callable[..., Tensor] = "fkl",
    base_params: dict[str, Any] | None = None,
) -> Tensor:
    """Per-token ``D(p̃ ‖ q̃)`` of the collapsed distributions (module doc), D any divergence of the library.

    ``student_logits`` [N, V]; ``teacher_payload`` [N, 2m + 1] (see :func:`pack_payload`), holding log-probs already
    at the cache's temperature. The student is tempered by ``temperature`` (it must equal the cache's), then the
    divergence runs on the (m + 1)-way log-probs at τ = 1: they are normalised, so its log-softmax changes nothing.
    """
    fn, params = resolve_divergence(base, dict(base_params or {}))
    ids, logp, tail = unpack_payload(teacher_payload)
    valid = logp > float("-inf")
    student = collapse_student(student_logits, ids, valid, temperature)
    teacher = collapse_teacher(logp, tail)
    return fn(student, teacher, temperature=1.0, aux=aux, **params)


# --------------------------------------------------------------------------------------------------
# Building the signal from the teacher's log-probs (used by the cache writer and the tests).
# --------------------------------------------------------------------------------------------------


def topk_signal(teacher_logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k most likely tokens: ``(ids [N, k], logp [N, k], tail_logp [N])`` from log-probs ``[N, V]``.

    ``tail_logp`` = log Σ_{v ∉ top-k} p_v, a log-sum-exp over the rest (−inf when k = V).
    """
    k = min(int(k), teacher_logp.shape[-1])
    logp, ids = teacher_logp.float().topk(k, dim=-1)
    tail = torch.logsumexp(teacher_logp.float().scatter(-1, ids, float("-inf")), dim=-1)
    return ids, logp, tail


def sampled_signal(
    teacher_logp: Tensor, samples: int, uniforms: Tensor, top: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random-sampling KD's signal from log-probs ``[N, V]``.

    ``uniforms`` [N, samples] in [0, 1) drive inverse-CDF draws (so the caller owns the randomness, e.g. one
    seeded generator per example, and the draws do not depend on batching or device). With ``top`` = t > 0 the t
    most likely tokens are kept exactly and the draws come from p restricted to the others.

    Returns ``(ids [N, samples], counts [N, samples] (0 = empty slot), top_ids [N, t], top_logp [N, t],
    rest_logp [N])``: distinct drawn ids with their counts (left-aligned; empty slots repeat the row's first id),
    and log of the mass the draws stand for (0 when t = 0).
    """
    p = teacher_logp.double().exp()
    n = p.shape[0]
    if top > 0:
        top_logp, top_ids = teacher_logp.float().topk(top, dim=-1)
        p = p.scatter(-1, top_ids, 0.0)
        rest_logp = torch.logsumexp(teacher_logp.float().scatter(-1, top_ids, float("-inf")), dim=-1)
    else:
        top_ids = torch.zeros(n, 0, dtype=torch.long, device=p.device)
        top_logp = torch.zeros(n, 0, dtype=torch.float32, device=p.device)
        rest_logp = torch.zeros(n, dtype=torch.float32, device=p.device)
    cdf = p.cumsum(-1)
    total = cdf[:, -1:]
    u = uniforms.to(device=p.device, dtype=torch.float64) * total
    draws = torch.searchsorted(cdf, u, right=True).clamp_max(p.shape[-1] - 1)
    # A draw can land on a zero-probability token only through rounding at the end of the CDF: move it back to
    # the last token with mass.
    last_nonzero = (p > 0).long().cumsum(-1).argmax(-1, keepdim=True)
    draws = torch.where(p.gather(-1, draws) > 0, draws, last_nonzero)
    ordered = draws.sort(dim=-1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = new.long().cumsum(-1) - 1
    counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
    ids = ordered[:, :1].expand_as(ordered).clone().scatter_(-1, slot, ordered)
    return ids, counts, top_ids, top_logp, rest_logp


def sampled_targets(
    ids: Tensor, counts: Tensor, top_ids: Tensor, top_logp: Tensor, rest_logp: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, logp, tail_logp)`` of the unbiased estimate p̂: top tokens exact, drawn ids (rest mass)·c/K.

    The estimate sums to one, so the tail is empty (−inf).
    """
    k = counts.sum(-1, keepdim=True).clamp_min(1).float()
    drawn = torch.where(counts > 0, rest_logp.float().unsqueeze(-1) + torch.log(counts.float() / k), float("-inf"))
    all_ids = torch.cat([top_ids.long(), ids.long()], dim=-1)
    all_logp = torch.cat([top_logp.float(), drawn], dim=-1)
    return all_ids, all_logp, torch.full_like(rest_logp.float(), float("-inf"))


def dense_payload(teacher_logp: Tensor) -> Tensor:
    """The whole distribution as a payload (k = V): the sparse path then equals the dense one."""
    ids, logp, tail = topk_signal(teacher_logp, teacher_logp.shape[-1])
    return pack_payload(ids, logp, tail)


def bytes_per_token(mode: str, *, k: int = 0, samples: int = 0, top: int = 0, id_bytes: int = 2, value_bytes: int = 2) -> float:
    """Bytes on disk per response token of a cache signal (without the per-example index)."""
    if mode == "topk":
        return k * (id_bytes + value_bytes) + value_bytes
    return samples * (id_bytes + 1) + top * (id_bytes + value_bytes) + (value_bytes if top else 0)


__all__ = [
    "NEEDS_TEACHER_SUPPORT",
    "TeacherSignal",
    "bytes_per_token",
    "collapse_logprobs",
    "collapse_student",
    "collapse_teacher",
    "dense_payload",
    "pack_payload",
    "sampled_signal",
    "sampled_targets",
    "sparse_divergence",
    "topk_signal",
    "unpack_payload",
]
