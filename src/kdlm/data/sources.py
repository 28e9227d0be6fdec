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
    response_source: str = "dataset"
    """Who wrote ``response``: ``dataset`` (the record) or ``teacher`` (set by ``fill_teacher_responses``)."""


def _jsonl_records(path: Path) -> Iterable[tuple[str, Any]]:
    """``(origin, record)`` of every non-blank line of a JSONL file: the one JSONL reader of kdlm's data (training,
    evaluation, DDK validation, DPKD's plain-text corpus), so every one of them reports bad bytes and bad JSON
    with ``file:line``."""
    # Binary, decoded line by line: a text-mode handle decodes in buffers and reports a byte offset in the buffer.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); save the file "
                    f"as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl` if it is Latin-1"
                ) from None
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


def _has_response(record: Any, cfg: DataConfig) -> bool:
    """Whether one record carries its own response: a string response field, or messages ending with the assistant's."""
    if not isinstance(record, dict):
        return False
    messages = record.get(cfg.messages_field)
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return messages[-1].get("role") == "assistant"
    return isinstance(record.get(cfg.response_field), str)


def _auto_responses(source: str, records: list[tuple[str, Any]], cfg: DataConfig) -> bool:
    """``data.responses=auto``: True when every record has a response, False when none has; a mix is an error,
    since either choice would silently drop something (the given responses, or the records without one)."""
    given = [_has_response(record, cfg) for _, record in records]
    if all(given) or not any(given):
        return given[0]
    first_without = records[given.index(False)][0]
    raise DataError(
        f"{first_without}: no response ('{cfg.response_field}' or a last '{cfg.messages_field}' entry by the assistant), "
        f"but {sum(given)} of {len(given)} records have one in {source}. Choose: data.responses: teacher (the teacher "
        "writes every response, the given ones are ignored) or data.responses: dataset (every record must have one)"
    )


def read_examples(source: str, cfg: DataConfig, *, builtin_split: str = "train") -> tuple[list[Example], bool]:
    """Read every record of ``source``; returns the examples and whether they carry their own responses.

    ``data.responses`` decides: ``dataset`` requires responses, ``teacher`` ignores them, ``auto`` uses them
    when every record has one and the teacher when none has (some but not all is an error naming the first
    record without one).
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
        use_dataset = _auto_responses(source, records, cfg)
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
        evaluation = stratified_sample(evaluation, cfg.max_eval_examples, seed)
    return train, evaluation, has_responses


def stratified_sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """At most ``n`` examples, each domain represented in proportion to its size, in their original order.

    Per-domain counts are ``n * size / total`` rounded systematically (:func:`kdlm.data.ddk.allocate_counts`, each
    count the floor or the ceiling of its share, summing to ``n``); the examples of a domain are a seeded shuffle's
    first ones, keyed by ``(seed, domain)``. The first ``n`` records would take whatever domain the file starts with.
    """
    from kdlm.data.ddk import allocate_counts

    if n >= len(examples):
        return list(examples)
    by_domain: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_domain.setdefault(example.domain, []).append(index)
    names = sorted(by_domain)
    sizes = [len(by_domain[name]) for name in names]
    counts = allocate_counts(sizes, sizes, n, random.Random(f"{seed}|allocate").random())
    kept: set[int] = set()
    for name, count in zip(names, counts):
        indices = list(by_domain[name])
        random.Random(f"{seed}|{name}").shuffle(indices)
        kept.update(indices[:count])
    return [example for index, example in enumerate(examples) if index in kept]


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
