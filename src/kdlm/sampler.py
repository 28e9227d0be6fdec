"""The one token sampler: seeded, stop-aware, batched with left padding and the KV cache.

Every generation in kdlm goes through :func:`sample_tokens`: the teacher's responses that are cached as training
data and the evaluation generations (:mod:`kdlm.generation`), and the on-policy rollouts of GKD and DPKD
(:mod:`kdlm.train.rollout`). A faster engine plugs in at :func:`kdlm.train.rollout.sample_window`'s ``engine``.

Rules, the same for every caller:

* a completion stops at any of :func:`stop_token_ids`: the tokenizer's eos and the model's generation-config eos
  ids (chat models often have several);
* ``temperature > 0`` samples with ``temperature``, ``top_p`` and ``top_k`` (0 = off); ``temperature == 0`` is
  greedy; the model's own generation config cannot add a repetition penalty;
* :func:`sample_tokens`: samples are a function of ``seed`` alone: the CPU generator and the generators of every
  accelerator device that holds the model's parameters are forked, seeded and restored, so the caller's RNG
  streams are untouched;
* :func:`sample_rows` (the training rollouts): each row has its own seed and draws from its own generator, so a
  row's sample does not depend on the other rows of the call (batching several calls into one gives the same
  samples); it also returns the log-probability of every sampled token under the model;
* the model runs in eval mode under ``torch.no_grad()``; its train/eval mode is restored, also on errors.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["first_stops", "left_pad", "sample_rows", "sample_tokens", "seeded", "stop_token_ids"]


def stop_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """The tokenizer's eos plus the model's generation-config eos ids (chat models often have several)."""
    ids = {int(tokenizer.eos_token_id)}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    return sorted(ids)


def left_pad(input_ids: Tensor, lengths: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Each row's first ``lengths[b]`` ids of a right-padded ``input_ids`` [B, T], left-padded to the longest,
    and their attention mask.

    Left padding makes every prompt end at the same column, so generation continues all rows at once.
    """
    width = int(lengths.max())
    columns = torch.arange(width, device=input_ids.device).unsqueeze(0)
    source = columns - (width - lengths).unsqueeze(1)  # column in the right-padded row; < 0 on padding
    real = source >= 0
    ids = torch.where(real, input_ids.gather(1, source.clamp(min=0)), torch.full_like(source, pad_token_id))
    return ids, real.long()


