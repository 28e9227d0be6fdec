"""What the objectives that train on sampled responses share (GKD, DPKD's sequence form): per-row seeds, the one
rollout call per window (:func:`kdlm.train.rollout.sample_window`, on :mod:`kdlm.sampler`), the buffer of steps
sampled ahead (``sampling.steps_per_generation``), the off-policy statistics and the sample log.

Both rewrite an optimizer step's batches before the loss (``prepare_window``), so the training loop stays the
same for every method: it hands the objective a way to draw a step's batches, lets it prepare them, counts the
loss's units over the whole step and all processes, and accumulates.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdlm.config import ObjectiveConfig
from kdlm.data.format import IGNORE, response_positions
from kdlm.errors import CheckpointError
from kdlm.losses import token_nll
from kdlm.models import OutputHead, unwrap
from kdlm.sampler import stop_token_ids
from kdlm.train.objectives.base import BuildContext
from kdlm.train.rollout import Engine, RolloutStats, SamplingSettings, hf_engine, sample_window

Window = list[dict]
"""One optimizer step's micro-batches on this process."""


def _seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and Python runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


class Sampling:
    """What GKD and DPKD share: the sampling settings and seeded, batched calls of :func:`sample_window`."""

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext, engine: Engine = hf_engine):
        if context.tokenizer is None:
            raise ValueError(f"objective '{cfg.name}' samples responses: make_objective needs the tokenizer")
        self.sampling = cfg.sampling
        self.steps_per_generation = int(cfg.sampling.steps_per_generation)
        self.tokenizer, self.max_length, self.seed = context.tokenizer, context.max_length, context.seed
        self.vocab_size, self.engine = context.vocab_size, engine
        self.samples_file = Path(context.run_dir) / "samples.jsonl" if context.run_dir else None
        self.vllm = None  # sampling.engine vllm: a server of the student, started at the first sample
        if self.sampling.engine == "vllm":
            from kdlm.train.vllm_engine import VLLMEngine  # no vLLM environment: ServerError naming `make vllm`

            self.vllm = VLLMEngine(max_model_len=(context.max_length or 2048) + self.sampling.max_new_tokens)

    def engine_at(self, step: int, who: str) -> Engine:
        """The engine that samples ``who`` at optimizer step ``step``: the vLLM server (holding the student of that
        step, pushed when it changed) for the student with ``sampling.engine: vllm``, else this sampler's engine
        (the teacher's ``seq_kd`` samples stay on hf)."""
        if self.vllm is not None and who == "student":
            return self.vllm.engine(version=step, tokenizer=self.tokenizer)
        return self.engine

    def settings(self, model: nn.Module) -> SamplingSettings:
        sp = self.sampling
        return SamplingSettings(
            max_new_tokens=sp.max_new_tokens, stop_token_ids=tuple(stop_token_ids(self.tokenizer, model)),
            pad_token_id=self.tokenizer.pad_token_id, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
            max_length=self.max_length, vocab_size=self.vocab_size,
        )

    def row_seeds(self, who: str, step: int, process_index: int, micro: int, rows: int) -> list[int]:
        """Seeds of the rows of micro-batch ``micro`` of step ``step``: from (train.seed, who, step, process,
        micro-batch, row), so a row's sample does not depend on which call sampled it."""
        return [_seed(self.seed, who, step, process_index, micro, row) for row in range(rows)]

    def sample_steps(self, model: nn.Module, windows: dict[int, Window], *, who: str, process_index: int,
                     now: int) -> tuple[dict[int, Window], RolloutStats]:
        """Completions from ``model`` (the policy of optimizer step ``now``) for every micro-batch of every step in
        ``windows`` (step -> its micro-batches), in ONE engine call; returns the sampled windows (same keys) and the
        call's stats."""
        keys = [(step, micro) for step, window in windows.items() for micro in range(len(window))]
        batches = [windows[step][micro] for step, micro in keys]
        seeds = [self.row_seeds(who, step, process_index, micro, b["input_ids"].shape[0])
                 for (step, micro), b in zip(keys, batches)]
        sampled, stats = sample_window(model, batches, seeds, self.settings(model), engine=self.engine_at(now, who))
        out: dict[int, Window] = {step: [] for step in windows}
        for (step, _), batch in zip(keys, sampled):
            out[step].append(batch)
        return out, stats

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


