"""Objectives that train on sampled responses: GKD (on-policy KD) and DPKD's sequence form.

Both rewrite an optimizer step's batches before the loss (``prepare_window``), so the training loop stays the
same for every method: it draws the step's batches, lets the objective prepare them, counts the loss's units
over the whole step and all processes, and accumulates.

* **GKD** (Agarwal et al., ICLR 2024, arXiv 2306.13649). One coin per optimizer step, the same on every
  process: with probability λ (``objective.lmbda``) the step's responses are sampled from the current student
  (no gradient through sampling; prompt masked; tokens after the first stop token masked), else the dataset's
  responses are used, or, with ``seq_kd``, responses sampled from the teacher. The loss is
  ``(1 − kd_ratio)·CE + kd_ratio·D(p‖q)`` on those tokens (gkd's default kd_ratio is 1: pure divergence, the
  paper's). Each process samples with its own seed (``seed``, step, process, micro-batch).
* **GKD + reward** (``objective.reward_fn``, ``reward_alpha`` = α): on the student's samples the objective
  maximises ``(1 − α)·E[r(y)] − α·E[D]``. The reward's gradient is estimated with REINFORCE and a leave-one-out
  baseline (RLOO: Kool et al. 2019; Ahmadian et al. 2024): advantage ``A_i = r_i − mean_{j≠i} r_j`` over the
  micro-batch, which is unbiased because the baseline does not depend on ``y_i``, and lowers the variance of
  plain REINFORCE. The surrogate is ``Σ_t A_i·(−log q(y_{i,t}))`` per token (the CE term with per-token weights
  ``A_i``), mixed as ``(1 − α)·surrogate + α·D`` and averaged over the step's response tokens. On dataset steps
  (λ < 1) the weights are 0: only ``α·D`` remains.
* **DPKD, sequence form** (Li et al., arXiv 2406.19774, Eq. 9): the batch's responses are the chosen ``y_t``
  (the teacher's, with ``data.responses: teacher``); the rejected ``y_s`` is sampled from the student and kept
  for ``refresh_every`` steps. Loss per pair ``kd_ratio·(−log σ(β·(r(y_t) − r(y_s)))) + (1 − kd_ratio)·CE(y_t)``
  (:class:`DPKDSequence`), averaged over the step's pairs (``units`` = pairs).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdlm import losses
from kdlm.config import ObjectiveConfig
from kdlm.data.format import IGNORE
from kdlm.losses.dpkd import dpkd_sequence_loss, dpkd_sequence_stats
from kdlm.models import DecoderOnly, OutputHead, unwrap
from kdlm.train.objectives import StepOutput, _KD, plain_text_loss
from kdlm.train.rollout import sample_responses

log = logging.getLogger(__name__)


def _seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes and Python runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def load_reward_fn(path: str) -> Callable[[list[str], list[str]], list[float]]:
    """Import ``'module:function'``; a clear error names ``objective.reward_fn`` when it cannot be found."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"objective.reward_fn: cannot import {path!r} ({error}); give 'module:function' on sys.path") from error
    if not callable(fn):
        raise ValueError(f"objective.reward_fn: {path!r} is not callable")
    return fn


def stop_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """The tokenizer's eos plus the model's generation-config eos ids (chat models often have several)."""
    ids = {int(tokenizer.eos_token_id)}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    return sorted(ids)


class _Sampling:
    """What GKD and DPKD share: the sampling settings and a seeded call of :func:`sample_responses`."""

    def __init__(self, cfg: ObjectiveConfig, tokenizer, max_length: Optional[int], seed: int, run_dir: Optional[str]):
        self.sampling = cfg.sampling
        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self.samples_file = Path(run_dir) / "samples.jsonl" if run_dir else None

    def sample(self, model: nn.Module, batch: dict, *, step: int, process_index: int, micro: int, who: str):
        sp = self.sampling
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


