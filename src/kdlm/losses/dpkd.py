"""DPKD — direct preference knowledge distillation (Li et al., arXiv 2406.19774): token and sequence forms.

DPKD treats the teacher as DPO's reference model: the student's implicit reward for a response y is
``r(y) = β·log(q_θ(y|x) / p(y|x))`` (q = student, p = teacher), and the student is trained to prefer what the
teacher prefers. Two forms are offered (``docs/METHODS.md``, DPKD section):

* **Sequence form** — the paper's objective (Eq. 9). ``y_t`` = a teacher-generated response (chosen), ``y_s`` =
  a student-generated response (rejected), with length-normalised log-ratios::

      r(y) = (1/|y|)·Σ_t [log q(y_t) − log p(y_t)],   L = −log σ(β·(r(y_t) − r(y_s)))

  averaged over pairs: :func:`dpkd_sequence_loss`, metrics :func:`dpkd_sequence_stats`. The paper adds
  ``λ·L_lm``; that term is the caller's (``token_nll``).
* **Token form** — what the reference code trains (github microsoft/LMOps ``dpkd/main.py``, ``get_distil_loss``,
  branch ``seqKD_DPO``): teacher-forced on one response, at each response position t with ``a = argmax p_t``
  (teacher's choice) and ``b = argmax q_t`` (student's choice)::

      h_t = [log q_t(a) − log q_t(b)] − [log p_t(a) − log p_t(b)],   ℓ_t = −log σ(β·h_t)

  masked mean over response positions: :func:`dpkd_token_terms` (per position, any ``[..., V]``, so the
  chunked path can call it on ``[N, V]`` rows), :func:`dpkd_token_loss`, metrics :func:`dpkd_token_stats`.

Conventions (pinned by the golden fixtures ``dpkd_token`` and ``dpkd_seq``, see ``tests/test_dpkd.py``)
------------------------------------------------------------------------------------------------------
* Arithmetic is float32 whatever the input dtype (bfloat16 logits are upcast; the reference runs its
  log-softmax in bfloat16). The sequence form keeps float64 for float64 inputs, so that it can be
  gradient-checked.
* Token form: log-probabilities come from :func:`kdlm.losses.divergences.log_probs` (float32 log-softmax of
  ``logits / temperature``, floored at ``LOG_FLOOR`` straight-through). ``a`` and ``b`` are the argmaxes of
  those same float32 log-probability rows; ties go to the lowest token id (``torch.argmax`` returns the
  first maximal index). The indices are chosen under ``no_grad``: only the gathered log-probs carry gradient.
* The reference sets the student log-probs of −inf logits to 0, which can make a padded token the student's
  argmax; here −inf logits keep their floored log-prob, so they are never an argmax unless the whole row
  is −inf.
* The teacher is the reference model: teacher logits / log-probs are detached.
* Consequence of the definition (not a choice of ours): since ``b`` maximises ``q_t`` and ``a`` maximises
  ``p_t``, both brackets of ``h_t`` have a fixed sign, so ``h_t ≤ 0`` always — exactly, in float arithmetic
  too, because the argmaxes are taken over the very arrays the values are gathered from. Hence
  ``ℓ_t ≥ log 2``, with equality (and an exactly zero gradient) where the student's top-1 token already is
  the teacher's. The gradient w.r.t. the student logits of a row is ``−β·σ(−β·h_t)·(e_a − e_b) / τ``: it
  raises the teacher's top-1 token and lowers the student's own, nothing else. A DPO-style "accuracy"
  (share of ``h_t > 0``) would be identically 0, so the token metrics report top-1 agreement instead.
* Empty masks are errors (a ``ValueError`` naming the argument, and the row for the sequence form), not a
  silent 0: a preference pair or batch without response tokens is a data bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdlm.losses.divergences import log_probs, token_nll

Tensor = torch.Tensor

__all__ = [
    "DPKDSequenceStats",
    "DPKDTokenStats",
    "dpkd_sequence_loss",
    "dpkd_sequence_stats",
    "dpkd_token_loss",
    "dpkd_token_stats",
    "dpkd_token_terms",
    "sequence_logps",
]


def _check_beta(beta: float) -> None:
    # β ≤ 0 would turn the preference around (or make the loss a constant log 2).
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


# --------------------------------------------------------------------------------------------------------
# Token form (LMOps reference code)
# --------------------------------------------------------------------------------------------------------


def _token_margin(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(h [...], top1_agree [...] bool)`` for logits ``[..., V]``; ``h`` is differentiable w.r.t. the student."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape [..., V]"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_logp = log_probs(student_logits, temperature)
    teacher_logp = log_probs(teacher_logits.detach(), temperature)
    with torch.no_grad():
        # argmax over the float32 log-probs (not the raw logits): the values below are gathered from these
        # same arrays, which is what makes h ≤ 0 hold exactly (see the module doc).
        teacher_top = teacher_logp.argmax(dim=-1, keepdim=True)  # a
        student_top = student_logp.argmax(dim=-1, keepdim=True)  # b
        pair = torch.cat([teacher_top, student_top], dim=-1)  # [..., 2] = (a, b)
    student_pair = student_logp.gather(-1, pair)
    teacher_pair = teacher_logp.gather(-1, pair)
    student_ratio = student_pair[..., 0] - student_pair[..., 1]  # log q(a) − log q(b)
    teacher_ratio = teacher_pair[..., 0] - teacher_pair[..., 1]  # log p(a) − log p(b)
    return student_ratio - teacher_ratio, (teacher_top == student_top).squeeze(-1)


def dpkd_token_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.1,
    temperature: float = 1.0,
    aux: dict | None = None,
) -> Tensor:
    """Per-position DPKD token loss ``ℓ_t = −log σ(β·h_t)``, shape ``[..., V] → [...]``, float32.

    ``h_t = [log q_t(a) − log q_t(b)] − [log p_t(a) − log p_t(b)]`` with ``p_t = softmax(teacher_logits / τ)``,
    ``q_t = softmax(student_logits / τ)``, ``a = argmax p_t``, ``b = argmax q_t`` (lowest id on ties; no
    gradient through the indices). Source: LMOps ``dpkd/main.py`` ``get_distil_loss`` (``seqKD_DPO``), β = 0.1
    there. Works on ``[B, L, V]`` as on ``[N, V]`` rows (the chunked path); the call convention is that of
    :data:`kdlm.losses.DIVERGENCES` (``temperature`` and ``aux`` keywords).

    ``h_t ≤ 0`` always, so ``ℓ_t ≥ log 2`` (equality where the two top-1 tokens coincide). If ``aux`` is a
    dict it receives detached float32 per-position tensors: ``dpkd_margin`` (``h_t``) and
    ``dpkd_top1_agreement`` (1 where ``a == b``).
    """
    _check_beta(beta)
    margin, agree = _token_margin(student_logits, teacher_logits, temperature)
    if aux is not None:
        aux["dpkd_margin"] = margin.detach()
        aux["dpkd_top1_agreement"] = agree.to(torch.float32)
    # −log σ(x) via logsigmoid: stable for large |x| (no log of an underflowed sigmoid).
    return -F.logsigmoid(beta * margin)


def _selected_positions(mask: Tensor, lead: torch.Size) -> Tensor:
    """``mask != 0`` as a bool tensor, after checking its shape and that it selects at least one position."""
    if mask.shape != lead:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the logits' leading shape {tuple(lead)}"
        )
    selected = mask != 0
    if not bool(selected.any()):
        raise ValueError(
            "mask selects no response token: pass a mask with at least one nonzero (response) position"
        )
    return selected


def dpkd_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    beta: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """DPKD token form: masked mean of :func:`dpkd_token_terms` over positions with ``mask != 0``, a float32 scalar.

    ``student_logits``/``teacher_logits`` ``[..., V]``, ``mask`` ``[...]`` (nonzero = response token). Only
    the selected rows are evaluated, so masked-out positions get an exactly zero gradient even if their
    logits are garbage. Gradient flows to ``student_logits`` only. A mask with no response token raises
    ``ValueError`` (naming ``mask``). Source: LMOps ``dpkd/main.py`` (``seqKD_DPO`` branch); fixture
    ``dpkd_token``.
    """
    lead = student_logits.shape[:-1]
    selected = _selected_positions(mask, lead)
    vocab = student_logits.shape[-1]
    rows = selected.reshape(-1)
    student_rows = student_logits.reshape(-1, vocab)[rows]
    teacher_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])[rows]
    terms = dpkd_token_terms(student_rows, teacher_rows, beta=beta, temperature=temperature)
    return terms.mean()


@dataclass(frozen=True)
class DPKDTokenStats:
    """Token-form diagnostics over the masked positions (detached float32 0-dim tensors)."""

    margin: Tensor
    """Mean of ``h_t`` (unscaled by β). Always ≤ 0; it rises to 0 as the student's top-1 token and its
    preference gap come to match the teacher's."""

    top1_agreement: Tensor
    """Share of positions where the student's top-1 token is the teacher's (``a == b``), the positions where
    ``h_t = 0`` and the loss is at its floor ``log 2``. Plays the role DPO's reward accuracy plays: the share
    ``h_t > 0`` is identically 0 for this loss (module doc)."""

    def as_dict(self) -> dict[str, float]:
        """``{"dpkd/margin": ..., "dpkd/top1_agreement": ...}`` as python floats, for logging."""
        return {"dpkd/margin": self.margin.item(), "dpkd/top1_agreement": self.top1_agreement.item()}


