"""The one token sampler: seeded, stop-aware, batched with left padding and the KV cache.

Every generation in kdlm goes through :func:`sample_tokens`: the teacher's responses that are cached as training
data and the evaluation generations (:mod:`kdlm.generation`), and the on-policy rollouts of GKD and DPKD
(:mod:`kdlm.train.rollout`). A faster engine plugs in here.

Rules, the same for every caller:

* a completion stops at any of :func:`stop_token_ids`: the tokenizer's eos and the model's generation-config eos
  ids (chat models often have several);
* ``temperature > 0`` samples with ``temperature``, ``top_p`` and ``top_k`` (0 = off); ``temperature == 0`` is
  greedy; the model's own generation config cannot add a repetition penalty;
* samples are a function of ``seed`` alone: the CPU generator and the generators of every accelerator device that
  holds the model's parameters are forked, seeded and restored, so the caller's RNG streams are untouched;
* the model runs in eval mode under ``torch.no_grad()``; its train/eval mode is restored, also on errors.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["first_stops", "left_pad", "sample_tokens", "seeded", "stop_token_ids"]


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
) -> Tensor:
    """The tokens ``model`` generates after the left-padded ``prompts`` [B, P] (``attention_mask`` 1 on real
    tokens): [B, T] with T ≤ ``max_new_tokens``, on the model's device; rows that stopped early are padded after
    their stop token (use :func:`first_stops`).

    ``model`` is a Hugging Face causal LM (the bare one, not a data-parallel or
    :class:`~kdlm.models.DecoderOnly` wrapper). See the module docstring for the sampling, stopping and RNG rules;
    ``seed=None`` draws from the current RNG streams instead (for a caller that seeds several calls at once with
    :func:`seeded`).
    """
    first_param = next(model.parameters(), None)
    model_device = first_param.device if first_param is not None else prompts.device  # the input embeddings'
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    else:
        sampling = dict(do_sample=False)  # sampling knobs with greedy only draw warnings from transformers
    was_training = model.training
    model.eval()  # no dropout while sampling: the samples come from the model itself, not a perturbed copy
    try:
        with seeded(model, seed) if seed is not None else contextlib.nullcontext():
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
                    **sampling,
                )
    finally:
        model.train(was_training)
    rows, width = prompts.shape
    if output.dim() != 2 or output.shape[0] != rows or output.shape[1] <= width:
        raise ValueError(f"generate returned shape {tuple(output.shape)}; expected [{rows}, > {width}] "
                         "(the left-padded prompts followed by new tokens)")
    return output[:, width:].long()
