"""Distillation between a teacher and a student whose tokenizers differ (``objective.cross_tokenizer``).

The response text is tokenised by both tokenizers and split into aligned *segments* (:mod:`kdlm.data.align`):
runs of student tokens and teacher tokens that spell the same text after the same text. Two methods
(``docs/losses.md`` has the formulas and sources):

* ``uld`` — Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): at each aligned segment start,
  the Wasserstein-1 distance between the sorted probability vectors, Σ_i |p_(i) − q_(i)| (p_(i) the i-th largest
  teacher probability, the shorter vector padded with zeros). It needs no vocabulary correspondence at all.
* ``align`` — exact where the vocabularies allow, approximate elsewhere:
  - at each aligned segment start, the divergence ``D`` (any of :data:`kdlm.losses.DIVERGENCES`) between the
    teacher's and the student's next-token distributions collapsed onto the *shared vocabulary* (tokens that spell
    the same bytes in both, plus eos ↔ eos) and one bucket for all other tokens, plus ``uld_weight`` × ULD's sorted
    distance between the two unshared remainders (the hybrid of TRL's GOLD trainer: shared tokens compared exactly,
    the rest by ULD);
  - for every segment that is not one token on each side, the probability of the segment's text under both models
    — the product of the conditional probabilities of its tokens, the teacher's chained over its tokens — compared
    as two-outcome distributions (the text, or anything else): D((P_T, 1 − P_T) ‖ (P_S, 1 − P_S)), the binarised
    chunk likelihood of approximate likelihood matching (ALM, Minixhofer et al. 2025, arXiv 2503.20083).
  With identical tokenizers every segment is one token each side and the shared vocabulary is the whole vocabulary
  in the same order, so ``align`` is exactly ``D`` token by token (the same function on the same logits).

Memory: the teacher's logits exist one chunk at a time — the fused path hands each chunk of student rows its paired
teacher *hidden states* and the teacher's output layer is applied inside the per-token function; token
log-probabilities for the segment probabilities are computed chunk by chunk with activation checkpointing.
The student side is :func:`kdlm.losses.fused_kd_terms` (output layer and divergence fused, CE in the same pass).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from kdlm.losses import sparse
from kdlm.losses.divergences import log_probs, resolve_divergence
from kdlm.losses.fused import _transform, fused_kd_terms
from kdlm.losses.reduce import KDTerms

Tensor = torch.Tensor
METHODS = ("uld", "align")


@dataclass
class VocabMap:
    """Which student token ids and teacher token ids spell the same thing (``student_ids[i]`` ↔ ``teacher_ids[i]``).

    ``student_rest`` / ``teacher_rest``: the ids of each real vocabulary with no counterpart. ``identity``: both
    vocabularies are the same ids in the same order (the shared-vocabulary collapse is then skipped: exact).
    """

    student_ids: Tensor
    teacher_ids: Tensor
    student_rest: Tensor
    teacher_rest: Tensor
    identity: bool

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]], student_vocab: int, teacher_vocab: int) -> "VocabMap":
        """From (student id, teacher id) pairs (e.g. :func:`kdlm.data.align.shared_vocabulary`) and vocabulary sizes."""
        pairs = sorted(pairs)
        s_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        t_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
        s_used, t_used = set(s_ids.tolist()), set(t_ids.tolist())
        if len(s_used) != len(pairs) or len(t_used) != len(pairs):
            raise ValueError("VocabMap: every student id and every teacher id may appear in at most one pair")
        s_rest = torch.tensor([i for i in range(student_vocab) if i not in s_used], dtype=torch.long)
        t_rest = torch.tensor([i for i in range(teacher_vocab) if i not in t_used], dtype=torch.long)
        identity = student_vocab == teacher_vocab == len(pairs) and bool((s_ids == t_ids).all())
        return cls(s_ids, t_ids, s_rest, t_rest, identity)

    def teacher_to_student(self, teacher_vocab: int) -> Tensor:
        """[V_T] long: the student id paired with each teacher id, −1 for teacher ids with no counterpart."""
        table = torch.full((teacher_vocab,), -1, dtype=torch.long, device=self.teacher_ids.device)
        return table.index_copy(0, self.teacher_ids, self.student_ids)

    def to(self, device) -> "VocabMap":
        return VocabMap(self.student_ids.to(device), self.teacher_ids.to(device), self.student_rest.to(device),
                        self.teacher_rest.to(device), self.identity)


def _sorted_pair(teacher_probs: Tensor, student_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Both sorted in decreasing order, the shorter padded with zeros to the longer's width."""
    p = teacher_probs.sort(dim=-1, descending=True).values
    q = student_probs.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    return torch.nn.functional.pad(p, (0, width - p.shape[-1])), torch.nn.functional.pad(q, (0, width - q.shape[-1]))