class GKD(_KD):
    """Generalized KD: the divergence on dataset, teacher-sampled or student-sampled responses (one coin per step)."""

    def __init__(self, cfg: ObjectiveConfig, teacher: nn.Module, vocab_size: int, *, tokenizer, max_length, seed, run_dir):
        super().__init__(cfg, teacher, vocab_size)
        self.lmbda = 0.5 if cfg.lmbda is None else cfg.lmbda
        self.seq_kd = bool(cfg.seq_kd)
        self.sampler = _Sampling(cfg, tokenizer, max_length, seed, run_dir)
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self.reward_alpha = 0.5 if cfg.reward_alpha is None else cfg.reward_alpha
        self.seed = seed

    def prepare_window(self, window: list[dict], *, step: int, student_lm: nn.Module, process_index: int):
        # One coin per optimizer step, from (seed, step) only: every process takes the same branch.
        on_policy = random.Random(_seed(self.seed, "gkd-coin", step)).random() < self.lmbda
        stats: dict[str, float] = {"gkd/on_policy": float(on_policy)}
        source = student_lm if on_policy else (self.teacher if self.seq_kd else None)
        if source is not None:
            who = "student" if on_policy else "teacher"
            sampled, generated, seconds = [], 0, 0.0
            for micro, batch in enumerate(window):
                new_batch, rollout = self.sampler.sample(source, batch, step=step, process_index=process_index,
                                                         micro=micro, who=who)
                generated += rollout.generated_tokens
                seconds += rollout.wall_seconds
                sampled.append(new_batch)
            window = sampled
            self.sampler.keep_samples(window[0], step, who, process_index)
            rows = sum(b["input_ids"].shape[0] for b in window)
            stats.update({"gkd/generated_tokens_per_s": generated / max(seconds, 1e-9),
                          "gkd/mean_completion_length": generated / max(rows, 1)})
        if self.reward_fn is not None:
            rewards = []
            for batch in window:
                weights, batch_rewards = self._advantages(batch, on_policy)
                batch["ce_weights"] = weights
                rewards += batch_rewards
            if rewards:
                stats["gkd/reward"] = sum(rewards) / len(rewards)
        return window, stats

    def kd_ratio(self, batch: dict) -> float:
        # With a reward the CE term is the RLOO policy-gradient surrogate: mix it as (1 − α)·surrogate + α·D.
        return self.reward_alpha if self.reward_fn is not None else self.cfg.kd_ratio

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        out = super().__call__(student, batch)
        if self.reward_fn is not None:  # the "ce" sum is the advantage-weighted surrogate here, not a cross-entropy
            out.metrics["pg_surrogate"] = out.metrics.pop("ce")
        return out

    def _advantages(self, batch: dict, on_policy: bool) -> tuple[torch.Tensor, list[float]]:
        """Per-position CE weights: the RLOO advantage of the row on its response tokens (0 off-policy)."""
        weights = torch.zeros(batch["labels"].shape, dtype=torch.float32, device=batch["labels"].device)
        if not on_policy:
            return weights, []
        prompts, completions = self.sampler.decode(batch)
        rewards = [float(r) for r in self.reward_fn(prompts, completions)]
        if len(rewards) != len(prompts):
            raise ValueError(f"objective.reward_fn returned {len(rewards)} rewards for {len(prompts)} completions")
        r = torch.tensor(rewards, dtype=torch.float32, device=weights.device)
        n = r.numel()
        baseline = (r.sum() - r) / (n - 1) if n > 1 else torch.zeros_like(r)  # leave-one-out
        advantage = r - baseline
        weights += advantage.unsqueeze(1)
        weights[batch["labels"] == IGNORE] = 0.0
        return weights, rewards


