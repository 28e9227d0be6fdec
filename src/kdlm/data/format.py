"""Prompt templating, tokenisation with prompt masking, and batching.

Layout of one training sequence: ``prompt_ids + response_ids + [eos]``; ``labels`` equal the input ids on the
response (and eos) and -100 on the prompt, so only response tokens enter any loss. The prompt is rendered with
the tokenizer's chat template when it has one (with the generation prompt, so the response starts exactly where
the model would start answering), else with a plain ``### User / ### Assistant`` template.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, TypedDict

import torch

from kdlm.data.sources import Example

log = logging.getLogger(__name__)
IGNORE = -100


def render_prompt(tokenizer, messages: list[dict[str, str]], system_prompt: Optional[str] = None) -> str:
    """The prompt text the model continues: chat template with generation prompt, or the plain template."""
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages]
    return "".join(turns) + "### Assistant:\n"


def encode_prompt(tokenizer, prompt_text: str) -> list[int]:
    # A chat template writes its own special tokens (bos included when the model wants one).
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    domain: str
    origin: str


@dataclass
class DropCounts:
    """What tokenisation dropped or cut, reported in the log and in metrics.jsonl."""

    kept: int = 0
    prompt_too_long: int = 0
    empty_response: int = 0
    truncated_response: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, reason: str, origin: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(origin)

    def summary(self, name: str) -> str:
        parts = [f"{name}: kept {self.kept}"]
        for reason in ("prompt_too_long", "empty_response", "truncated_response"):
            count = getattr(self, reason)
            if count:
                parts.append(f"{reason.replace('_', ' ')} {count} (e.g. {', '.join(self.examples[reason])})")
        return "; ".join(parts)


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    *,
    max_prompt_length: int,
    max_length: int,
    system_prompt: Optional[str] = None,
) -> tuple[list[Tokenized], DropCounts]:
    """Tokenise prompt + response + eos with the prompt masked; drop over-long prompts and empty responses."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; responses need an end marker")
    counts = DropCounts()
    out: list[Tokenized] = []
    for example in examples:
        if example.response is None:
            raise ValueError(f"{example.origin}: no response to train on")
        prompt_ids = encode_prompt(tokenizer, render_prompt(tokenizer, example.messages, system_prompt))
        if len(prompt_ids) > max_prompt_length:
            counts.note("prompt_too_long", example.origin)
            continue
        if not example.response.strip():
            counts.note("empty_response", example.origin)
            continue
        response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        room = max_length - len(prompt_ids)
        if len(response_ids) > room:
            counts.note("truncated_response", example.origin)
            response_ids = response_ids[:room]
        counts.kept += 1
        out.append(
            Tokenized(
                input_ids=prompt_ids + response_ids,
                labels=[IGNORE] * len(prompt_ids) + response_ids,
                prompt_length=len(prompt_ids),
                domain=example.domain,
                origin=example.origin,
            )
        )
    return out, counts


class Batch(TypedDict, total=False):
    """A training batch: what :func:`collate` returns, plus the keys objectives add along the way.

    Every tensor has B rows. Shapes: [B, L] unless said otherwise.
    """

    input_ids: torch.Tensor  # prompt + response, right-padded
    labels: torch.Tensor  # = input_ids on the response, IGNORE on prompt and padding
    attention_mask: torch.Tensor  # 1 on prompt + response
    prompt_lengths: torch.Tensor  # [B]
    ce_weights: torch.Tensor  # GKD with a reward: per-position weights of the CE term (the RLOO advantage)
    lm_input_ids: torch.Tensor  # DPKD's plain-text batch ([B', L']; lm_labels, lm_attention_mask alike)
    lm_labels: torch.Tensor
    lm_attention_mask: torch.Tensor
    rejected_input_ids: torch.Tensor  # DPKD sequence form: the student's sample (rejected_labels, ... alike)
    rejected_labels: torch.Tensor
    rejected_attention_mask: torch.Tensor
    rejected_prompt_lengths: torch.Tensor


def collate(items: list[Tokenized], pad_id: int) -> Batch:
    """Right-pad a batch. ``labels`` are -100 on prompt and padding; ``prompt_lengths`` [B] is each item's
    ``prompt_length`` (on-policy sampling re-extracts the prompts from it)."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    prompt_lengths = torch.tensor([item.prompt_length for item in items], dtype=torch.long)
    return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, prompt_lengths=prompt_lengths)


def response_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, L-1] of positions whose NEXT token is a response token, and those next tokens [N]."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    return mask, targets[mask]


def domain_counts(items: list[Tokenized]) -> dict[str, int]:
    return dict(Counter(item.domain for item in items))