def sorted_l1(teacher_probs: Tensor, student_probs: Tensor) -> Tensor:
    """Σ_i |p_(i) − q_(i)| over the probabilities sorted in decreasing order, the shorter padded with zeros [..]."""
    p, q = _sorted_pair(teacher_probs, student_probs)
    return (p - q).abs().sum(-1)


def uld_distance(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                 aux: dict | None = None) -> Tensor:
    """ULD's per-token loss (Boizard et al. 2024): Σ_i |p_(i) − q_(i)|, p = softmax(z_T/τ), q = softmax(z_S/τ).

    The closed form of the Wasserstein-1 distance between the two distributions when every token is at unit cost
    from every other and tokens are matched by rank; vocabularies may differ in size ([.., V_S] and [.., V_T]).
    """
    return sorted_l1(log_probs(teacher_logits, temperature).exp(), log_probs(student_logits, temperature).exp())


def _collapse(logp: Tensor, ids: Tensor, rest: Tensor) -> Tensor:
    """Log-probs [.., M + 1]: those of ``ids`` and a bucket log Σ over ``rest`` (−inf, constant, when it is empty)."""
    gathered = logp.index_select(-1, ids)
    if rest.numel():
        bucket = torch.logsumexp(logp.index_select(-1, rest), dim=-1, keepdim=True)
    else:
        bucket = torch.full_like(gathered[..., :1], float("-inf")).detach()
    return torch.cat([gathered, bucket], dim=-1)


def hybrid_divergence(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                      aux: dict | None = None, vocab_map: VocabMap, base: str | Callable[..., Tensor] = "fkl",
                      base_params: Optional[dict] = None, uld_weight: float = 1.0) -> Tensor:
    """Per-token D(p̃ ‖ q̃) on the shared vocabulary + bucket, plus ``uld_weight`` × sorted_l1 of the unshared parts.

    p̃ = (p_{t_1} … p_{t_M}, Σ_{unshared} p), q̃ likewise with the paired student ids (module doc). With an identity
    ``vocab_map`` this is ``D(student_logits, teacher_logits)`` itself.
    """
    fn, params = resolve_divergence(base, dict(base_params or {}))
    if vocab_map.identity:
        return fn(student_logits, teacher_logits, temperature=temperature, aux=aux, **params)
    s_logp, t_logp = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    student = _collapse(s_logp, vocab_map.student_ids, vocab_map.student_rest)
    teacher = _collapse(t_logp, vocab_map.teacher_ids, vocab_map.teacher_rest)
    value = fn(student, teacher, temperature=1.0, aux=aux, **params)  # normalised log-probs: log-softmax keeps them
    if uld_weight and (vocab_map.student_rest.numel() or vocab_map.teacher_rest.numel()):
        value = value + uld_weight * sorted_l1(t_logp.index_select(-1, vocab_map.teacher_rest).exp(),
                                               s_logp.index_select(-1, vocab_map.student_rest).exp())
    return value


# --------------------------------------------------------------------------------------------------
# The same distribution terms against a cached teacher (kdlm cache-teacher): top-k of the teacher + its tail mass.
# --------------------------------------------------------------------------------------------------


def sorted_l1_with_tail(known: Tensor, count: Tensor, tail: Tensor, student_probs: Tensor) -> Tensor:
    """:func:`sorted_l1` when only the teacher's ``count`` [N] largest probabilities are known (``known`` [N, m],
    sorted or not, zeros beyond each row's count) and the mass ``tail`` [N] of all its others:

        Σ_{i ≤ c} |p_(i) − q_(i)| + |tail − Σ_{i > c} q_(i)|,

    the ranks after c compared as one bucket each side. Since Σ|a_i − b_i| ≥ |Σ a_i − Σ b_i| this is a lower bound
    of the full sorted distance, below it by at most 2·min(tail, Σ_{i > c} q_(i)); equal to it when ``tail`` = 0."""
    p, q = _sorted_pair(known, student_probs)
    head = torch.arange(p.shape[-1], device=p.device) < count.unsqueeze(-1)
    return torch.where(head, (p - q).abs(), 0.0).sum(-1) + (tail - torch.where(head, 0.0, q).sum(-1)).abs()


