"""Text generation for evaluation and the teacher-response cache used for SeqKD-style data, on :mod:`kdlm.sampler`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Optional

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from kdlm.config import Config
from kdlm.data.format import encode_prompt, render_prompt
from kdlm.data.sources import Example
from kdlm.errors import DataError
from kdlm.models import cache_root
from kdlm.sampler import first_stops, left_pad, sample_tokens, seeded, stop_token_ids

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: keyed by the teacher's weights fingerprint instead of its path


def generate(
    model,
    tokenizer,
    prompt_texts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generating",
    process: tuple[int, int] = (0, 1),
) -> list[Optional[str]]:
    """Complete each prompt; returns the decoded completions (stop token cut, special tokens stripped), in input order.

    Greedy, or with ``do_sample`` sampled with ``temperature`` and ``top_p`` (top-k off), through
    :func:`kdlm.sampler.sample_tokens` (its stop and eval-mode rules); the RNG is seeded with ``seed`` once for all
    batches (:func:`kdlm.sampler.seeded`) and restored afterwards.
    Prompts are sorted by length so each batch pads little.

    ``process`` = (index, count) with count > 1: ``model`` is sharded over the processes (FSDP2), so every process
    must run each of its forwards together. The length-sorted batches are dealt round-robin (batch b to process
    b mod count: greedy results equal one process's, batch for batch), every process runs the same number of batches
    (a process short of one repeats its last and discards it) and each generation runs until every process's batch
    has stopped (transformers' ``synced_gpus``). Returns this process's completions, None for the others' prompts;
    sampling draws from stream ``seed + index``.
    """
    index, count = process
    encoded = [encode_prompt(tokenizer, text) for text in prompt_texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Optional[str]] = [None] * len(encoded)
    stops = stop_token_ids(tokenizer, model)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine = batches[index::count]
    rounds = -(-len(batches) // count)
    bar = tqdm(total=sum(map(len, mine)), desc=desc, unit="prompt", disable=not progress or index != 0,
               dynamic_ncols=True)
    new_tokens = 0
    try:
        with seeded(model, seed + index):  # one seed for the whole generation, as one long sampled stream
            for round_index in range(rounds):
                spare = round_index >= len(mine)  # lockstep only: this process has no batch left
                rows = (mine or batches)[-1] if spare else mine[round_index]
                right = pad_sequence([torch.tensor(encoded[i]) for i in rows], batch_first=True,
                                     padding_value=tokenizer.pad_token_id)
                input_ids, attention_mask = left_pad(right, torch.tensor([len(encoded[i]) for i in rows]),
                                                     tokenizer.pad_token_id)
                completions = sample_tokens(
                    model, input_ids, attention_mask, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                    pad_token_id=tokenizer.pad_token_id, seed=None, temperature=temperature if do_sample else 0.0,
                    top_p=top_p, top_k=0, synced=count > 1,
                ).cpu()
                if spare:
                    continue
                has_stop, first_stop = first_stops(completions, stops)
                for r, i in enumerate(rows):
                    tokens = completions[r].tolist()
                    if has_stop[r]:
                        tokens = tokens[: int(first_stop[r])]
                    new_tokens += len(tokens)
                    results[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{new_tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    finally:
        bar.close()
    return results if count > 1 else [r if r is not None else "" for r in results]


def _responses_key(cfg: Config, prompt_texts: list[str]) -> str:
    """Hash of what the responses depend on: the teacher's weights (not its path: a teacher retrained into the same
    folder writes other responses) and dtype, the generation settings and the exact prompt texts."""
    from kdlm.models import teacher_fingerprint

    identity = {
        "version": CACHE_VERSION,
        "teacher": [teacher_fingerprint(cfg), cfg.teacher.dtype],
        "generation": dataclasses.asdict(cfg.data.generation),
        "prompts": hashlib.sha256("\x00".join(prompt_texts).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _cached_responses(path, examples: list[Example]) -> Optional[list[str]]:
    if not path.is_file():
        return None
    responses = [json.loads(line)["response"] for line in path.read_text(encoding="utf-8").splitlines()]
    return responses if len(responses) == len(examples) else None


def fill_teacher_responses(cfg: Config, teacher, tokenizer, examples: list[Example], name: str,
                           process: tuple[int, int] = (0, 1)) -> None:
    """Give every example the teacher's response, generated once (batched, with progress) and cached on disk.

    The cache file is keyed by the teacher's weights, the generation settings and the exact prompt texts, and written
    atomically, so an interrupted generation leaves no partial cache behind.

    ``process`` = (index, count), count > 1: a teacher sharded over the processes; every process calls this, process
    0's look at the cache decides for all, they generate together (:func:`generate`'s lockstep), and process 0
    writes the cache from everyone's responses.
    """
    index, count = process
    prompt_texts = [render_prompt(tokenizer, e.messages, cfg.data.system_prompt) for e in examples]
    path = cache_root(cfg.data.cache_dir) / "responses" / f"{name}-{_responses_key(cfg, prompt_texts)}.jsonl"
    responses = _cached_responses(path, examples) if index == 0 else None
    if count > 1:
        import torch.distributed as dist

        shared = [responses]
        dist.broadcast_object_list(shared, src=0)
        responses = shared[0]
    if responses is not None:
        log.info("teacher responses for %s: cached in %s", name, path)
        for example, response in zip(examples, responses):
            example.response, example.response_source = response, "teacher"
        return
    if teacher is None:
        raise DataError(
            f"the teacher's responses for the {name} data are not cached under {path.parent}, and this run has no live "
            "teacher (cache.dir or teacher.server is set): run `kdlm cache-teacher` (or `kdlm distill`) with the same config "
            "and the teacher run here (no teacher.server) first, it writes them"
        )
    gen = cfg.data.generation
    responses = generate(
        teacher,
        tokenizer,
        prompt_texts,
        max_new_tokens=gen.max_new_tokens,
        batch_size=gen.batch_size,
        do_sample=gen.do_sample,
        temperature=gen.temperature,
        top_p=gen.top_p,
        seed=cfg.train.seed,
        progress=cfg.train.progress,
        desc=f"teacher responses ({name})",
        process=process,
    )
    if count > 1:  # each process has its share: merge
        import torch.distributed as dist

        shares: list = [None] * count
        dist.all_gather_object(shares, responses)
        responses = [next(share[i] for share in shares if share[i] is not None) for i in range(len(examples))]
    if index == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for example, response in zip(examples, responses):
                handle.write(json.dumps({"origin": example.origin, "response": response}) + "\n")
        os.replace(tmp, path)
        log.info("teacher responses for %s cached in %s", name, path)
    for example, response in zip(examples, responses):
        example.response, example.response_source = response, "teacher"