class StepBuffer:
    """Steps drawn (and sampled) ahead within a ``steps_per_generation`` window: step -> its micro-batches and the
    step whose weights sampled them (None: not sampled from the student). Saved with the checkpoint, so a run
    resumed in the middle of a window trains on exactly the batches the uninterrupted run would have."""

    def __init__(self, steps_per_generation: int):
        self.k = steps_per_generation
        self.entries: dict[int, tuple[Window, Optional[int]]] = {}

    def window_steps(self, step: int) -> range:
        """The steps of the window that starts at ``step``: up to the next multiple of k (windows stay aligned to
        multiples of k, whatever step a run starts or resumes at)."""
        return range(step, step + self.k - step % self.k)

    def put(self, step: int, window: Window, sampled_at: Optional[int]) -> None:
        self.entries[step] = (window, sampled_at)

    def pop(self, step: int, device) -> Optional[tuple[Window, Optional[int]]]:
        """Step ``step``'s entry (its tensors on ``device``), or None when the step starts a new window."""
        entry = self.entries.pop(step, None)
        if entry is None:
            return None
        window, sampled_at = entry
        return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in window], sampled_at

    def state_dict(self) -> dict:
        """Plain containers and CPU tensors (checkpoint.py loads them with ``weights_only``)."""
        if not self.entries:
            return {}
        return {"steps_per_generation": self.k, "entries": [
            {"step": step, "sampled_at": -1 if at is None else at,
             "window": [{k: v.cpu() for k, v in b.items() if torch.is_tensor(v)} for b in window]}
            for step, (window, at) in sorted(self.entries.items())]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["steps_per_generation"] != self.k:
            raise CheckpointError(f"the checkpoint was written with objective.sampling.steps_per_generation "
                                  f"{state['steps_per_generation']}, this run has {self.k}: resume with the same value")
        self.entries = {e["step"]: (e["window"], None if e["sampled_at"] < 0 else e["sampled_at"])
                        for e in state["entries"]}


class OffPolicyStats:
    """Per-token log-ratio d = log q_train(y) − log q_sample(y) of the sampled tokens: the student at training
    time against the student that sampled them (both at temperature 1), accumulated over one step's micro-batches.

    log q_sample comes from the sampler (``sample_logprobs``); log q_train from the loss's own forward pass: the
    student's final hidden states are captured with a forward hook and only the output layer is applied again, at
    the response positions, under no_grad (no second pass through the decoder layers).
    """

    def __init__(self, vocab_size: int, chunk_rows: int = 1024):
        self.vocab_size, self.chunk_rows = vocab_size, chunk_rows
        self.total = self.squares = 0.0
        self.count = 0

    def reset(self) -> None:
        self.total = self.squares = 0.0
        self.count = 0

    def measure(self, student: nn.Module, batch: dict, loss: Callable[[], Any]) -> Any:
        """``loss()`` (the objective's forward on ``batch``), also adding the batch's log-ratios to the sums."""
        captured: list[torch.Tensor] = []
        wrapper = unwrap(student)  # the DecoderOnly: its output is the final hidden states [B, T, H]
        handle = wrapper.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
        try:
            out = loss()
        finally:
            handle.remove()
        mask, targets = response_positions(batch)
        hidden = captured[0][:, :-1][mask]
        sampled = batch["sample_logprobs"][:, 1:][mask].float()
        head = OutputHead.of(wrapper.lm, self.vocab_size)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], self.chunk_rows):
                rows = slice(start, start + self.chunk_rows)
                current = -token_nll(head.logits(hidden[rows].float()), targets[rows])
                d = (current - sampled[rows]).double()
                self.total += float(d.sum())
                self.squares += float((d * d).sum())
                self.count += int(d.numel())
        return out

    def as_stats(self, prefix: str) -> dict[str, float]:
        """Mean and standard deviation (population) of d over the step's measured tokens on this process."""
        if self.count == 0:
            return {}
        mean = self.total / self.count
        return {prefix + "log_ratio_mean": mean,
                prefix + "log_ratio_std": math.sqrt(max(self.squares / self.count - mean * mean, 0.0))}
