"""Batched generation (KV cache, left padding) and the teacher-response cache used for SeqKD-style data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Optional

import torch
from tqdm.auto import tqdm

from kdlm.config import Config
from kdlm.data.format import encode_prompt, render_prompt
from kdlm.data.sources import Example
from kdlm.errors import DataError
from kdlm.models import cache_root

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: keyed by the teacher's weights fingerprint instead of its path


@torch.no_grad()
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
) -> list[str]:
    """Complete each prompt; returns the decoded completions (special tokens stripped), in input order.

    Prompts are sorted by length so each batch pads little; the model is put in eval mode and restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, text) for text in prompt_texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Optional[str]] = [None] * len(encoded)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    bar = tqdm(total=len(encoded), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    new_tokens = 0
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            # Left padding: every prompt ends at the same column, so generation continues all of them at once.
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[r, width - len(encoded[i]) :] = 1
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            completions = output[:, width:]
            for r, i in enumerate(rows):
                tokens = completions[r].tolist()
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
                new_tokens += len(tokens)
                results[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{new_tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}")
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return [r if r is not None else "" for r in results]


def _responses_key(cfg: Config, prompt_texts: list[str]) -> str:
    """Hash of what the responses depend on: the teacher's weights (not its path: a teacher retrained into the same
    folder writes other responses) and dtype, the generation settings and the exact prompt texts."""
    from kdlm.cache import teacher_fingerprint

    identity = {
        "version": CACHE_VERSION,
        "teacher": [teacher_fingerprint(cfg), cfg.teacher.dtype],
        "generation": dataclasses.asdict(cfg.data.generation),
        "prompts": hashlib.sha256("\x00".join(prompt_texts).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def fill_teacher_responses(cfg: Config, teacher, tokenizer, examples: list[Example], name: str) -> None:
    """Give every example the teacher's response, generated once (batched, with progress) and cached on disk.

    The cache file is keyed by the teacher's weights, the generation settings and the exact prompt texts, and written
    atomically, so an interrupted generation leaves no partial cache behind.
    """
    prompt_texts = [render_prompt(tokenizer, e.messages, cfg.data.system_prompt) for e in examples]
    path = cache_root(cfg.data.cache_dir) / "responses" / f"{name}-{_responses_key(cfg, prompt_texts)}.jsonl"
    if path.is_file():
        responses = [json.loads(line)["response"] for line in path.read_text(encoding="utf-8").splitlines()]
        if len(responses) == len(examples):
            log.info("teacher responses for %s: cached in %s", name, path)
            for example, response in zip(examples, responses):
                example.response, example.response_source = response, "teacher"
            return
    if teacher is None:
        raise DataError(
            f"the teacher's responses for the {name} data are not cached under {path.parent}, and this run has no live "
            "teacher (cache.dir is set): run `kdlm cache-teacher` with the same config first, it writes them"
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
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for example, response in zip(examples, responses):
            handle.write(json.dumps({"origin": example.origin, "response": response}) + "\n")
    os.replace(tmp, path)
    log.info("teacher responses for %s cached in %s", name, path)
    for example, response in zip(examples, responses):
        example.response, example.response_source = response, "teacher"
