"""What the objectives that train on sampled responses share (GKD, DPKD's sequence form): per-sample seeds, the
seeded rollout call (:func:`kdlm.train.rollout.sample_responses`, on :mod:`kdlm.sampler`) and the sample log.

Both rewrite an optimizer step's batches before the loss (``prepare_window``), so the training loop stays the
same for every method: it draws the step's batches, lets the objective prepare them, counts the loss's units
over the whole step and all processes, and accumulates.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlm.config import ObjectiveConfig
from kdlm.data.format import IGNORE
from kdlm.sampler import stop_token_ids
from kdlm.train.objectives.base import BuildContext
from kdlm.train.rollout import sample_responses
from kdlm.train.sharding import full_parameters


def _seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and Python runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


class Sampling:
    """What GKD and DPKD share: the sampling settings and a seeded call of :func:`sample_responses`."""

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext):
        if context.tokenizer is None:
            raise ValueError(f"objective '{cfg.name}' samples responses: make_objective needs the tokenizer")
        self.sampling = cfg.sampling
        self.tokenizer, self.max_length, self.seed = context.tokenizer, context.max_length, context.seed
        self.samples_file = Path(context.run_dir) / "samples.jsonl" if context.run_dir else None

    def sample(self, model: nn.Module, batch: dict, *, step: int, process_index: int, micro: int, who: str):
        sp = self.sampling
        with full_parameters(model):  # train.parallel fsdp: sampling calls the bare model, gathered meanwhile
            return sample_responses(
                model, batch, max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                top_k=sp.top_k, stop_token_ids=stop_token_ids(self.tokenizer, model),
                pad_token_id=self.tokenizer.pad_token_id, seed=_seed(self.seed, who, step, process_index, micro),
                max_length=self.max_length,
            )

    def decode(self, batch: dict) -> tuple[list[str], list[str]]:
        """Prompts and completions (special tokens stripped) of a batch in collate's layout."""
        prompts, completions = [], []
        for row in range(batch["input_ids"].shape[0]):
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            n = int(batch["prompt_lengths"][row])
            prompts.append(self.tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True))
            completions.append(self.tokenizer.decode(ids[labels != IGNORE].tolist(), skip_special_tokens=True))
        return prompts, completions

    def keep_samples(self, batch: dict, step: int, who: str, process_index: int, count: int = 2) -> None:
        """Append a few decoded samples to ``samples.jsonl`` in the run directory (process 0 only)."""
        if self.samples_file is None or process_index != 0:
            return
        prompts, completions = self.decode({k: v[:count] for k, v in batch.items() if torch.is_tensor(v)})
        with self.samples_file.open("a") as handle:
            for prompt, completion in zip(prompts, completions):
                handle.write(json.dumps({"step": step, "from": who, "prompt": prompt, "completion": completion}) + "\n")
