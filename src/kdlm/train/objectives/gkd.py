"""GKD: generalized KD on dataset, teacher-sampled or student-sampled responses.

* **GKD** (Agarwal et al., ICLR 2024, arXiv 2306.13649). One coin per optimizer step, the same on every
  process: with probability λ (``objective.lmbda``) the step's responses are sampled from the current student
  (no gradient through sampling; prompt masked; tokens after the first stop token masked), else the dataset's
  responses are used, or, with ``seq_kd``, responses sampled from the teacher. The loss is
  ``(1 − kd_ratio)·CE + kd_ratio·D(p‖q)`` on those tokens (gkd's default kd_ratio is 1: pure divergence, the
  paper's). Each row is sampled with its own seed (``seed``, step, process, micro-batch, row).
* **Steps per generation** (``sampling.steps_per_generation`` = k, default 1): at the start of every k-step
  window the student samples the responses of all the window's on-policy steps (all their micro-batches) in one
  call; step t + j trains on samples of the student of step t (staleness j). k = 1 is exactly on-policy (one
  call per optimizer step). Each step keeps its own coin: off-policy steps of a window use the dataset (or the
  teacher's samples, drawn at that step). Logged: ``gkd/staleness`` and, on stale steps, the mean and standard
  deviation of the per-token log-ratio log q_train(y) − log q_sample(y) (:class:`OffPolicyStats`); 0 on fresh
  steps, where the sampling weights are the training weights.
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
from typing import Callable, Optional

import torch
from torch import nn

from kdlm.config import ConfigError, ObjectiveConfig
from kdlm.data.format import IGNORE
from kdlm.train.objectives.base import BuildContext, StepOutput
from kdlm.train.objectives.kd import KD
from kdlm.train.objectives.sampling import OffPolicyStats, Sampling, StepBuffer, Window, _seed


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
        self.buffer = StepBuffer(self.sampler.steps_per_generation)
        self.offpolicy = OffPolicyStats(context.vocab_size)
        self._step_stats: dict[str, float] = {}
        self._measure = False

    def coin(self, step: int) -> bool:
        """Whether step ``step`` trains on the student's samples: from (seed, step) only, the same on every process."""
        return random.Random(_seed(self.seed, "gkd-coin", step)).random() < self.lmbda

    def prepare_window(self, draw: Callable[[int], Optional[Window]], *, step: int, student_lm: nn.Module,
                       process_index: int):
        stats: dict[str, float] = {}
        device = next(student_lm.parameters()).device
        entry = self.buffer.pop(step, device)
        if entry is None:  # a new window: draw its steps and sample all their on-policy micro-batches at once
            stats.update(self._sample_window(draw, step, student_lm, process_index))
            entry = self.buffer.pop(step, device)
        window, sampled_at = entry
        on_policy = self.coin(step)
        stats["gkd/on_policy"] = float(on_policy)
        self.offpolicy.reset()
        self._step_stats, self._measure = stats, False
        if on_policy:
            staleness = step - sampled_at
            stats["gkd/staleness"] = float(staleness)
            stats["gkd/mean_completion_length"] = (sum(int((b["labels"] != IGNORE).sum()) for b in window)
                                                   / max(sum(b["input_ids"].shape[0] for b in window), 1))
            # Fresh samples come from the very weights being trained: the log-ratio is 0 by construction.
            stats.update({"gkd/log_ratio_mean": 0.0, "gkd/log_ratio_std": 0.0})
            self._measure = staleness > 0  # measured by __call__, during the loss's forward pass
            self.sampler.keep_samples(window[0], step, "student", process_index)
        elif self.seq_kd:
            sampled, rollout = self.sampler.sample_steps(self.teacher, {step: window}, who="teacher", now=step,
                                                         process_index=process_index)
            window = sampled[step]
            stats.update({"gkd/generated_tokens_per_s": rollout.tokens_per_s,
                          "gkd/mean_completion_length": rollout.mean_completion_length})
            self.sampler.keep_samples(window[0], step, "teacher", process_index)
        if self.reward_fn is not None:
            rewards = []
            for batch in window:
                weights, batch_rewards = self._advantages(batch, on_policy)
                batch["ce_weights"] = weights
                rewards += batch_rewards
            if rewards:
                stats["gkd/reward"] = sum(rewards) / len(rewards)
        return window, stats

    def _sample_window(self, draw: Callable[[int], Optional[Window]], step: int, student_lm: nn.Module,
                       process_index: int) -> dict[str, float]:
        """Draw the steps of the window starting at ``step`` (up to the last step of training), sample their
        on-policy micro-batches in one call with the current student, and buffer every step; returns the call's
        stats."""
        windows: dict[int, Window] = {}
        for s in self.buffer.window_steps(step):
            drawn = draw(s)
            if drawn is None:  # past the last step of training
                break
            windows[s] = drawn
        on = {s: w for s, w in windows.items() if self.coin(s)}
        sampled, stats = {}, {}
        if on:
            sampled, rollout = self.sampler.sample_steps(student_lm, on, who="student", process_index=process_index,
                                                         now=step)
            stats = {"gkd/generated_tokens_per_s": rollout.tokens_per_s, "gkd/sampled_steps": float(len(on)),
                     "gkd/sampled_sequences": float(rollout.sequences)}
        for s, window in windows.items():
            self.buffer.put(s, sampled.get(s, window), step if s in on else None)
        return stats

    def state_dict(self) -> dict:
        """The steps of the current window that were drawn (and sampled) ahead: see :class:`StepBuffer`."""
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state)

    def kd_ratio(self, batch: dict) -> float:
        # With a reward the CE term is the RLOO policy-gradient surrogate: mix it as (1 − α)·surrogate + α·D.
        return self.reward_alpha if self.reward_fn is not None else self.cfg.kd_ratio

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        if self._measure:  # a stale on-policy step: how far the student moved since it sampled these tokens
            out = self.offpolicy.measure(student, batch, lambda: super(GKD, self).__call__(student, batch))
            self._step_stats.update(self.offpolicy.as_stats("gkd/"))  # the step's stats, logged after the step
        else:
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