@torch.no_grad()
def dpkd_token_stats(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0
) -> DPKDTokenStats:
    """Mean margin ``h_t`` and top-1 agreement over positions with ``mask != 0`` (see :class:`DPKDTokenStats`).

    Same ``h_t``, argmax and temperature conventions as :func:`dpkd_token_terms`; an empty mask raises
    ``ValueError``. For the chunked path, the ``aux`` outputs of :func:`dpkd_token_terms` summed over masked
    tokens and divided by the token count give the same numbers.
    """
    selected = _selected_positions(mask, student_logits.shape[:-1])
    margin, agree = _token_margin(student_logits[selected], teacher_logits[selected], temperature)
    return DPKDTokenStats(margin=margin.mean(), top1_agreement=agree.to(torch.float32).mean())


# --------------------------------------------------------------------------------------------------------
# Sequence form (paper Eq. 9)
# --------------------------------------------------------------------------------------------------------


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-sequence ``Σ_t log softmax(logits[..., t, :])[labels[..., t]]`` over ``labels != ignore_index``.

    Alignment: ``labels[..., t]`` is the token scored by ``logits[..., t, :]``; no shift is done here. For a
    causal LM run on ``input_ids`` that means ``logits = out.logits[:, :-1]`` and
    ``labels = input_ids[:, 1:]`` with prompt and padding positions set to ``ignore_index``.

    Shapes: ``logits`` ``[..., L, V]``, ``labels`` ``[..., L]`` → ``(sum_logp [...] float32,
    num_tokens [...] int64)``. One float32 log-softmax of the logits is materialised (via
    :func:`kdlm.losses.divergences.token_nll`, the package's single per-token log-likelihood), no chunking.
    For :func:`dpkd_sequence_loss`, the per-token values are ``-token_nll(logits, labels)`` and the mask
    ``labels != ignore_index``; ``sum_logp / num_tokens`` is the length-normalised log-likelihood of Eq. 9.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:-1])}")
    token_logp = -token_nll(logits, labels, ignore_index)  # 0 at ignored positions
    return token_logp.sum(-1), (labels != ignore_index).sum(-1)


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    # float32 arithmetic, except that all-float64 inputs stay float64 (gradcheck).
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _response_lengths(mask: Tensor, name: str) -> Tensor:
    """Number of ``mask != 0`` entries per row of a ``[B, L]`` mask; raises naming ``name`` and the empty rows."""
    lengths = (mask != 0).sum(-1)
    empty = (lengths == 0).nonzero().squeeze(-1)
    if empty.numel() > 0:
        rows = empty.tolist()
        raise ValueError(
            f"{name} has no response token in row(s) {rows}: each preference pair needs at least one token "
            "in both its chosen and its rejected response (drop the pair or fix its mask)"
        )
    return lengths