def uld_topk(student_logits: Tensor, teacher_payload: Tensor, *, temperature: float = 1.0, aux: dict | None = None) -> Tensor:
    """ULD (:func:`uld_distance`) against a cached teacher (:mod:`kdlm.losses.sparse` payload [N, 2k + 1], at τ):
    the teacher's k largest probabilities exactly, its tail mass r against the student's mass after rank k
    (:func:`sorted_l1_with_tail`). Exact when k = V_T; otherwise a lower bound, below by at most 2·min(r, the
    student's mass after rank k) ≤ 2r."""
    _, logp, tail = sparse.unpack_payload(teacher_payload)
    listed = logp > float("-inf")
    return sorted_l1_with_tail(torch.where(listed, logp.exp(), 0.0), listed.sum(-1), tail.exp(),
                               log_probs(student_logits, temperature).exp())


def hybrid_topk(student_logits: Tensor, teacher_payload: Tensor, *, temperature: float = 1.0, aux: dict | None = None,
                vocab_map: VocabMap, teacher_to_student: Tensor, teacher_vocab: int,
                base: str | Callable[..., Tensor] = "fkl", base_params: Optional[dict] = None,
                uld_weight: float = 1.0) -> Tensor:
    """:func:`hybrid_divergence` against a cached teacher's top-k (payload [N, 2k + 1], at τ).

    The divergence part compares both models collapsed onto the *shared tokens among the stored top-k* (each teacher
    id with its paired student id, ``teacher_to_student``) plus one bucket for everything else on each side. The ULD
    part compares the teacher's unshared probabilities with the student's (:func:`sorted_l1_with_tail`): the stored
    unshared ones are the teacher's largest unshared ones (every token outside the top-k is below them); the unshared
    tokens outside the top-k get the share of the tail mass r that their number is of the V_T − k tokens outside it.
    With k = V_T both parts equal the live ones (the partition is the live one: every shared token listed, the
    bucket = the unshared mass; no tail). With k < V_T the divergence part uses a coarser partition (shared tokens
    outside the top-k join the bucket): for an f-divergence a lower bound of the live value; the ULD part is
    approximate (the unshared tail mass is estimated, then compared as one bucket).
    """
    fn, params = resolve_divergence(base, dict(base_params or {}))
    t_ids, logp, tail = sparse.unpack_payload(teacher_payload)
    valid = logp > float("-inf")
    s_ids = teacher_to_student[t_ids]
    shared = valid & (s_ids >= 0)
    s_logp = log_probs(student_logits, temperature)
    student = sparse.collapse_logprobs(s_logp, s_ids.clamp_min(0), shared)
    # The teacher's bucket: its unshared stored tokens and its tail, summed in log space (no 1 − Σ cancellation).
    bucket = torch.logsumexp(torch.cat([logp.masked_fill(shared, float("-inf")), tail.unsqueeze(-1)], dim=-1), dim=-1)
    teacher = sparse.collapse_teacher(logp.masked_fill(~shared, float("-inf")), bucket)
    value = fn(student, teacher, temperature=1.0, aux=aux, **params)  # normalised log-probs: log-softmax keeps them
    if uld_weight and (vocab_map.student_rest.numel() or vocab_map.teacher_rest.numel()):
        unshared = valid & ~shared
        known = unshared.sum(-1)
        outside = vocab_map.teacher_rest.numel() - known  # unshared teacher tokens not among the stored top-k
        share = outside.to(tail.dtype) / (teacher_vocab - valid.sum(-1)).clamp_min(1).to(tail.dtype)
        value = value + uld_weight * sorted_l1_with_tail(
            torch.where(unshared, logp.exp(), 0.0), known, share * tail.exp(),
            s_logp.index_select(-1, vocab_map.student_rest).exp())
    return value


