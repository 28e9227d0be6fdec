"""Output layer + divergence in chunks of tokens, never materialising N×V logits for the whole batch.

How it works (docs/losses.md has the long version):

* Only *active* rows (masked response tokens, plus tokens with a valid label when cross-entropy is
  asked for) go through the output layer; prompt positions cost nothing.
* For each chunk of rows the student and teacher logits are computed (matmul in the input dtype, as
  the model's own ``lm_head`` would), upcast to float32, transformed (logit scale, softcap), and the
  per-token divergence from :data:`kdlm.losses.DIVERGENCES` is evaluated. Its gradient with respect to
  the chunk's student logits is taken right there with ``torch.autograd.grad`` on that same function,
  weighted by the mask, and immediately contracted with the output layer into the gradients of the
  hidden states, weight and bias. Backward therefore only scales these stored gradients by the
  incoming scalar: it never recomputes logits.
* Cross-entropy on the labels (τ = 1) is computed from the same chunk logits in the same loop.
* The teacher side is treated as constants (no gradient).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kdlm.losses.divergences import resolve_divergence, token_nll
from kdlm.losses.reduce import KDTerms, normalize

Tensor = torch.Tensor

# Rows of logits per chunk when ``chunk_size`` is not given: about 2**23 float32 values (32 MiB).
# Measured on CPU: larger chunks were slower (the divergence's autograd temporaries stop being reused
# by the allocator), smaller ones make the output-layer matmuls less efficient.
_TARGET_CHUNK_ELEMENTS = 2**23
# Rows per elementwise block. Eager: the whole chunk (measured: small blocks lose far more to per-op
# overhead than they gain in cache). Compiled: about 2**22 values (16 MiB), one static shape.
_BLOCK_ELEMENTS = _TARGET_CHUNK_ELEMENTS
_COMPILED_BLOCK_ELEMENTS = 2**22


def _default_chunk_size(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, _TARGET_CHUNK_ELEMENTS // max(vocab, 1)))


def _transform(logits: Tensor, scale: float, softcap: float | None) -> Tensor:
    """logits → scale·logits, then softcap·tanh(·/softcap) when a softcap is given (float32)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits




_COMPILED: dict[Any, Any] = {}


def _block_terms(
    fn: Any, params: dict, temperature: float, s_scale: float, s_cap: float | None,
    raw: Tensor, teacher_logits: Tensor, mask: Tensor, labels: Tensor | None, want_grad: bool,
    label_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None, Tensor | None]:
    """Masked sums and gradients w.r.t. the raw student logits of one block of rows.

    The divergence is ``fn`` (an entry of DIVERGENCES), differentiated by autograd: nothing is re-derived.
    """
    raw = raw.detach().requires_grad_(want_grad)
    aux_tokens: dict[str, Tensor] = {}
    with torch.enable_grad() if want_grad else torch.no_grad():
        student_logits = _transform(raw, s_scale, s_cap)
        values = fn(student_logits, teacher_logits, temperature=temperature, aux=aux_tokens, **params)
        nll = token_nll(student_logits, labels) if labels is not None else None
        if nll is not None and label_weights is not None:
            nll = nll * label_weights
    values_sum = torch.where(mask > 0, values.detach(), 0.0).sum()
    nll_sum = nll.detach().sum() if nll is not None else torch.zeros((), device=raw.device)
    aux = {key: (value.detach() * mask).sum() for key, value in aux_tokens.items()}
    grad_div = grad_ce = None
    if want_grad:
        grad_div = torch.autograd.grad(values, raw, mask, retain_graph=nll is not None)[0]
        if nll is not None:
            grad_ce = torch.autograd.grad(nll, raw, torch.ones_like(nll))[0]
    return values_sum, nll_sum, aux, grad_div, grad_ce


def _elementwise_block(
    cfg: dict, raw: Tensor, teacher_logits: Tensor, mask: Tensor, labels: Tensor | None, block: int, with_ce: bool,
    label_weights: Tensor | None = None,
):
    args = (cfg["fn"], cfg["params"], cfg["temperature"], cfg["student_logit_scale"], cfg["student_softcap"])
    if not cfg["compile"]:
        return _block_terms(*args, raw, teacher_logits, mask, labels, cfg["want_grad"], label_weights)
    # Compiled: one static shape per (divergence, block); a short last block is padded with masked rows.
    rows = raw.shape[0]
    if rows < block:
        pad = block - rows
        raw = torch.nn.functional.pad(raw, (0, 0, 0, pad))
        teacher_logits = torch.nn.functional.pad(teacher_logits, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
        if labels is not None:
            labels = torch.nn.functional.pad(labels, (0, pad), value=-100)
        if label_weights is not None:
            label_weights = torch.nn.functional.pad(label_weights, (0, pad))
    key = (cfg["fn"], cfg["want_grad"], labels is not None, label_weights is not None)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_block_terms, dynamic=False)
    values_sum, nll_sum, aux, grad_div, grad_ce = _COMPILED[key](
        *args, raw, teacher_logits, mask, labels, cfg["want_grad"], label_weights
    )
    if rows < block:
        grad_div = None if grad_div is None else grad_div[:rows]
        grad_ce = None if grad_ce is None else grad_ce[:rows]
    return values_sum, nll_sum, aux, grad_div, grad_ce