def _mean_log_ratio(
    student_logp: Tensor, teacher_logp: Tensor, mask: Tensor, name: str, dtype: torch.dtype
) -> Tensor:
    """``(1/|y|)·Σ_t [log q − log p]`` over ``mask != 0`` per row ``[B]`` (the β-free implicit reward)."""
    selected = mask != 0
    lengths = _response_lengths(mask, name)
    log_ratio = student_logp.to(dtype) - teacher_logp.detach().to(dtype)
    # where, not a product with the mask: padded positions may hold −inf or NaN log-probs, and 0·inf = NaN
    # (in the value and in the gradient).
    total = torch.where(selected, log_ratio, torch.zeros((), dtype=dtype, device=log_ratio.device)).sum(-1)
    return total / lengths.to(dtype)


def _pair_rewards(
    student_logp_chosen: Tensor,
    teacher_logp_chosen: Tensor,
    student_logp_rejected: Tensor,
    teacher_logp_rejected: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
) -> tuple[Tensor, Tensor]:
    """Checked shapes, then ``(r(y_t) [B], r(y_s) [B])`` without β."""
    for side, (student, teacher, mask) in {
        "chosen": (student_logp_chosen, teacher_logp_chosen, mask_chosen),
        "rejected": (student_logp_rejected, teacher_logp_rejected, mask_rejected),
    }.items():
        if student.dim() != 2 or teacher.shape != student.shape or mask.shape != student.shape:
            raise ValueError(
                f"student_logp_{side} {tuple(student.shape)}, teacher_logp_{side} {tuple(teacher.shape)} and "
                f"mask_{side} {tuple(mask.shape)} must all have the same shape [B, L]"
            )
    if student_logp_chosen.shape[0] != student_logp_rejected.shape[0]:
        raise ValueError(
            "chosen and rejected batches differ: "
            f"{student_logp_chosen.shape[0]} vs {student_logp_rejected.shape[0]} pairs"
        )
    dtype = _work_dtype(student_logp_chosen, teacher_logp_chosen, student_logp_rejected, teacher_logp_rejected)
    chosen = _mean_log_ratio(student_logp_chosen, teacher_logp_chosen, mask_chosen, "mask_chosen", dtype)
    rejected = _mean_log_ratio(
        student_logp_rejected, teacher_logp_rejected, mask_rejected, "mask_rejected", dtype
    )
    return chosen, rejected