@dataclass
class Head:
    """An output layer as the losses need it: logits = softcap(scale · (h Wᵀ + b)) (kdlm's ``OutputHead`` fits)."""

    weight: Tensor
    bias: Optional[Tensor] = None
    scale: float = 1.0
    softcap: Optional[float] = None


def _head_logits(hidden: Tensor, head: Any) -> Tensor:
    weight = head.weight
    logits = hidden.to(weight.dtype) @ weight.T
    if head.bias is not None:
        logits = logits + head.bias
    return _transform(logits.float(), head.scale, head.softcap)


def _with_teacher_head(student_logits: Tensor, teacher_hidden: Tensor, *, temperature: float = 1.0,
                       aux: dict | None = None, teacher_head: Any, pair_fn: Callable[..., Tensor], pair_params: dict) -> Tensor:
    """A per-token function of the fused path whose teacher rows are hidden states: the teacher's logits are made
    here, for this chunk only, and dropped with it."""
    with torch.no_grad():
        teacher_logits = _head_logits(teacher_hidden, teacher_head)
    return pair_fn(student_logits, teacher_logits, temperature=temperature, aux=aux, **pair_params)


def _chunk_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], scale: float,
                          softcap: Optional[float], targets: Tensor, temperature: float) -> Tensor:
    logits = _head_logits(hidden, Head(weight, bias, scale, softcap))
    return log_probs(logits, temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(hidden: Tensor, head: Any, targets: Tensor, *, temperature: float = 1.0,
                   chunk_size: int = 1024) -> Tensor:
    """log softmax(logits/τ)[target] per row [N], chunk by chunk; with gradient, each chunk's logits are recomputed
    in backward (activation checkpointing) instead of being kept."""
    outs = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start:start + chunk_size], head.weight, head.bias, head.scale, head.softcap,
                targets[start:start + chunk_size], temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            outs.append(checkpoint(_chunk_token_logprobs, *args, use_reentrant=False))
        else:
            outs.append(_chunk_token_logprobs(*args))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate on both sides of −log 2 (Mächler 2012); x is kept below 0."""
    x = x.clamp_max(-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_chunk_divergence(student_logp: Tensor, teacher_logp: Tensor, base: str | Callable[..., Tensor] = "fkl",
                            base_params: Optional[dict] = None) -> Tensor:
    """D((P_T, 1 − P_T) ‖ (P_S, 1 − P_S)) per segment, from the segments' log-probabilities log P [S]."""
    fn, params = resolve_divergence(base, dict(base_params or {}))
    student = torch.stack([student_logp, _log1mexp(student_logp)], dim=-1)
    teacher = torch.stack([teacher_logp, _log1mexp(teacher_logp)], dim=-1)
    return fn(student, teacher, temperature=1.0, **params)