def _linear_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T (+ bias)`` written into the preallocated ``out``."""
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    torch.mm(hidden, weight.T, out=out)
    if bias is not None:
        out.add_(bias)
    return out


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor | None,
        teacher_bias: Tensor | None,
        rows: Tensor | None,
        mask_rows: Tensor,
        labels_rows: Tensor | None,
        weights_rows: Tensor | None,
        cfg: dict,
    ) -> tuple[Tensor, ...]:
        chunk, block = cfg["chunk_size"], cfg["block_rows"]
        t_scale, t_cap = cfg["teacher_logit_scale"], cfg["teacher_softcap"]
        want_grad = cfg["want_grad"]
        device = student_hidden.device

        s_hidden = student_hidden if rows is None else student_hidden.index_select(0, rows)
        t_hidden = teacher_hidden if rows is None else teacher_hidden.index_select(0, rows)
        num_rows = s_hidden.shape[0]
        with_ce = labels_rows is not None

        div_sum = torch.zeros((), dtype=torch.float32, device=device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        aux_sums: dict[str, Tensor] = {}
        grads: dict[str, dict[str, Tensor | None]] = {}
        mix = cfg["mix"]  # (weight of the divergence, weight of CE) or None
        # With a mix, one combined gradient buffer: two output-layer matmuls per chunk instead of four.
        kinds = ["mix"] if mix is not None else (["div", "ce"] if with_ce else ["div"])
        if want_grad:
            for kind in kinds:
                grads[kind] = {
                    "hidden": torch.zeros(num_rows, student_hidden.shape[1], dtype=torch.float32, device=device)
                    if cfg["need_hidden"] else None,
                    "weight": torch.zeros(student_weight.shape, dtype=torch.float32, device=device)
                    if cfg["need_weight"] else None,
                    "bias": torch.zeros(student_weight.shape[0], dtype=torch.float32, device=device)
                    if cfg["need_bias"] else None,
                }

        # Chunk-sized buffers reused across chunks: large temporaries freshly allocated per chunk would
        # be mmapped and page-faulted every time (measured: several times slower on CPU).
        vocab = student_weight.shape[0]
        rows_cap = min(chunk, num_rows)
        s_buffer = torch.empty(rows_cap, vocab, dtype=student_weight.dtype, device=device)
        # No teacher weight: the teacher rows are a per-row payload the divergence reads itself (sparse cache).
        t_buffer = (torch.empty(rows_cap, vocab, dtype=teacher_weight.dtype, device=device)
                    if teacher_weight is not None else None)
        grad_buffers = {kind: torch.empty(rows_cap, vocab, dtype=torch.float32, device=device)
                        for kind in kinds} if want_grad else {}

        for start in range(0, num_rows, chunk):
            stop = min(start + chunk, num_rows)
            size = stop - start
            h_chunk = s_hidden[start:stop]
            mask_chunk = mask_rows[start:stop].to(torch.float32)
            with torch.no_grad():
                if t_buffer is None:
                    teacher_logits = t_hidden[start:stop]
                else:
                    teacher_logits = _linear_into(t_buffer[:size], t_hidden[start:stop], teacher_weight, teacher_bias)
                    teacher_logits = _transform(teacher_logits.float(), t_scale, t_cap)
                raw = _linear_into(s_buffer[:size], h_chunk, student_weight, student_bias).float()
            for b_start in range(0, size, block):
                b_stop = min(b_start + block, size)
                labels_block = labels_rows[start + b_start:start + b_stop] if with_ce else None
                weights_block = None if weights_rows is None else weights_rows[start + b_start:start + b_stop]
                result = _elementwise_block(
                    cfg, raw[b_start:b_stop], teacher_logits[b_start:b_stop],
                    mask_chunk[b_start:b_stop], labels_block, block, with_ce, weights_block,
                )
                values_sum, nll_sum, aux_block, grad_div, grad_ce = result
                div_sum += values_sum
                ce_sum += nll_sum
                for key, value in aux_block.items():
                    aux_sums[key] = aux_sums.get(key, 0.0) + value
                if want_grad and mix is not None:
                    torch.add(grad_div * mix[0], grad_ce, alpha=mix[1], out=grad_buffers["mix"][b_start:b_stop])
                elif want_grad:
                    grad_buffers["div"][b_start:b_stop].copy_(grad_div)
                    if with_ce:
                        grad_buffers["ce"][b_start:b_stop].copy_(grad_ce)
            if not want_grad:
                continue
            for kind, buffer in grad_buffers.items():
                grad_logits = buffer[:size]
                store = grads[kind]
                grad_in = grad_logits.to(student_weight.dtype)
                if store["hidden"] is not None:
                    if grad_in.dtype == torch.float32:
                        torch.mm(grad_in, student_weight, out=store["hidden"][start:stop])
                    else:
                        store["hidden"][start:stop] = grad_in @ student_weight
                if store["weight"] is not None:
                    if grad_in.dtype == torch.float32 and h_chunk.dtype == torch.float32:
                        store["weight"].addmm_(grad_in.T, h_chunk)
                    else:
                        store["weight"] += (grad_in.T @ h_chunk).float()
                if store["bias"] is not None:
                    store["bias"] += grad_logits.sum(0)

        ctx.kinds = kinds
        ctx.rows = rows
        ctx.num_hidden_rows = student_hidden.shape[0]
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
        ctx.grads = grads
        cfg["aux_keys"] = list(aux_sums)
        aux_tensor = (torch.stack([aux_sums[k] for k in aux_sums]) if aux_sums
                      else torch.zeros(0, dtype=torch.float32, device=device))
        ctx.mark_non_differentiable(aux_tensor)
        mix_sum = div_sum * mix[0] + ce_sum * mix[1] if mix is not None else torch.zeros((), device=device)
        if mix is not None:  # one call: a second mark_non_differentiable replaces the first
            ctx.mark_non_differentiable(aux_tensor, div_sum, ce_sum)
        return div_sum, ce_sum, aux_tensor, mix_sum

    @staticmethod
    def backward(ctx: Any, grad_div: Tensor, grad_ce: Tensor, _grad_aux: Tensor, grad_mix: Tensor):  # noqa: D102
        outs: dict[str, Tensor | None] = {"hidden": None, "weight": None, "bias": None}
        scales = {"div": grad_div, "ce": grad_ce, "mix": grad_mix}
        for kind in ctx.kinds:
            for name, value in ctx.grads.get(kind, {}).items():
                if value is None:
                    continue
                term = value * scales[kind]
                outs[name] = term if outs[name] is None else outs[name] + term
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_hidden = outs["hidden"]
        if grad_hidden is not None and ctx.rows is not None:
            full = grad_hidden.new_zeros(ctx.num_hidden_rows, grad_hidden.shape[1])
            full.index_copy_(0, ctx.rows, grad_hidden)
            grad_hidden = full
        ctx.grads = None
        return (
            None if grad_hidden is None else grad_hidden.to(hidden_dtype),
            None if outs["weight"] is None else outs["weight"].to(weight_dtype),
            None if outs["bias"] is None else outs["bias"].to(bias_dtype),
            None, None, None, None, None, None, None, None,
        )


def fused_kd_terms(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor | None,
    mask: Tensor,
    divergence: str | Callable[..., Tensor] = "fkl",
    temperature: float = 1.0,
    *,
    labels: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    compile: bool = False,
    kd_ratio: float | None = None,
    label_weights: Tensor | None = None,
    **params,
) -> KDTerms:
    """Divergence and cross-entropy sums from hidden states and output layers, in chunks of rows.

    Shapes: ``student_hidden`` [N, H], ``student_weight`` [V, H], ``teacher_hidden`` [N, H_t],
    ``teacher_weight`` [V, H_t], ``mask`` [N] (true = response token), ``labels`` [N] long (−100 =
    ignore). Logits are ``scale·(h @ W.T + b)`` then ``softcap·tanh(logits/softcap)`` when a softcap
    is given. ``chunk_size`` = rows per chunk (default: about 2**23 logits per chunk). ``compile=True``
    runs the per-block elementwise part (divergence + its autograd gradient) through ``torch.compile``
    (one compilation per divergence and block shape; same values to float32 rounding).
    Returns :class:`KDTerms`; ``divergence_sum`` and ``ce_sum`` are differentiable with respect to the
    student hidden states, weight and bias; the teacher inputs are constants.

    With ``kd_ratio`` = r (needs ``labels``) the result also holds ``loss_sum`` = (1 − r)·ce_sum + r·divergence_sum,
    the only differentiable output then (``divergence_sum``/``ce_sum`` are returned detached, for logging): its
    gradient is formed as one combined logit gradient per chunk, saving two of the six output-layer matmuls.
    ``label_weights`` [N] (float) multiplies each token's cross-entropy: ``ce_sum = Σ w_t·(−log q(label_t))``
    (e.g. per-sequence advantages of a policy-gradient term, GKD with a reward).

    ``teacher_weight=None``: ``teacher_hidden`` [N, P] is not hidden states but a per-row teacher payload that is
    handed, chunk by chunk, to ``divergence`` in place of the teacher logits (a cached sparse teacher:
    :func:`kdlm.losses.sparse.sparse_divergence`).
    """
    if kd_ratio is not None and labels is None:
        raise ValueError("fused_kd_terms: kd_ratio mixes in cross-entropy, so it needs labels")
    fn, full_params = resolve_divergence(divergence, params)
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError("fused_kd_terms expects hidden states flattened to [N, H]")
    if teacher_weight is not None and student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"vocabulary sizes differ: student {student_weight.shape[0]}, teacher {teacher_weight.shape[0]}")
    num_rows = student_hidden.shape[0]
    mask = mask.reshape(-1).bool()
    active = mask if labels is None else mask | (labels.reshape(-1) != -100)
    count = mask.sum()
    rows = None if bool(active.all()) else active.nonzero().squeeze(-1)
    mask_rows = mask if rows is None else mask.index_select(0, rows)
    labels_rows = weights_rows = None
    if labels is not None:
        labels_rows = labels.reshape(-1) if rows is None else labels.reshape(-1).index_select(0, rows)
    if label_weights is not None:
        if labels is None:
            raise ValueError("fused_kd_terms: label_weights weight the cross-entropy, so they need labels")
        flat_weights = label_weights.reshape(-1).float()
        weights_rows = flat_weights if rows is None else flat_weights.index_select(0, rows)
    num_active = num_rows if rows is None else int(rows.numel())
    need = {
        "need_hidden": student_hidden.requires_grad,
        "need_weight": student_weight.requires_grad,
        "need_bias": student_bias is not None and student_bias.requires_grad,
    }
    cfg = {
        "fn": fn,
        "params": full_params,
        "temperature": float(temperature),
        "chunk_size": int(chunk_size) if chunk_size else _default_chunk_size(num_active, student_weight.shape[0]),
        "student_logit_scale": float(student_logit_scale),
        "teacher_logit_scale": float(teacher_logit_scale),
        "student_softcap": student_softcap,
        "teacher_softcap": teacher_softcap,
        "want_grad": torch.is_grad_enabled() and any(need.values()),
        "compile": bool(compile),
        "mix": None if kd_ratio is None else (float(kd_ratio), 1.0 - float(kd_ratio)),
        "block_rows": max(1, _COMPILED_BLOCK_ELEMENTS // max(student_weight.shape[0], 1)) if compile
        else max(1, _BLOCK_ELEMENTS // max(student_weight.shape[0], 1)),
        **need,
    }
    if cfg["chunk_size"] < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    div_sum, ce_sum, aux_tensor, mix_sum = _FusedKD.apply(
        student_hidden, student_weight, student_bias,
        teacher_hidden.detach(), None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        rows, mask_rows, labels_rows, weights_rows, cfg,
    )
    aux = {key: aux_tensor[i] for i, key in enumerate(cfg["aux_keys"])}
    ce_count = (labels.reshape(-1) != -100).sum() if labels is not None else torch.zeros_like(count)
    if kd_ratio is not None:
        return KDTerms(div_sum.detach(), ce_sum.detach(), count, ce_count, aux, loss_sum=mix_sum)
    return KDTerms(div_sum, ce_sum, count, ce_count, aux)


def fused_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor,
    divergence: str | Callable[..., Tensor] = "fkl",
    temperature: float = 1.0,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    compile: bool = False,
    num_tokens: Tensor | int | None = None,
    **params,
) -> Tensor:
    """Same value as :func:`kdlm.losses.distill_loss` on the materialised logits, computed in chunks.

    Masked mean over ``mask`` (or Σ / ``num_tokens`` when given). See :func:`fused_kd_terms`.
    """
    terms = fused_kd_terms(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, divergence, temperature,
        student_bias=student_bias, teacher_bias=teacher_bias,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, chunk_size=chunk_size,
        compile=compile, **params,
    )
    return normalize(terms.divergence_sum, terms.count, num_tokens)