class DPKDSequence:
    """DPKD, paper form (Eq. 9): prefer the teacher's response y_t over the student's own sample y_s.

    Per pair: ``kd_ratio·(−log σ(β·(r(y_t) − r(y_s)))) + (1 − kd_ratio)·CE(y_t)``, with ``r(y)`` the
    length-normalised ``log q − log p`` and CE(y_t) the mean token cross-entropy of the chosen response (the
    paper's λ·L_lm on the dataset, λ = (1 − kd_ratio)/kd_ratio). Averaged over the step's pairs. Logs the
    reward margin, preference accuracy and the chosen/rejected implicit rewards (TRL's DPO names).
    """

    def __init__(self, cfg: ObjectiveConfig, teacher: nn.Module, vocab_size: int, *, tokenizer, max_length, seed, run_dir):
        self.cfg, self.teacher, self.vocab_size = cfg, teacher, vocab_size
        self.beta = 0.1 if cfg.dpkd_beta is None else cfg.dpkd_beta
        self.refresh_every = cfg.refresh_every or 1
        self.sampler = _Sampling(cfg, tokenizer, max_length, seed, run_dir)
        self.plain_text = None  # DPKD's plain-text LM term (objective.lm_data), set by make_objective
        self.lm_weight = 0.5 if cfg.lm_weight is None else cfg.lm_weight
        # prompt tokens -> (step sampled, completion tokens incl. stop); stale after refresh_every steps
        self._rejected: dict[tuple[int, ...], tuple[int, list[int]]] = {}

    def units(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def prepare_window(self, window: list[dict], *, step: int, student_lm: nn.Module, process_index: int):
        out, fresh = [], 0
        for micro, batch in enumerate(window):
            keys = [tuple(batch["input_ids"][r, : int(batch["prompt_lengths"][r])].tolist())
                    for r in range(batch["input_ids"].shape[0])]
            stale = [k not in self._rejected or step - self._rejected[k][0] >= self.refresh_every for k in keys]
            if any(stale):
                sampled, _ = self.sampler.sample(student_lm, batch, step=step, process_index=process_index,
                                                 micro=micro, who="student")
                for r, key in enumerate(keys):
                    if stale[r]:
                        completion = sampled["input_ids"][r][sampled["labels"][r] != IGNORE].tolist()
                        self._rejected[key] = (step, completion)
                        fresh += 1
            rejected = self._rejected_batch(batch, keys)
            out.append({**batch, **{f"rejected_{k}": v for k, v in rejected.items()}})
            if self.plain_text is not None:
                out[-1].update(self.plain_text.batch(step, process_index, micro, batch["input_ids"].device))
        self.sampler.keep_samples({k[len("rejected_"):]: v for k, v in out[0].items() if k.startswith("rejected_")},
                                  step, "student", process_index)
        return out, {"dpkd/resampled": float(fresh)}

    def _rejected_batch(self, batch: dict, keys: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        from kdlm.data.format import Tokenized, collate

        items = []
        for key in keys:
            completion = self._rejected[key][1]
            items.append(Tokenized(list(key) + completion, [IGNORE] * len(key) + completion, len(key), "", ""))
        rejected = collate(items, self.sampler.tokenizer.pad_token_id)
        return {k: v.to(batch["input_ids"].device) for k, v in rejected.items()}

    @staticmethod
    def _token_logps(lm_hidden: torch.Tensor, head: OutputHead, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log q(label) [B, L-1] (0 where masked) and the mask, from final hidden states."""
        targets = labels[:, 1:]
        mask = targets != IGNORE
        logp = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        logp = logp.masked_scatter(mask, -losses.token_nll(head.logits(lm_hidden[:, :-1][mask]), targets[mask]))
        return logp, mask

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        s_head = OutputHead.of(unwrap(student).lm, self.vocab_size)
        t_head = OutputHead.of(self.teacher, self.vocab_size)
        sides = {}
        for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
            ids, attn, labels = batch[prefix + "input_ids"], batch[prefix + "attention_mask"], batch[prefix + "labels"]
            s_logp, mask = self._token_logps(student(ids, attn), s_head, labels)
            with torch.no_grad():
                t_logp, _ = self._token_logps(DecoderOnly(self.teacher)(ids, attn), t_head, labels)
            sides[side] = (s_logp, t_logp, mask)
        args = (sides["chosen"][0], sides["chosen"][1], sides["rejected"][0], sides["rejected"][1],
                sides["chosen"][2], sides["rejected"][2])
        pairs = sides["chosen"][0].shape[0]
        preference = dpkd_sequence_loss(*args, beta=self.beta) * pairs  # a sum over pairs
        s_logp, _, mask = sides["chosen"]
        ce = (-(s_logp * mask).sum(1) / mask.sum(1).clamp_min(1)).sum()  # length-normalised CE of y_t, summed
        r = self.cfg.kd_ratio
        loss_sum = r * preference + (1 - r) * ce
        stats = dpkd_sequence_stats(*args, beta=self.beta)
        metrics = {"dpkd": float(preference.detach()), "ce": float(ce.detach()),
                   **{k: v * pairs for k, v in stats.as_dict().items()}}
        if "lm_input_ids" in batch:  # plain-text LM term, per pair
            lm_mean = plain_text_loss(self, student, batch)
            loss_sum = loss_sum + self.lm_weight * lm_mean * pairs
            metrics["lm"] = float(lm_mean.detach() * pairs)
        return StepOutput(loss_sum, metrics)