def cross_tokenizer_terms(
    student_hidden: Tensor,
    student_head: Any,
    teacher_hidden: Optional[Tensor],
    teacher_head: Any,
    pairs: Tensor,
    labels: Tensor,
    *,
    method: str = "align",
    vocab_map: Optional[VocabMap] = None,
    divergence: str = "fkl",
    params: Optional[dict] = None,
    temperature: float = 1.0,
    kd_ratio: float = 0.5,
    uld_weight: float = 1.0,
    student_segments: Optional[Tensor] = None,
    teacher_segments: Optional[Tensor] = None,
    teacher_targets: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    teacher_signal: Optional[Tensor] = None,
    teacher_vocab: Optional[int] = None,
) -> KDTerms:
    """Sums over a batch of (1 − kd_ratio)·CE + kd_ratio·(distribution terms + segment terms).

    ``student_hidden`` [N, H]: the student's rows (one per response token it predicts), ``labels`` [N] their next
    tokens; ``teacher_hidden`` [N_T, H_T]: teacher rows, constants. ``pairs`` [N]: for each student row, the teacher
    row at the same aligned segment start, −1 elsewhere (the distribution term is taken there). For ``align``,
    ``student_segments`` [N] / ``teacher_segments`` [N_T] give each row's segment (−1: none; only segments that are
    not one token on each side) and ``teacher_targets`` [N_T] the teacher rows' next tokens. ``*_head``: objects
    with ``weight``, ``bias``, ``scale``, ``softcap`` (:class:`Head`, kdlm's ``OutputHead``).

    A cached teacher (``kdlm cache-teacher``): ``teacher_signal`` [N_T, 2k + 2] replaces ``teacher_hidden`` and
    ``teacher_head`` (None): per teacher row its top-k payload (:mod:`kdlm.losses.sparse`) and, last, the log-prob
    of its own next token; ``teacher_vocab`` is V_T. The distribution terms are then :func:`uld_topk` /
    :func:`hybrid_topk`, the segment terms read the stored log-probs (exact).

    Returns :class:`KDTerms`: ``loss_sum`` (differentiable), ``divergence_sum`` (distribution + segment terms,
    detached), ``ce_sum``, ``count`` (distribution terms taken), and ``aux`` = {``xtok_segment``: segment term sum,
    ``xtok_segments``: their number}.
    """
    if method not in METHODS:
        raise ValueError(f"cross_tokenizer method must be one of {METHODS}, got {method!r}")
    params = dict(params or {})
    cached = teacher_signal is not None
    if method == "uld":
        pair_fn, pair_params = (uld_topk if cached else uld_distance), {}
    else:
        if vocab_map is None:
            raise ValueError("cross_tokenizer 'align' needs the vocab_map")
        pair_params = dict(vocab_map=vocab_map, base=divergence, base_params=params, uld_weight=uld_weight)
        pair_fn = hybrid_divergence
        if cached:
            pair_fn = hybrid_topk
            pair_params.update(teacher_to_student=vocab_map.teacher_to_student(teacher_vocab), teacher_vocab=teacher_vocab)
    mask = pairs >= 0
    if cached:  # each paired row's stored top-k payload (the own-token column is the segment terms')
        payload = teacher_signal[:, :-1].index_select(0, pairs.clamp_min(0))
        fn = functools.partial(pair_fn, **pair_params)
    else:
        payload = teacher_hidden.detach().index_select(0, pairs.clamp_min(0))  # hidden states, not logits: [N, H_T]
        fn = functools.partial(_with_teacher_head, teacher_head=teacher_head, pair_fn=pair_fn, pair_params=pair_params)
    terms = fused_kd_terms(
        student_hidden, student_head.weight, payload, None, mask, divergence=fn, temperature=temperature,
        labels=labels, student_bias=student_head.bias, student_logit_scale=student_head.scale,
        student_softcap=student_head.softcap, chunk_size=chunk_size, kd_ratio=kd_ratio,
    )
    zero = terms.divergence_sum.new_zeros(())
    aux = {"xtok_segment": zero, "xtok_segments": zero}
    loss_sum, divergence_sum = terms.loss_sum, terms.divergence_sum
    if method == "align" and student_segments is not None and bool((student_segments >= 0).any()):
        num = int(max(student_segments.max(), teacher_segments.max())) + 1
        s_rows, t_rows = student_segments >= 0, teacher_segments >= 0
        step = chunk_size or 1024
        s_tok = token_logprobs(student_hidden[s_rows], student_head, labels[s_rows], temperature=temperature, chunk_size=step)
        if cached:
            t_tok = teacher_signal[t_rows, -1]
        else:
            with torch.no_grad():
                t_tok = token_logprobs(teacher_hidden[t_rows].detach(), teacher_head, teacher_targets[t_rows],
                                       temperature=temperature, chunk_size=step)
        s_seg = s_tok.new_zeros(num).index_add(0, student_segments[s_rows], s_tok)
        t_seg = t_tok.new_zeros(num).index_add(0, teacher_segments[t_rows], t_tok)
        # A segment enters only when both sides have all of it (the data layout guarantees it; this is a guard).
        present = (torch.bincount(student_segments[s_rows], minlength=num) > 0) & (
            torch.bincount(teacher_segments[t_rows], minlength=num) > 0)
        values = binary_chunk_divergence(s_seg[present], t_seg[present], divergence, params)
        segment_sum = values.sum()
        loss_sum = loss_sum + kd_ratio * segment_sum
        divergence_sum = divergence_sum + segment_sum.detach()
        aux = {"xtok_segment": segment_sum.detach(), "xtok_segments": present.sum().to(segment_sum.dtype)}
    return KDTerms(divergence_sum, terms.ce_sum, terms.count, terms.ce_count, {**terms.aux, **aux}, loss_sum=loss_sum)
