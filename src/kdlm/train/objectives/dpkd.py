"""DPKD (Li et al., arXiv 2406.19774): the teacher as DPO's reference model, in its two forms.

* **Token form** (default, the reference code's): the per-position preference loss
  :func:`kdlm.losses.dpkd.dpkd_token_terms` takes the divergence's place in word-level KD.
* **DPKD, sequence form** (Li et al., arXiv 2406.19774, Eq. 9): the batch's responses are the chosen ``y_t``
  (the teacher's, with ``data.responses: teacher``); the rejected ``y_s`` is sampled from the student and kept
  for ``refresh_every`` steps. Loss per pair ``kd_ratio·(−log σ(β·(r(y_t) − r(y_s)))) + (1 − kd_ratio)·CE(y_t)``
  (:class:`DPKDSequence`), averaged over the step's pairs (``units`` = pairs).
* **Plain-text LM term** (``objective.lm_data``, either form): every micro-batch adds
  ``lm_weight·[(1 − kd_ratio)·CE + kd_ratio·FKL]`` on a seeded batch of a plain-text corpus (the reference's).
"""

from __future__ import annotations

import functools
import random
from typing import Optional

import torch
from torch import nn

from kdlm import losses
from kdlm.config import ObjectiveConfig
from kdlm.data.format import IGNORE, Tokenized, collate
from kdlm.errors import DataError
from kdlm.losses.dpkd import dpkd_sequence_loss, dpkd_sequence_stats, dpkd_token_terms
from kdlm.models import DecoderOnly, OutputHead, unwrap
from kdlm.train.objectives.base import BuildContext, ObjectiveBase, StepOutput
from kdlm.train.objectives.kd import KD, distill_terms
from kdlm.train.objectives.sampling import Sampling
from kdlm.train.rollout import sample_window