def first_stops(completion: Tensor, stop_token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """For sampled tokens [B, T]: whether each row has a stop token, and the index of its first one (0 if none)."""
    stops = torch.isin(completion, torch.tensor(list(stop_token_ids), dtype=torch.long, device=completion.device))
    return stops.any(dim=1), stops.long().argmax(dim=1)  # argmax returns the first maximal index


def _accelerator_devices(model: nn.Module) -> dict[str, list[int]]:
    """Accelerator devices (type -> indices) holding the model's parameters; sampling draws from their RNGs.

    A model sharded over several GPUs samples on the device of its last layer, so every device is forked.
    """
    found: dict[str, set[int]] = {}
    for param in model.parameters():
        device = param.device
        if device.type in ("cpu", "meta"):
            continue
        index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
        found.setdefault(device.type, set()).add(index)
    return {kind: sorted(indices) for kind, indices in found.items()}


def _seed_forked(seed: int, devices: dict[str, list[int]]) -> None:
    # Seed only the generators that were forked. torch.manual_seed would also seed every other CUDA device, or
    # queue a seed for CUDA's lazy initialisation when the model is on the CPU: both outlive the fork.
    torch.random.default_generator.manual_seed(seed)
    for kind, indices in devices.items():
        module = torch.get_device_module(kind)
        if hasattr(module, "default_generators"):  # cuda, xpu: one generator per device
            for index in indices:
                module.default_generators[index].manual_seed(seed)
        else:  # single-device backends (mps)
            module.manual_seed(seed)


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Inside: the CPU generator and those of every accelerator device holding ``model`` are seeded with ``seed``;
    on exit all of them are restored (the caller's RNG streams are untouched)."""
    accelerators = _accelerator_devices(model)
    with contextlib.ExitStack() as stack:
        # fork_rng forks the CPU RNG always, plus the listed devices of one accelerator type.
        stack.enter_context(torch.random.fork_rng(devices=[]))
        for kind, indices in accelerators.items():
            stack.enter_context(torch.random.fork_rng(devices=indices, device_type=kind))
        _seed_forked(seed, accelerators)
        yield


def _generate(model: nn.Module, prompts: Tensor, attention_mask: Tensor, *, max_new_tokens: int,
              stop_token_ids: Sequence[int], pad_token_id: int, **options) -> Tensor:
    """``model.generate`` on left-padded prompts in eval mode under no_grad (mode restored, also on errors);
    returns the new tokens [B, T] (T ≤ ``max_new_tokens``). ``options``: the decoding settings."""
    first_param = next(model.parameters(), None)
    model_device = first_param.device if first_param is not None else prompts.device  # the input embeddings'
    was_training = model.training
    model.eval()  # no dropout while sampling: the samples come from the model itself, not a perturbed copy
    try:
        # no_grad, not inference_mode: inference tensors could not be saved for the backward pass of a
        # training step that consumes these ids (the embedding lookup saves its indices).
        with torch.no_grad():
            output = model.generate(
                input_ids=prompts.to(model_device),
                attention_mask=attention_mask.to(model_device),
                max_new_tokens=max_new_tokens,
                eos_token_id=list(stop_token_ids),
                pad_token_id=pad_token_id,
                use_cache=True,
                # A checkpoint's generation_config may set a repetition penalty; it would bias the samples
                # away from the model's own distribution.
                repetition_penalty=1.0,
                **options,
            )
    finally:
        model.train(was_training)
    rows, width = prompts.shape
    if output.dim() != 2 or output.shape[0] != rows or output.shape[1] <= width:
        raise ValueError(f"generate returned shape {tuple(output.shape)}; expected [{rows}, > {width}] "
                         "(the left-padded prompts followed by new tokens)")
    return output[:, width:].long()


def sample_tokens(
    model: nn.Module,
    prompts: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    seed: Optional[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    synced: bool = False,
) -> Tensor:
    """The tokens ``model`` generates after the left-padded ``prompts`` [B, P] (``attention_mask`` 1 on real
    tokens): [B, T] with T ≤ ``max_new_tokens``, on the model's device; rows that stopped early are padded after
    their stop token (use :func:`first_stops`). ``synced``: ``model`` is sharded over processes that all call this
    together; each keeps stepping until every process's rows have stopped (transformers' ``synced_gpus``), so no
    process leaves the others waiting inside a forward.

    ``model`` is a Hugging Face causal LM (the bare one, not a data-parallel or
    :class:`~kdlm.models.DecoderOnly` wrapper). See the module docstring for the sampling, stopping and RNG rules;
    ``seed=None`` draws from the current RNG streams instead (for a caller that seeds several calls at once with
    :func:`seeded`).
    """
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    else:
        sampling = dict(do_sample=False)  # sampling knobs with greedy only draw warnings from transformers
    if synced:
        sampling["synced_gpus"] = True
    with seeded(model, seed) if seed is not None else contextlib.nullcontext():
        return _generate(model, prompts, attention_mask, max_new_tokens=max_new_tokens,
                         stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, **sampling)


def filtered_probs(logits: Tensor, *, temperature: float, top_p: float, top_k: int) -> Tensor:
    """The sampling distribution of ``logits`` [B, V] (float32): softmax(logits / temperature), restricted to the
    ``top_k`` largest logits (0 = off; ties at the k-th value are kept) and then to the nucleus (the tokens, by
    decreasing probability, whose preceding mass is below ``top_p``; the most likely token always stays),
    renormalised. Temperature, top-k, top-p in that order, as transformers' sampling warpers apply them."""
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class _RowSeededDraw:
    """A transformers logits processor that draws each row's next token itself, from that row's own generator.

    Inverse-CDF sampling: row r's token is the first whose cumulative probability (of :func:`filtered_probs`)
    exceeds u_r, one uniform u_r per row and decoding step from a CPU generator seeded with the row's seed. A
    row's samples thus depend on its own seed and logits only, not on the other rows of the batch. The processor
    returns 0 at the chosen token and −inf elsewhere, so transformers' greedy search takes it. It records the
    log-probability of each chosen token under the model's own distribution (log-softmax of the raw logits,
    temperature 1, no filter): ``logprobs`` [B, T].
    """

    def __init__(self, row_seeds: Sequence[int], *, temperature: float, top_p: float, top_k: int,
                 vocab_size: Optional[int]):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in row_seeds]
        self.temperature, self.top_p, self.top_k, self.vocab_size = temperature, top_p, top_k, vocab_size
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logits = scores.float()
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            logits[:, self.vocab_size:] = -math.inf  # rows past the tokenizer's vocabulary are padding, not tokens
        if self.temperature > 0:
            probs = filtered_probs(logits, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
            cdf = probs.double().cumsum(-1)
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators]).to(cdf.device)
            # right=True: the first index whose cumulative mass exceeds u·total, never a zero-probability token
            choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            choice = choice.clamp(max=logits.shape[-1] - 1)
        else:
            choice = logits.argmax(-1)
        self.steps.append(torch.log_softmax(logits, -1).gather(1, choice.unsqueeze(1)).squeeze(1))
        return torch.full_like(logits, -math.inf).scatter_(1, choice.unsqueeze(1), 0.0)

    @property
    def logprobs(self) -> Tensor:
        return torch.stack(self.steps, dim=1)


def sample_rows(
    model: nn.Module,
    prompts: Tensor,
    attention_mask: Tensor,
    *,
    row_seeds: Sequence[int],
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    vocab_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Like :func:`sample_tokens`, but row b is drawn from its own generator seeded with ``row_seeds[b]``: a row's
    sample is a function of its prompt, the model and its seed, whatever else is in the batch (see
    :class:`_RowSeededDraw`). ``vocab_size``: never sample output rows at or past it (padding of the output layer).

    Returns the new tokens [B, T] and their log-probabilities under the model at temperature 1 (float32 [B, T];
    meaningless after a row's stop token), both on the model's device. The caller's RNG streams are not used.
    """
    if len(row_seeds) != prompts.shape[0]:
        raise ValueError(f"{len(row_seeds)} row seeds for {prompts.shape[0]} prompts")
    from transformers import LogitsProcessorList

    draw = _RowSeededDraw(row_seeds, temperature=temperature, top_p=top_p, top_k=top_k, vocab_size=vocab_size)
    tokens = _generate(model, prompts, attention_mask, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                       pad_token_id=pad_token_id, do_sample=False, logits_processor=LogitsProcessorList([draw]))
    return tokens, draw.logprobs[:, : tokens.shape[1]].to(tokens.device)
