"""Reading examples from JSONL, parquet, Hugging Face datasets, or the built-in demo prompts.

Every record becomes an :class:`Example`: the prompt as chat messages, the response (or None when the teacher
will write it), the domain, and where it came from (``file:line``) so that later errors can point at it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

from kdlm.config import DEMO_DATA, DataConfig
from kdlm.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    messages: list[dict[str, str]]
    """The prompt as chat messages (a plain prompt is one user message)."""
    response: Optional[str]
    """The target response; None until the teacher writes it."""
    domain: str
    origin: str
    """Where the record came from, e.g. ``data/train.jsonl:17``."""


def _jsonl_records(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                    "each line must be one JSON object"
                ) from None
            yield f"{path}:{number}", record


def _dataset_records(name: str, split: str) -> Iterable[tuple[str, Any]]:
    import datasets

    path = Path(name)
    try:
        if path.suffix == ".parquet":
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif path.is_dir():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise DataError(f"cannot load dataset '{name}': {err}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{name}: no split '{split}' (has {list(dataset)}); set data.hub_split")
        dataset = dataset[split]
    for index, record in enumerate(dataset):
        yield f"{name}[{index}]", record


def _to_example(origin: str, record: Any, cfg: DataConfig, need_response: bool) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{origin}: expected a JSON object with '{cfg.prompt_field}', got {type(record).__name__}")
    domain = record.get(cfg.domain_field)
    domain = "default" if domain is None else str(domain)
    if record.get(cfg.messages_field) is not None:
        messages = record[cfg.messages_field]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{origin}: field '{cfg.messages_field}' must be a non-empty list of {{role, content}}")
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise DataError(
                    f"{origin}: {cfg.messages_field}[{position}] must be {{'role': one of {ROLES}, 'content': str}}"
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        response = None
        if messages[-1]["role"] == "assistant":
            response = messages.pop()["content"]
        if not messages:
            raise DataError(f"{origin}: '{cfg.messages_field}' has no prompt before the assistant's response")
        if need_response and response is None:
            raise DataError(f"{origin}: the last of '{cfg.messages_field}' must be the assistant's response")
        return Example(messages, response, domain, origin)
    prompt = record.get(cfg.prompt_field)
    if not isinstance(prompt, str):
        raise DataError(
            f"{origin}: missing field '{cfg.prompt_field}' (a string) or '{cfg.messages_field}'; "
            f"found fields {sorted(record)} (rename them or set data.prompt_field / data.messages_field)"
        )
    response = record.get(cfg.response_field)
    if need_response and not isinstance(response, str):
        raise DataError(
            f"{origin}: missing field '{cfg.response_field}' (a string); found fields {sorted(record)} "
            "(set data.response_field, or data.responses=teacher to have the teacher write responses)"
        )
    return Example([{"role": "user", "content": prompt}], response if isinstance(response, str) else None, domain, origin)


def _has_responses(first: Any, cfg: DataConfig) -> bool:
    if not isinstance(first, dict):
        return False
    messages = first.get(cfg.messages_field)
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("role") == "assistant"
    return isinstance(first.get(cfg.response_field), str)


def read_examples(source: str, cfg: DataConfig, *, builtin_split: str = "train") -> tuple[list[Example], bool]:
    """Read every record of ``source``; returns the examples and whether they carry their own responses.

    ``data.responses`` decides: ``dataset`` requires responses, ``teacher`` ignores them, ``auto`` uses them
    when the first record has one.
    """
    if source == DEMO_DATA:
        text = resources.files("kdlm.data").joinpath("demo_prompts.jsonl").read_text(encoding="utf-8")
        records = [
            (f"builtin:demo_prompts.jsonl:{i}", r)
            for i, r in enumerate(map(json.loads, text.splitlines()), start=1)
            if r["split"] == builtin_split
        ]
    elif source.startswith("builtin:"):
        raise DataError(f"unknown built-in data '{source}'; the only one is '{DEMO_DATA}'")
    else:
        path = Path(source)
        if path.suffix in (".jsonl", ".json"):
            if not path.is_file():
                raise DataError(f"{path}: no such file")
            records = list(_jsonl_records(path))
        else:
            records = list(_dataset_records(source, cfg.hub_split))
    if not records:
        raise DataError(f"{source}: no records")
    if cfg.responses == "teacher":
        use_dataset = False
    elif cfg.responses == "dataset":
        use_dataset = True
    else:
        use_dataset = _has_responses(records[0][1], cfg)
    examples = [_to_example(origin, record, cfg, need_response=use_dataset) for origin, record in records]
    if not use_dataset:
        for example in examples:
            example.response = None
    return examples, use_dataset


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example], bool]:
    """Training and evaluation examples per the config (carving a seeded eval share when none is given)."""
    train, has_responses = read_examples(cfg.train, cfg)
    if cfg.eval is not None:
        evaluation, eval_has = read_examples(cfg.eval, cfg)
        if eval_has != has_responses:
            raise DataError(
                f"data.train ({cfg.train}) and data.eval ({cfg.eval}) disagree on whether responses are given; "
                "set data.responses explicitly"
            )
    elif cfg.train == DEMO_DATA:
        evaluation, _ = read_examples(cfg.train, cfg, builtin_split="heldout")
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(cfg.eval_fraction * len(train)))
        if n_eval >= len(train):
            raise DataError(f"{cfg.train}: {len(train)} examples are too few to carve an evaluation share from")
        held = set(order[:n_eval])
        evaluation = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    if cfg.max_train_examples is not None:
        train = train[: cfg.max_train_examples]
    if cfg.max_eval_examples is not None:
        evaluation = evaluation[: cfg.max_eval_examples]
    return train, evaluation, has_responses


def read_texts(source: str, field: str = "text", split: str = "train") -> list[str]:
    """Plain texts (a ``field`` column) from a JSONL file, a parquet file, a ``save_to_disk`` folder or a hub
    dataset, e.g. the plain-text corpus of DPKD's LM term. Errors name the file, line and field."""
    path = Path(source)
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _dataset_records(source, split)
    texts = []
    for origin, record in records:
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{origin}: expected a JSON object with a string field '{field}'")
        if record[field].strip():
            texts.append(record[field])
    if not texts:
        raise DataError(f"{source}: no non-empty '{field}' text")
    return texts
