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

Two entry points: :func:`sample_responses` (one batch, one seed for the call) and :func:`sample_window` (the
training rollouts: every micro-batch of one or several optimizer steps in ONE engine call, a seed per row, and
each sampled token's log-probability at sampling time in ``sample_logprobs``). A sampling engine is one function,
:data:`Engine`: (model, left-padded prompts, their mask, per-row seeds, settings) -> (tokens, log-probabilities);
:func:`hf_engine` (transformers ``generate`` through :func:`kdlm.sampler.sample_rows`) is the default, and a
faster engine (e.g. vLLM) plugs in as ``sample_window(..., engine=)``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from kdlm.data.format import IGNORE
from kdlm.sampler import first_stops, left_pad, sample_rows, sample_tokens
from kdlm.train.sharding import full_parameters

__all__ = ["Engine", "RolloutStats", "SamplingSettings", "hf_engine", "sample_responses", "sample_window"]


@dataclass
class RolloutStats:
    """What one call of :func:`sample_responses` produced, for the log and metrics.jsonl."""

    sequences: int
    generated_tokens: int  # kept completion tokens (stop tokens included), summed over the rows
    mean_completion_length: float
    stopped_share: float  # rows whose kept completion ends with a stop token (not cut by the token budget)
    wall_seconds: float
    tokens_per_s: float

    @classmethod
    def of(cls, rows: int, generated: int, stopped: int, started: float) -> "RolloutStats":
        """Stats of ``rows`` sampled rows with ``generated`` kept tokens, ``stopped`` of them ending with a stop
        token, the call having started at ``time.perf_counter()`` = ``started`` (device work has finished)."""
        wall = time.perf_counter() - started
        return cls(sequences=rows, generated_tokens=generated, mean_completion_length=generated / max(rows, 1),
                   stopped_share=stopped / max(rows, 1), wall_seconds=wall, tokens_per_s=generated / max(wall, 1e-9))

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


def _completion_batch(input_ids: Tensor, prompt_lengths: Tensor, completion: Tensor, *, stop_token_ids: Sequence[int],
                      pad_token_id: int, max_length: Optional[int]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The training batch (module docstring's layout) of right-padded ``input_ids`` [B, T] whose first
    ``prompt_lengths`` ids are the prompts, followed by the sampled ``completion`` [B, S]; also each row's kept
    completion length and whether it ends with a stop token."""
    home, rows = input_ids.device, input_ids.shape[0]
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
    return new_batch, keep, stopped


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
    new_batch, keep, stopped = _completion_batch(input_ids, prompt_lengths, completion, stop_token_ids=stop_token_ids,
                                                 pad_token_id=pad_token_id, max_length=max_length)
    generated = int(keep.sum())
    return new_batch, RolloutStats.of(rows, generated, int(stopped.sum()), started)


@dataclass(frozen=True)
class SamplingSettings:
    """How :func:`sample_window` samples (``objective.sampling`` plus the tokenizer's and data's limits)."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_length: Optional[int] = None
    """Cap on prompt + completion (data.max_length); completions are cut to it."""
    vocab_size: Optional[int] = None
    """The tokenizer's vocabulary size: output rows at or past it (padding) are never sampled."""


Engine = Callable[[nn.Module, Tensor, Tensor, Sequence[int], SamplingSettings], tuple[Tensor, Tensor]]
"""A sampling engine: ``engine(model, prompts, attention_mask, row_seeds, settings) -> (tokens, logprobs)`` with
left-padded ``prompts`` [N, P], one seed per row, and the sampled tokens [N, T] (T ≤ settings.max_new_tokens,
rows padded after their stop token) and each token's log-probability under ``model`` at temperature 1 [N, T].
Row r's sample must depend only on its prompt, the model and ``row_seeds[r]``."""


def hf_engine(model: nn.Module, prompts: Tensor, attention_mask: Tensor, row_seeds: Sequence[int],
              settings: SamplingSettings) -> tuple[Tensor, Tensor]:
    """The default :data:`Engine`: transformers ``generate`` with the KV cache, one generator per row
    (:func:`kdlm.sampler.sample_rows`)."""
    return sample_rows(model, prompts, attention_mask, row_seeds=row_seeds, max_new_tokens=settings.max_new_tokens,
                       stop_token_ids=settings.stop_token_ids, pad_token_id=settings.pad_token_id,
                       temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                       vocab_size=settings.vocab_size)


def sample_window(model: nn.Module, batches: Sequence[dict[str, Tensor]], row_seeds: Sequence[Sequence[int]],
                  settings: SamplingSettings, engine: Engine = hf_engine) -> tuple[list[dict[str, Tensor]], RolloutStats]:
    """Sample a completion for every prompt of every batch in ``batches`` with ONE ``engine`` call; return one new
    training batch per input batch (as :func:`sample_responses`, plus ``sample_logprobs``) and the call's stats.

    ``row_seeds[i][r]`` seeds row r of ``batches[i]``. Since every row draws from its own seed, batch i's result is
    the one a call with ``batches[i]`` alone would give (up to float rounding of the larger batch's logits).
    ``sample_logprobs`` (float32, same shape as ``input_ids``) holds, at each completion position, the sampled
    token's log-probability under ``model`` at sampling time (temperature 1, no filter), and 0 elsewhere: the
    reference for how far the student has moved when the batch is trained on later (staleness).
    """
    if len(row_seeds) != len(batches) or any(len(s) != b["input_ids"].shape[0] for s, b in zip(row_seeds, batches)):
        raise ValueError("sample_window needs one seed per row of every batch")
    started = time.perf_counter()
    checked = [_validate(b, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                         top_p=settings.top_p, top_k=settings.top_k, stop_token_ids=settings.stop_token_ids,
                         max_length=settings.max_length) for b in batches]
    # All prompts, right-padded into one matrix, then left-padded for generation.
    lengths = torch.cat([lengths for _, lengths in checked])
    width = int(lengths.max())
    merged = torch.full((lengths.numel(), width), settings.pad_token_id, dtype=torch.long, device=lengths.device)
    row = 0
    for ids, lengths_b in checked:
        take = min(width, ids.shape[1])
        merged[row: row + ids.shape[0], :take] = ids[:, :take].to(merged.device)
        row += ids.shape[0]
    prompts, prompt_mask = left_pad(merged, lengths, settings.pad_token_id)
    max_new = settings.max_new_tokens
    if settings.max_length is not None:  # tokens past the cap of even the shortest prompt's row would be cut anyway
        max_new = min(max_new, settings.max_length - int(lengths.min()))
    call_settings = SamplingSettings(**{**asdict(settings), "max_new_tokens": max_new})
    with full_parameters(model):  # train.parallel fsdp: the engine calls (or exports) the bare model, gathered meanwhile
        tokens, logprobs = engine(model, prompts, prompt_mask, [s for seeds in row_seeds for s in seeds], call_settings)

    out, generated, stopped, row = [], 0, 0, 0
    for ids, lengths_b in checked:
        rows = ids.shape[0]
        completion = tokens[row: row + rows].to(ids.device)
        new_batch, keep, ends_with_stop = _completion_batch(ids, lengths_b, completion,
                                                            stop_token_ids=settings.stop_token_ids,
                                                            pad_token_id=settings.pad_token_id,
                                                            max_length=settings.max_length)
        # Each completion position gets its token's sampling-time log-probability (column j of the completion).
        columns = torch.arange(new_batch["input_ids"].shape[1], device=ids.device).unsqueeze(0)
        offset = (columns - lengths_b.unsqueeze(1)).clamp(0, completion.shape[1] - 1)
        row_logprobs = logprobs[row: row + rows].to(ids.device).float().gather(1, offset)
        new_batch["sample_logprobs"] = torch.where(new_batch["labels"] != IGNORE, row_logprobs,
                                                   torch.zeros_like(row_logprobs))
        out.append(new_batch)
        generated += int(keep.sum())
        stopped += int(ends_with_stop.sum())
        row += rows
    return out, RolloutStats.of(row, generated, stopped, started)