class DPKDSequence(ObjectiveBase):
    """DPKD, paper form (Eq. 9): prefer the teacher's response y_t over the student's own sample y_s.

    Per pair: ``kd_ratio·(−log σ(β·(r(y_t) − r(y_s)))) + (1 − kd_ratio)·CE(y_t)``, with ``r(y)`` the
    length-normalised ``log q − log p`` and CE(y_t) the mean token cross-entropy of the chosen response (the
    paper's λ·L_lm on the dataset, λ = (1 − kd_ratio)/kd_ratio). Averaged over the step's pairs. Logs the
    reward margin, preference accuracy and the chosen/rejected implicit rewards (TRL's DPO names).
    """

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext):
        self.cfg, self.teacher, self.vocab_size = cfg, context.teacher, context.vocab_size
        self.beta = cfg.setting("dpkd_beta")
        self.refresh_every = cfg.setting("refresh_every")
        self.sampler = Sampling(cfg, context)
        self.plain_text = PlainTextBatches.of(cfg, context)  # DPKD's plain-text LM term (objective.lm_data)
        self.lm_weight = cfg.setting("lm_weight")
        # prompt tokens -> (step sampled, completion tokens incl. stop); stale after refresh_every steps
        self._rejected: dict[tuple[int, ...], tuple[int, list[int]]] = {}

    def units(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def prepare_window(self, draw, *, step: int, student_lm: nn.Module, process_index: int):
        """Attach the rejected y_s to every micro-batch of step ``step``; the stale ones of ALL micro-batches are
        sampled in one call (a seed per row: the same samples as one call per micro-batch)."""
        window = draw(step)
        keys = [[tuple(batch["input_ids"][r, : int(batch["prompt_lengths"][r])].tolist())
                 for r in range(batch["input_ids"].shape[0])] for batch in window]
        stale = {micro: [r for r, key in enumerate(rows) if key not in self._rejected
                         or step - self._rejected[key][0] >= self.refresh_every]
                 for micro, rows in enumerate(keys)}
        stale = {micro: rows for micro, rows in stale.items() if rows}
        fresh = 0
        if stale:
            # Only the stale rows are sampled, each with the seed of its place in the step (micro-batch, row).
            subsets = {micro: {k: v[rows] for k, v in window[micro].items() if torch.is_tensor(v)}
                       for micro, rows in stale.items()}
            seeds = [[self.sampler.row_seeds("student", step, process_index, micro, len(window[micro]["input_ids"]))[r]
                      for r in rows] for micro, rows in stale.items()]
            sampled, _ = sample_window(student_lm, list(subsets.values()), seeds, self.sampler.settings(student_lm),
                                       engine=self.sampler.engine_at(step, "student"))
            for (micro, rows), batch in zip(stale.items(), sampled):
                for index, r in enumerate(rows):
                    completion = batch["input_ids"][index][batch["labels"][index] != IGNORE].tolist()
                    self._rejected[keys[micro][r]] = (step, completion)
                    fresh += 1
        out = []
        for micro, batch in enumerate(window):
            rejected = self._rejected_batch(batch, keys[micro])
            out.append({**batch, **{f"rejected_{k}": v for k, v in rejected.items()}})
            if self.plain_text is not None:
                out[-1].update(self.plain_text.batch(step, process_index, micro, batch["input_ids"].device))
        self.sampler.keep_samples({k[len("rejected_"):]: v for k, v in out[0].items() if k.startswith("rejected_")},
                                  step, "student", process_index)
        return out, {"dpkd/resampled": float(fresh)}

    def state_dict(self) -> dict:
        """The rejected responses kept for reuse (prompt tokens, step sampled, completion): without them a resumed run
        would resample every prompt at its first step and part from the uninterrupted run."""
        return {"rejected": [[list(key), step, completion] for key, (step, completion) in self._rejected.items()]}

    def load_state_dict(self, state: dict) -> None:
        self._rejected = {tuple(key): (step, list(completion)) for key, step, completion in state.get("rejected", [])}

    def _rejected_batch(self, batch: dict, keys: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
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
        t_head = OutputHead.of(self.teacher, self.vocab_size)
        sides = {}
        for side, prefix in (("chosen", ""), ("rejected", "rejected_")):
            ids, attn, labels = batch[prefix + "input_ids"], batch[prefix + "attention_mask"], batch[prefix + "labels"]
            hidden = student(ids, attn)
            # Read after the forward: train.parallel fsdp gathers the student's output layer in its forward.
            s_head = OutputHead.of(unwrap(student).lm, self.vocab_size)
            s_logp, mask = self._token_logps(hidden, s_head, labels)
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
            lm_mean = plain_text_loss(student, batch, self.cfg, self.teacher, self.vocab_size)
            loss_sum = loss_sum + self.lm_weight * lm_mean * pairs
            metrics["lm"] = float(lm_mean.detach() * pairs)
        return StepOutput(loss_sum, metrics)


class DPKDToken(KD):
    """DPKD, token form: word-level KD whose per-position loss is DPKD's preference term (no divergence)."""

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext):
        super().__init__(cfg, context)
        self.divergence, self.params = functools.partial(dpkd_token_terms, beta=cfg.setting("dpkd_beta")), {}
        self.plain_text = PlainTextBatches.of(cfg, context)  # DPKD's plain-text LM term (objective.lm_data)
        self.lm_weight = cfg.setting("lm_weight")

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        out = super().__call__(student, batch)
        if "lm_input_ids" in batch:  # the plain-text LM term, scaled to this micro-batch's share of the units
            lm_mean = plain_text_loss(student, batch, self.cfg, self.teacher, self.vocab_size)
            units = torch.tensor(float(self.units(batch)), dtype=lm_mean.dtype, device=lm_mean.device)
            out.loss_sum = out.loss_sum + self.lm_weight * lm_mean * units
            out.metrics["lm"] = float(lm_mean.detach() * units)
        return out

    def prepare_window(self, draw, *, step: int, student_lm: nn.Module, process_index: int):
        """With ``lm_data``: attach a plain-text batch to every micro-batch (``lm_*`` keys)."""
        window = draw(step)
        if self.plain_text is not None:
            for micro, batch in enumerate(window):
                batch.update(self.plain_text.batch(step, process_index, micro, batch["input_ids"].device))
        return window, {}


def build(cfg: ObjectiveConfig, context: BuildContext) -> ObjectiveBase:
    """The DPKD objective of ``objective.dpkd_form``."""
    return DPKDSequence(cfg, context) if cfg.setting("dpkd_form") == "sequence" else DPKDToken(cfg, context)


class PlainTextBatches:
    """Seeded batches of a plain-text corpus (DPKD's LM term): every token is a label, none is a prompt."""

    def __init__(self, path: str, tokenizer, *, max_length: int, batch_size: int, seed: int):
        from kdlm.data.sources import read_texts

        ids = [tokenizer(text, add_special_tokens=True)["input_ids"][:max_length] for text in read_texts(path)]
        self.sequences = [x for x in ids if len(x) >= 2]
        if not self.sequences:
            raise DataError(f"objective.lm_data {path}: no text of at least two tokens (the LM term predicts each "
                            "token from the ones before it); give longer texts or drop objective.lm_data")
        self.pad_id, self.batch_size, self.seed = tokenizer.pad_token_id, batch_size, seed

    @classmethod
    def of(cls, cfg: ObjectiveConfig, context: BuildContext) -> Optional["PlainTextBatches"]:
        """The batches of ``objective.lm_data``, or None when it is unset."""
        if cfg.lm_data is None:
            return None
        if context.tokenizer is None:
            raise ValueError(f"objective '{cfg.name}' needs the tokenizer (plain text): pass tokenizer=")
        return cls(cfg.lm_data, context.tokenizer, max_length=context.max_length or 512,
                   batch_size=context.batch_size, seed=context.seed)

    def batch(self, step: int, process_index: int, micro: int, device) -> dict:
        rng = random.Random(f"{self.seed}/lm/{step}/{process_index}/{micro}")  # different per rank and micro-batch
        picked = [self.sequences[rng.randrange(len(self.sequences))] for _ in range(self.batch_size)]
        text = collate([Tokenized(seq, seq, 0, "", "") for seq in picked], self.pad_id)
        return {f"lm_{key}": text[key].to(device) for key in ("input_ids", "labels", "attention_mask")}


def plain_text_loss(student: nn.Module, batch: dict, cfg: ObjectiveConfig, teacher: nn.Module,
                    vocab_size: int) -> torch.Tensor:
    """Mean over the plain-text batch's tokens of (1 − kd_ratio)·CE + kd_ratio·FKL (the DPKD reference's LM term)."""
    text = {"input_ids": batch["lm_input_ids"], "labels": batch["lm_labels"], "attention_mask": batch["lm_attention_mask"]}
    terms = distill_terms(student, text, cfg, vocab_size, divergence="fkl", params={}, kd_ratio=cfg.kd_ratio,
                          teacher=teacher)
    return terms.loss_sum / terms.count.clamp_min(1).to(terms.loss_sum.dtype)