def dpkd_sequence_loss(
    student_logp_chosen: Tensor,
    teacher_logp_chosen: Tensor,
    student_logp_rejected: Tensor,
    teacher_logp_rejected: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """DPKD sequence loss, paper Eq. 9 (Li et al., arXiv 2406.19774), without the ``λ·L_lm`` term.

    ``mean_pairs −log σ(β·(r(y_t) − r(y_s)))`` with ``r(y) = (1/|y|)·Σ_t mask_t·(log q(y_t) − log p(y_t))``,
    ``|y| = Σ_t mask_t``: ``y_t`` (chosen) is the teacher-generated response, ``y_s`` (rejected) the
    student-generated one. Inputs are per-token log-probs ``[B, L]`` of each response under the student (q)
    and the teacher (p) — e.g. ``-token_nll(logits, labels)`` — and masks ``[B, L]`` (nonzero = response
    token); chosen and rejected may have different ``L``. The teacher log-probs are detached. Returns a
    float32 scalar (float64 for all-float64 inputs). A pair whose chosen or rejected mask is empty raises
    ``ValueError`` naming the mask argument and the row. Fixture ``dpkd_seq``.
    """
    _check_beta(beta)
    chosen, rejected = _pair_rewards(
        student_logp_chosen, teacher_logp_chosen, student_logp_rejected, teacher_logp_rejected,
        mask_chosen, mask_rejected,
    )
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


@dataclass(frozen=True)
class DPKDSequenceStats:
    """DPO-trainer-style reward metrics of the sequence form, means over pairs (detached 0-dim tensors)."""

    chosen_reward: Tensor
    """``β·r(y_t)``: the student's implicit reward for the teacher's response (TRL ``rewards/chosen``)."""

    rejected_reward: Tensor
    """``β·r(y_s)``: the student's implicit reward for its own response (TRL ``rewards/rejected``)."""

    margin: Tensor
    """Mean of ``β·r(y_t) − β·r(y_s)`` (TRL ``rewards/margins``); the loss is ``−log σ`` of the per-pair
    value."""

    accuracy: Tensor
    """Share of pairs with ``r(y_t) > r(y_s)``, strictly: a tie counts as wrong (TRL ``rewards/accuracies``)."""

    def as_dict(self) -> dict[str, float]:
        """The metrics under TRL's DPO names (``rewards/chosen``, ...) as python floats, for logging."""
        return {
            "rewards/chosen": self.chosen_reward.item(),
            "rewards/rejected": self.rejected_reward.item(),
            "rewards/margins": self.margin.item(),
            "rewards/accuracies": self.accuracy.item(),
        }


@torch.no_grad()
def dpkd_sequence_stats(
    student_logp_chosen: Tensor,
    teacher_logp_chosen: Tensor,
    student_logp_rejected: Tensor,
    teacher_logp_rejected: Tensor,
    mask_chosen: Tensor,
    mask_rejected: Tensor,
    beta: float = 0.1,
) -> DPKDSequenceStats:
    """Reward metrics for the inputs of :func:`dpkd_sequence_loss` (same arguments, same checks and errors).

    See :class:`DPKDSequenceStats`; all are means over the ``B`` pairs.
    """
    _check_beta(beta)
    chosen, rejected = _pair_rewards(
        student_logp_chosen, teacher_logp_chosen, student_logp_rejected, teacher_logp_rejected,
        mask_chosen, mask_rejected,
    )
    chosen_reward, rejected_reward = beta * chosen, beta * rejected
    return DPKDSequenceStats(
        chosen_reward=chosen_reward.mean(),
        rejected_reward=rejected_reward.mean(),
        margin=(chosen_reward - rejected_reward).mean(),
        accuracy=(chosen > rejected).to(chosen.dtype).mean(),
    )
