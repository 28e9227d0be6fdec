"""GKD: generalized KD on dataset, teacher-sampled or student-sampled responses.

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
"""

from __future__ import annotations

import importlib
import random
from typing import Callable

import torch
from torch import nn

from kdlm.config import ConfigError, ObjectiveConfig
from kdlm.data.format import IGNORE
from kdlm.train.objectives.base import BuildContext, StepOutput
from kdlm.train.objectives.kd import KD
from kdlm.train.objectives.sampling import Sampling, _seed


def load_reward_fn(path: str) -> Callable[[list[str], list[str]], list[float]]:
    """Import ``'module:function'``; a clear error names ``objective.reward_fn`` when it cannot be found."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"objective.reward_fn: cannot import {path!r} ({error}); give 'module:function' on sys.path") from error
    if not callable(fn):
        raise ConfigError(f"objective.reward_fn: {path!r} is not callable; name a function 'module:function'")
    return fn


class GKD(KD):
    """Generalized KD: the divergence on dataset, teacher-sampled or student-sampled responses (one coin per step)."""

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext):
        super().__init__(cfg, context)
        self.lmbda = cfg.setting("lmbda")
        self.seq_kd = bool(cfg.setting("seq_kd"))
        self.sampler = Sampling(cfg, context)
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self.reward_alpha = cfg.setting("reward_alpha")
        self.seed = context.seed

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
