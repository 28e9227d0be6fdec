"""Student rollouts: sample responses to a training batch's prompts and return them as a training batch.

Used by on-policy distillation (GKD, Agarwal et al., ICLR 2024, arXiv 2306.13649; see ``docs/METHODS.md``, GKD
section: responses sampled from the current student, no gradient through sampling, tokens after EOS masked,
prompt masked) and by DPKD's sequence form, which needs a student-generated response ``y_s``.

Layout of the returned batch (the same as :func:`kdlm.data.format.collate`)
---------------------------------------------------------------------------
Row ``b`` is ``prompt_b + completion_b`` right-padded with ``pad_token_id``; ``labels`` equal the ids on the
completion and -100 on the prompt and on padding; ``attention_mask`` is 1 on prompt + completion;
``prompt_lengths`` is carried over. ``completion_b`` is the sampled continuation up to and INCLUDING its first
stop token (any of ``stop_token_ids``), found by scanning the sampled tokens here rather than by trusting
``generate``'s padding: the pad id may equal eos, and a row may hit ``max_new_tokens`` without any stop
token (then all of its sampled tokens are kept and labelled, exactly like a dataset response that
``tokenize_examples`` truncated). An immediate stop (the first sampled token is a stop token) keeps a
completion of just that token, labelled: the student then learns from the teacher whether stopping there was
right, instead of the row silently dropping out of the loss.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from kdlm.data.format import IGNORE
from kdlm.sampler import first_stops, left_pad, sample_tokens

__all__ = ["RolloutStats", "sample_responses"]


@dataclass
class RolloutStats:
    """What one call of :func:`sample_responses` produced, for the log and metrics.jsonl."""

    sequences: int
    generated_tokens: int  # kept completion tokens (stop tokens included), summed over the rows
    mean_completion_length: float
    stopped_share: float  # rows whose kept completion ends with a stop token (not cut by the token budget)
    wall_seconds: float
    tokens_per_s: float

    def as_metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        return {prefix + key: float(value) for key, value in asdict(self).items()}


def _validate(
    batch: dict[str, Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop_token_ids: Sequence[int],
    max_length: Optional[int],
) -> tuple[Tensor, Tensor]:
    for key in ("input_ids", "prompt_lengths"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r}: build it with kdlm.data.format.collate")
    input_ids, prompt_lengths = batch["input_ids"], batch["prompt_lengths"].to(batch["input_ids"].device).long()
    if input_ids.dim() != 2 or prompt_lengths.shape != input_ids.shape[:1]:
        raise ValueError(f"input_ids must be [B, T] and prompt_lengths [B], got {tuple(input_ids.shape)} and "
                         f"{tuple(prompt_lengths.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("empty batch")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if len(stop_token_ids) == 0:
        raise ValueError("stop_token_ids is empty: a completion needs an end marker")
    real = batch["attention_mask"].sum(1) if "attention_mask" in batch else torch.full_like(prompt_lengths, input_ids.shape[1])
    if bool((prompt_lengths < 1).any()) or bool((prompt_lengths > real.to(prompt_lengths.device)).any()):
        raise ValueError(f"prompt_lengths {prompt_lengths.tolist()} must be >= 1 and within each row's tokens")
    if max_length is not None and int(prompt_lengths.max()) >= max_length:
        raise ValueError(f"a prompt of {int(prompt_lengths.max())} tokens leaves no room for a completion "
                         f"within max_length {max_length}")
    return input_ids, prompt_lengths


def sample_responses(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    seed: int,
    max_length: Optional[int] = None,
) -> tuple[dict[str, Tensor], RolloutStats]:
    """Sample a completion for every prompt of ``batch`` from ``model``; return them as a NEW training batch.

    ``batch`` is a training batch in :func:`kdlm.data.format.collate`'s layout; only ``input_ids`` and
    ``prompt_lengths`` are read (its responses are ignored). ``model`` is a Hugging Face causal LM (the bare
    one, not a data-parallel or :class:`~kdlm.models.DecoderOnly` wrapper): it is called only as
    ``model.generate(input_ids=..., attention_mask=..., ...)`` with left-padded prompts and the KV cache, under
    ``torch.no_grad()`` and in eval mode; its previous train/eval mode is restored afterwards, also on errors.

    Sampling: ``temperature > 0`` samples with ``temperature``, ``top_p`` and ``top_k`` (0 = off: plain
    sampling from the student's distribution, as on-policy KD wants); ``temperature == 0`` is greedy. Samples
    are a function of ``seed`` alone; the caller's CPU and accelerator RNG states are left untouched.

    Returns the batch (``input_ids``, ``labels``, ``attention_mask``, ``prompt_lengths``, on the device of
    ``batch["input_ids"]``; see the module docstring for the layout and the masking) and its
    :class:`RolloutStats`. ``max_length`` caps prompt + completion by cutting the completion (the stop token
    too, when it falls past the cap); every prompt must be shorter than ``max_length``.
    """
    started = time.perf_counter()
    input_ids, prompt_lengths = _validate(
        batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop_token_ids=stop_token_ids, max_length=max_length,
    )
    home = input_ids.device
    rows = input_ids.shape[0]
    prompts, prompt_mask = left_pad(input_ids, prompt_lengths, pad_token_id)
    if max_length is not None:
        # Tokens past the cap of even the shortest prompt's row would be cut anyway: don't sample them.
        max_new_tokens = min(max_new_tokens, max_length - int(prompt_lengths.min()))
    completion = sample_tokens(
        model, prompts, prompt_mask, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
        pad_token_id=pad_token_id, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
    ).to(home)
    sampled = completion.shape[1]

    # The completion ends at the first stop token (kept); no stop token: every sampled token is kept.
    has_stop, first_stop = first_stops(completion, stop_token_ids)
    keep = torch.where(has_stop, first_stop + 1, torch.full_like(first_stop, sampled))
    if max_length is not None:
        keep = torch.minimum(keep, max_length - prompt_lengths)
    stopped = has_stop & (first_stop < keep)

    # Right-padded prompt + completion, built column by column with gathers (no Python loop over rows).
    ends = prompt_lengths + keep
    width = int(ends.max())
    columns = torch.arange(width, device=home).unsqueeze(0).expand(rows, width)
    in_prompt = columns < prompt_lengths.unsqueeze(1)
    in_completion = ~in_prompt & (columns < ends.unsqueeze(1))
    from_prompt = input_ids.gather(1, columns.clamp(max=input_ids.shape[1] - 1))
    from_completion = completion.gather(1, (columns - prompt_lengths.unsqueeze(1)).clamp(0, sampled - 1))
    pad = torch.full_like(columns, pad_token_id)
    new_ids = torch.where(in_prompt, from_prompt, torch.where(in_completion, from_completion, pad))
    new_batch = {
        "input_ids": new_ids,
        "labels": torch.where(in_completion, new_ids, torch.full_like(new_ids, IGNORE)),
        "attention_mask": (in_prompt | in_completion).long(),
        "prompt_lengths": prompt_lengths.clone(),
    }

    generated = int(keep.sum())
    wall = time.perf_counter() - started  # after the .sum() above: device work has finished
    stats = RolloutStats(
        sequences=rows,
        generated_tokens=generated,
        mean_completion_length=generated / rows,
        stopped_share=int(stopped.sum()) / rows,
        wall_seconds=wall,
        tokens_per_s=generated / max(wall, 1e-9),
    )
    return new_batch, stats
