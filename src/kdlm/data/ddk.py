"""DDK domain-weight updates and a domain-mixing batch sampler.

Source
------
J. Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models", NeurIPS 2024
(arXiv 2407.16154); see ``docs/METHODS.md`` (DDK section). Domains ``i = 1..N`` each have a held-out
validation set (paper: 500 examples) on which the student's and the teacher's perplexities ``l_S[i]``,
``l_T[i]`` are measured. With ``x[i] = l_S[i] / l_T[i]`` (how far the student trails the teacher there):

* Eq. 1 (initialisation): ``r = softmax(x)``.
* Eq. 2 (every K steps, ``l_S`` re-measured, ``l_T`` fixed): ``psi[i] = r[i] * exp(x[i])`` and
  ``r[i] <- alpha * psi[i] / sum(psi) + (1 - alpha) / N`` (``alpha = 0.5``). The second term is the paper's
  "factor smoothing": every domain keeps at least ``(1 - alpha) / N`` of the data.
* Ablations: ``ddk_no_smoothing`` ("w/o FS") applies Eq. 1 afresh each interval; ``equal`` ("ES") samples
  domains uniformly; ``natural`` samples them in proportion to their size (what plain shuffling does).

Sampling
--------
:class:`DomainBatchSampler` turns the weights into the example indices of each optimizer step (all processes,
all micro-batches). It replaces ``EpochSampler`` + ``DataLoader`` + ``skip_first_batches`` of
``kdlm.train.loop`` when DDK is on: every process builds the same sampler (same seed, same weights, which
every process computes from the same reduced perplexities), calls ``draw_step(state.step)`` once per optimizer
step, takes its own micro-batches with :func:`split_step` and collates them. The sampler's ``state_dict()``
goes into the checkpoint; after ``load_state_dict`` the next draws equal those of an uninterrupted run.

Allocation: how many examples of each domain a step takes. We use *systematic* (low-variance) allocation,
not a multinomial draw: the real-valued targets ``t[i] = per_step * r[i]`` are rounded to integers ``n[i]``
in ``{floor(t[i]), ceil(t[i])}`` with ``sum(n) = per_step``, using one uniform ``u`` per step and the
cumulative fractional parts (``n[i]`` gets the extra 1 when an integer ``m`` has ``C[i-1] <= u + m < C[i]``).
Each ``n[i]`` then has expectation exactly ``t[i]`` (the weights are followed in expectation, so long-run
frequencies match them), but every single step is within one example of its target. A multinomial draw has the
same expectation with variance ``per_step * r[i] * (1 - r[i])``; with small steps (e.g. 16 examples) and
domains weighted near the ``(1 - alpha) / N`` floor it would often give a domain nothing, or twice its share,
for a whole step. The arithmetic is exact (``fractions.Fraction`` of the float64 weights), so counts never
depend on float rounding and sum to ``per_step`` exactly.

Cap: a step never repeats an example, so a domain contributes at most its size. Targets above the cap are
capped and the excess is given to the uncapped domains in proportion to their weights (water-filling, repeated
until nothing is over its cap); only if every weighted domain is capped does the rest go to zero-weight domains,
in proportion to their free room. The capped targets are then rounded as above.

Within a domain examples come from a seeded permutation consumed in order; when it runs out a fresh
permutation (next cycle) starts, so every example of a domain is seen once per cycle. When a step straddles two
cycles, the examples it already took from the old cycle's tail are moved to the end of the new cycle (so the
step has no duplicate and the new cycle is still a permutation of the whole domain).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "STRATEGIES",
    "DomainBatchSampler",
    "DomainStats",
    "allocate_counts",
    "carve_validation",
    "ddk_init",
    "ddk_update",
    "initial_weights",
    "next_weights",
    "split_step",
]

STRATEGIES = ("ddk", "ddk_no_smoothing", "equal", "natural")

TensorLike = Union[Tensor, Sequence[float]]

# Tags that keep the random streams of the sampler apart (step draws vs. per-domain permutations).
_STEP_STREAM, _DOMAIN_STREAM, _CARVE_STREAM = 0, 1, 2
_STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------


def _vector(value: TensorLike, name: str) -> Tensor:
    """``value`` as a 1-D float64 tensor; errors name the argument."""
    try:
        # Python numbers become float64 (torch's default float32 would round weights such as 0.2).
        out = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {error}") from None
    if out.dim() != 1 or out.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(out.shape)}")
    if not (out.is_floating_point() or out.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold real numbers, got dtype {out.dtype}")
    return out.to(device="cpu", dtype=torch.float64)


def _perplexities(value: TensorLike, name: str) -> Tensor:
    out = _vector(value, name)
    bad = ~torch.isfinite(out) | (out <= 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be positive and finite, got {out[bad].tolist()} at {bad.nonzero().flatten().tolist()}")
    return out


def _weights(value: TensorLike, name: str) -> Tensor:
    out = _vector(value, name)
    bad = ~torch.isfinite(out) | (out < 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be non-negative and finite, got {out[bad].tolist()} at {bad.nonzero().flatten().tolist()}")
    if not float(out.sum()) > 0:
        raise ValueError(f"{name} must have a positive sum, got all zeros")
    return out


def _same_length(**vectors: Tensor) -> int:
    lengths = {name: int(v.numel()) for name, v in vectors.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"one entry per domain is needed in each argument, but {listed}")
    return next(iter(lengths.values()))


def _alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


# ---------------------------------------------------------------------------------------------------------
# DDK weights (Eq. 1 and Eq. 2)
# ---------------------------------------------------------------------------------------------------------


def ddk_init(student_ppl: TensorLike, teacher_ppl: TensorLike) -> Tensor:
    """DDK Eq. 1 (Liu et al., NeurIPS 2024, arXiv 2407.16154): ``r = softmax(l_S / l_T)`` over domains.

    ``student_ppl``, ``teacher_ppl``: ``[N]`` positive finite perplexities per domain (validation sets).
    Returns ``[N]`` float64 weights summing to 1; a domain where the student trails the teacher more gets more.
    """
    student = _perplexities(student_ppl, "student_ppl")
    teacher = _perplexities(teacher_ppl, "teacher_ppl")
    _same_length(student_ppl=student, teacher_ppl=teacher)
    return torch.softmax(student / teacher, dim=0)


def ddk_update(
    weights: TensorLike, student_ppl: TensorLike, teacher_ppl: TensorLike, alpha: float = 0.5
) -> Tensor:
    """DDK Eq. 2 (Liu et al., NeurIPS 2024, arXiv 2407.16154), one interval's update of the domain weights.

    ``psi[i] = r[i] * exp(l_S[i] / l_T[i])``, ``r'[i] = alpha * psi[i] / sum(psi) + (1 - alpha) / N``, with
    ``r = weights`` (non-negative, positive sum; only its direction matters, ``psi`` is normalised) and
    ``l_S`` the student's freshly measured perplexities. Returns ``[N]`` float64 weights summing to 1, each at
    least ``(1 - alpha) / N``.

    ``exp`` is taken of ``x - max(x)``: the common factor ``exp(max(x))`` cancels in ``psi / sum(psi)``, so the
    result is the same quantity, without overflow for large ratios.
    """
    r = _weights(weights, "weights")
    student = _perplexities(student_ppl, "student_ppl")
    teacher = _perplexities(teacher_ppl, "teacher_ppl")
    n = _same_length(weights=r, student_ppl=student, teacher_ppl=teacher)
    alpha = _alpha(alpha)
    ratio = student / teacher
    psi = r * torch.exp(ratio - ratio.max())
    total = psi.sum()
    if not float(total) > 0:
        # exp underflowed to 0 for every domain that has weight: the ratios span > ~745 nats. Work in logs.
        log_psi = torch.log(r) + ratio
        share = torch.softmax(log_psi, dim=0)
    else:
        share = psi / total
    return alpha * share + (1.0 - alpha) / n


def _sizes(domain_sizes: Optional[TensorLike], n: Optional[int]) -> Tensor:
    if domain_sizes is None:
        raise ValueError("domain_sizes is required for the 'natural' strategy (number of training examples per domain)")
    sizes = _weights(domain_sizes, "domain_sizes")
    if n is not None and sizes.numel() != n:
        raise ValueError(f"domain_sizes has {sizes.numel()} entries, but there are {n} domains")
    return sizes / sizes.sum()


def _strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def _count(*vectors: Optional[TensorLike]) -> Optional[int]:
    for vector in vectors:
        if vector is not None:
            return int(torch.as_tensor(vector).numel())
    return None


def initial_weights(
    strategy: str,
    student_ppl: Optional[TensorLike] = None,
    teacher_ppl: Optional[TensorLike] = None,
    domain_sizes: Optional[TensorLike] = None,
) -> Tensor:
    """The weights of the first interval: Eq. 1 for ``ddk`` and ``ddk_no_smoothing``; ``1/N`` for ``equal``;
    ``size[i] / sum(size)`` for ``natural``. Perplexities are needed only by the DDK strategies. float64 ``[N]``."""
    strategy = _strategy(strategy)
    if strategy in ("ddk", "ddk_no_smoothing"):
        if student_ppl is None or teacher_ppl is None:
            raise ValueError(f"strategy {strategy!r} needs student_ppl and teacher_ppl")
        return ddk_init(student_ppl, teacher_ppl)
    n = _count(domain_sizes, student_ppl, teacher_ppl)
    if strategy == "natural":
        return _sizes(domain_sizes, None)
    if n is None:
        raise ValueError("strategy 'equal' needs the number of domains: pass domain_sizes (or perplexities)")
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def next_weights(
    strategy: str,
    weights: TensorLike,
    student_ppl: Optional[TensorLike] = None,
    teacher_ppl: Optional[TensorLike] = None,
    domain_sizes: Optional[TensorLike] = None,
    alpha: float = 0.5,
) -> Tensor:
    """The weights of the next interval, from the current ``weights`` and freshly measured ``student_ppl``.

    ``ddk``: Eq. 2 (:func:`ddk_update`). ``ddk_no_smoothing`` (the paper's "w/o FS" ablation): Eq. 1 afresh,
    ``softmax(l_S / l_T)``, ignoring ``weights``. ``equal``: ``1/N``. ``natural``: proportional to
    ``domain_sizes``. float64 ``[N]``, summing to 1.
    """
    strategy = _strategy(strategy)
    current = _weights(weights, "weights")
    n = int(current.numel())
    if strategy == "ddk":
        if student_ppl is None or teacher_ppl is None:
            raise ValueError("strategy 'ddk' needs student_ppl and teacher_ppl")
        return ddk_update(current, student_ppl, teacher_ppl, alpha)
    if strategy == "ddk_no_smoothing":
        if student_ppl is None or teacher_ppl is None:
            raise ValueError("strategy 'ddk_no_smoothing' needs student_ppl and teacher_ppl")
        out = ddk_init(student_ppl, teacher_ppl)
        _same_length(weights=current, student_ppl=out)
        return out
    if strategy == "natural":
        return _sizes(domain_sizes, n)
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Validation split per domain
# ---------------------------------------------------------------------------------------------------------


def _domain_key(name: str) -> int:
    # A stable per-domain integer (Python's hash() of a str changes between processes).
    return zlib.crc32(name.encode("utf-8"))


def carve_validation(
    domains: Sequence[str], per_domain: int = 500, seed: int = 0, max_fraction: float = 0.5
) -> tuple[list[int], dict[str, list[int]]]:
    """Split example indices into training and per-domain validation sets for DDK's perplexity measurements.

    ``domains[i]`` is the domain of example ``i``. Each domain of size ``s`` gives
    ``min(per_domain, floor(max_fraction * s))`` examples to validation (paper: 500), so every domain keeps at
    least ``s - floor(max_fraction * s) >= 1`` for training. The choice is a seeded shuffle per domain keyed by
    ``(seed, domain name)``: the same call gives the same split, and adding another domain does not change the
    others' splits. Returns ``(train_idx, val_idx_by_domain)``, indices ascending, domains sorted by name.
    """
    if int(per_domain) != per_domain or per_domain < 1:
        raise ValueError(f"per_domain must be a positive integer, got {per_domain}")
    if not 0.0 < float(max_fraction) < 1.0:
        raise ValueError(f"max_fraction must be in (0, 1) so that each domain keeps training data, got {max_fraction}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    members: dict[str, list[int]] = {}
    for index, name in enumerate(domains):
        members.setdefault(name, []).append(index)
    if not members:
        raise ValueError("domains is empty: there are no examples to split")
    train: list[int] = []
    val: dict[str, list[int]] = {}
    for name in sorted(members):
        indices = members[name]
        size = len(indices)
        if size < 2:
            raise ValueError(
                f"domain {name!r} has {size} example; DDK needs at least 2 per domain (one to measure perplexity "
                "on, one to train on): add examples to it, merge it into another domain, or drop it"
            )
        take = min(int(per_domain), math.floor(float(max_fraction) * size))
        if take < 1:
            raise ValueError(
                f"domain {name!r} has {size} examples and max_fraction {max_fraction} leaves none for validation: "
                "raise max_fraction or add examples to the domain"
            )
        order = np.random.default_rng([int(seed), _CARVE_STREAM, _domain_key(name)]).permutation(size)
        chosen = set(order[:take].tolist())
        val[name] = sorted(indices[k] for k in chosen)
        train.extend(indices[k] for k in range(size) if k not in chosen)
    return sorted(train), val


# ---------------------------------------------------------------------------------------------------------
# Allocation of a step's examples to domains
# ---------------------------------------------------------------------------------------------------------


def _capped_targets(weights: Sequence[Fraction], capacity: Sequence[int], total: int) -> list[Fraction]:
    """Real targets ``t[i] <= capacity[i]`` with ``sum(t) = total``, ``t`` proportional to ``weights`` where
    uncapped (water-filling); only when every weighted domain is capped does the remainder go to zero-weight
    domains, in proportion to their room."""
    n = len(weights)
    target = [Fraction(0)] * n
    free = [i for i in range(n) if weights[i] > 0]
    remaining = Fraction(total)
    while free and remaining > 0:
        scale = remaining / sum(weights[i] for i in free)
        over = [i for i in free if scale * weights[i] >= capacity[i]]
        if not over:
            for i in free:
                target[i] = scale * weights[i]
            remaining = Fraction(0)
            break
        for i in over:
            target[i] = Fraction(capacity[i])
            remaining -= capacity[i]
        free = [i for i in free if i not in over]
    if remaining > 0:
        room = [Fraction(capacity[i]) - target[i] for i in range(n)]
        spare = sum(room)
        for i in range(n):
            target[i] += remaining * room[i] / spare
    return target


def allocate_counts(weights: TensorLike, capacity: Sequence[int], total: int, u: float) -> list[int]:
    """Integer per-domain counts of one step: systematic rounding of the capped targets (module docstring).

    ``weights`` ``[N]`` non-negative (normalised here), ``capacity[i]`` the most domain ``i`` may give (its
    size), ``total <= sum(capacity)``, ``u`` in ``[0, 1)`` the step's uniform draw. For ``u ~ U[0, 1)`` the
    expectation of count ``i`` is exactly its capped target ``t[i]`` (``total * weights[i]`` when nothing is
    capped); every count is ``floor(t[i])`` or ``ceil(t[i])``, at most ``capacity[i]``, and they sum to ``total``.
    """
    w = _weights(weights, "weights")
    if len(capacity) != w.numel():
        raise ValueError(f"capacity has {len(capacity)} entries, but weights has {w.numel()}")
    if any(int(c) != c or c < 0 for c in capacity):
        raise ValueError(f"capacity must be non-negative integers, got {list(capacity)}")
    if int(total) != total or total < 0 or total > sum(capacity):
        raise ValueError(f"total must be an integer in [0, {sum(capacity)}] (the sum of capacity), got {total}")
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    # Exact rationals: the float64 weights are exact binary fractions, so no count depends on rounding.
    target = _capped_targets([Fraction(float(x)) for x in w.tolist()], [int(c) for c in capacity], int(total))
    base = [math.floor(t) for t in target]
    offset = Fraction(float(u))
    counts = []
    cumulative = Fraction(0)
    for i, t in enumerate(target):
        before = cumulative
        cumulative += t - base[i]
        # number of points u + m (m integer >= 0) in [before, cumulative); 0 or 1 since each fraction is < 1
        counts.append(base[i] + math.ceil(cumulative - offset) - math.ceil(before - offset))
    return counts


# ---------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------


def split_step(indices: Sequence[int], num_processes: int, process_index: int, grad_accum: int) -> list[list[int]]:
    """This process's micro-batches of one optimizer step's ``indices`` (from ``draw_step``).

    The step list is cut into ``num_processes`` equal consecutive chunks, process ``p`` takes chunk ``p`` and cuts
    it into ``grad_accum`` equal micro-batches. Over all processes the micro-batches partition ``indices``.
    ``len(indices)`` must be a multiple of ``num_processes * grad_accum``.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    pieces = num_processes * grad_accum
    if len(indices) % pieces:
        raise ValueError(
            f"indices has {len(indices)} entries, not a multiple of num_processes * grad_accum = {pieces}"
        )
    size = len(indices) // pieces
    chunk = list(indices[process_index * grad_accum * size : (process_index + 1) * grad_accum * size])
    return [chunk[g * size : (g + 1) * size] for g in range(grad_accum)]


class _DomainCursor:
    """Position of one domain in its stream of permutations: cycle number, offset, and the examples moved to
    the end of the current cycle (those the previous cycle's last step already took)."""

    def __init__(self, name: str, members: list[int], seed: int):
        self.name, self.members, self.seed = name, members, seed
        self.cycle, self.offset, self.moved = 0, 0, []  # type: int, int, list[int]
        self._order: Optional[list[int]] = None

    def order(self) -> list[int]:
        """The current cycle's permutation of the domain's example indices (after the move)."""
        if self._order is None:
            rng = np.random.default_rng([self.seed, _DOMAIN_STREAM, _domain_key(self.name), self.cycle])
            perm = [self.members[k] for k in rng.permutation(len(self.members)).tolist()]
            moved = set(self.moved)
            self._order = [x for x in perm if x not in moved] + [x for x in perm if x in moved]
        return self._order

    def take(self, count: int) -> list[int]:
        size = len(self.members)
        order = self.order()
        out = order[self.offset : self.offset + count]
        self.offset += len(out)
        if len(out) < count:
            # Cycle exhausted mid-step: start the next one, with this step's picks moved to its end.
            self.cycle += 1
            self.moved = sorted(out)
            self._order = None
            rest = count - len(out)
            head = self.order()[:rest]  # disjoint from ``out``: rest <= size - len(out) non-moved entries
            out += head
            self.offset = rest
        elif self.offset == size:
            # Exhausted exactly: the next cycle starts fresh (nothing of it taken in this step).
            self.cycle += 1
            self.offset, self.moved, self._order = 0, [], None
        return out

    def state(self) -> dict[str, Any]:
        return {"cycle": self.cycle, "offset": self.offset, "moved": list(self.moved)}

    def load(self, state: Mapping[str, Any]) -> None:
        self.cycle, self.offset, self.moved = int(state["cycle"]), int(state["offset"]), [int(x) for x in state["moved"]]
        self._order = None


class DomainBatchSampler:
    """Draws the example indices of each optimizer step by domain, with probabilities ``weights``.

    ``domains[i]`` is the domain of training example ``i`` (e.g. ``[item.domain for item in train_items]``);
    domains are kept sorted by name, and ``weights`` are in that order (``self.domains``). ``per_step`` is the
    number of examples of one optimizer step over all processes (``batch_size * grad_accum * num_processes``);
    it may not exceed the number of examples, since a step never repeats one. ``weights`` default to the
    natural proportions (domain sizes).

    ``draw_step(step)`` allocates counts by systematic rounding with caps (module docstring), takes each domain's
    count from its cycling permutation, and shuffles the step's list (so micro-batches and processes get mixed
    domains). The result depends only on ``seed``, the weights set so far and the steps drawn so far: the step's
    random draws come from a generator keyed by ``(seed, step)`` and each permutation from one keyed by ``(seed,
    domain, cycle)``, so the state is the per-domain positions, the weights and the next step (no generator
    state to carry). Steps must be drawn in increasing order, each once.
    """

    def __init__(
        self,
        domains: Sequence[str],
        per_step: int,
        seed: int = 0,
        weights: Optional[Union[TensorLike, Mapping[str, float]]] = None,
    ):
        if len(domains) == 0:
            raise ValueError("domains is empty: the sampler needs at least one training example")
        if int(per_step) != per_step or per_step < 1:
            raise ValueError(f"per_step must be a positive integer, got {per_step}")
        if per_step > len(domains):
            raise ValueError(
                f"per_step {per_step} exceeds the {len(domains)} training examples; a step cannot repeat an "
                "example: lower batch_size * grad_accum * num_processes or add data"
            )
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        members: dict[str, list[int]] = {}
        for index, name in enumerate(domains):
            members.setdefault(str(name), []).append(index)
        self.domains: tuple[str, ...] = tuple(sorted(members))
        self.domain_sizes: tuple[int, ...] = tuple(len(members[name]) for name in self.domains)
        self.per_step, self.seed = int(per_step), int(seed)
        self._cursors = [_DomainCursor(name, members[name], self.seed) for name in self.domains]
        self._next_step = 0
        self._weights = torch.tensor(self.domain_sizes, dtype=torch.float64) / sum(self.domain_sizes)
        if weights is not None:
            self.set_weights(weights)

    @classmethod
    def from_items(cls, items: Sequence[Any], per_step: int, seed: int = 0, **kwargs: Any) -> "DomainBatchSampler":
        """A sampler over tokenised items (anything with a ``.domain``, e.g. ``Tokenized``)."""
        return cls([item.domain for item in items], per_step, seed, **kwargs)

    @property
    def weights(self) -> Tensor:
        """Current domain weights (float64, sum 1, in ``self.domains`` order); a copy."""
        return self._weights.clone()

    @property
    def next_step(self) -> int:
        """The smallest step ``draw_step`` accepts next."""
        return self._next_step

    def set_weights(self, weights: Union[TensorLike, Mapping[str, float]]) -> None:
        """Use ``weights`` (normalised here) from the next ``draw_step`` on. A mapping must name every domain."""
        if isinstance(weights, Mapping):
            missing = [name for name in self.domains if name not in weights]
            extra = [name for name in weights if name not in self.domains]
            if missing or extra:
                raise ValueError(f"weights must name exactly the domains {list(self.domains)}: missing {missing}, unknown {extra}")
            weights = [float(weights[name]) for name in self.domains]
        w = _weights(weights, "weights")
        if w.numel() != len(self.domains):
            raise ValueError(f"weights has {w.numel()} entries, but there are {len(self.domains)} domains {list(self.domains)}")
        self._weights = w / w.sum()

    def step_counts(self, step: int) -> list[int]:
        """Per-domain counts ``draw_step(step)`` would use with the current weights (no state change)."""
        return allocate_counts(self._weights, self.domain_sizes, self.per_step, self._step_rng(step).random())

    def _step_rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STEP_STREAM, int(step)])

    def draw_step(self, step: int) -> list[int]:
        """The ``per_step`` example indices of optimizer step ``step`` (no repeats), in random order."""
        if int(step) != step or step < self._next_step:
            raise ValueError(
                f"step must be an integer >= {self._next_step} (steps are drawn once each, in order), got {step}"
            )
        rng = self._step_rng(step)
        counts = allocate_counts(self._weights, self.domain_sizes, self.per_step, rng.random())
        picked: list[int] = []
        for cursor, count in zip(self._cursors, counts):
            if count:
                picked.extend(cursor.take(count))
        self._next_step = int(step) + 1
        return [picked[k] for k in rng.permutation(len(picked)).tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state: weights (floats round-trip exactly through ``json``), next step and
        each domain's position; with seed, per_step and domain sizes to check the sampler it is loaded into."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "per_step": self.per_step,
            "domains": list(self.domains),
            "domain_sizes": list(self.domain_sizes),
            "weights": [float(x) for x in self._weights.tolist()],
            "next_step": self._next_step,
            "positions": {cursor.name: cursor.state() for cursor in self._cursors},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the sampler must be built on the same data with the same seed and per_step."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')} is not {_STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("per_step", self.per_step), ("domains", list(self.domains)),
                          ("domain_sizes", list(self.domain_sizes))):
            if state[key] != mine:
                raise ValueError(f"sampler state does not match: {key} is {state[key]} in the state, {mine} here")
        self._weights = torch.tensor(state["weights"], dtype=torch.float64)
        self._next_step = int(state["next_step"])
        for cursor in self._cursors:
            cursor.load(state["positions"][cursor.name])


# ---------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DomainStats:
    """Per-domain perplexities and weight at one DDK update, for metrics.jsonl and trackers."""

    domains: Sequence[str]
    student_ppl: TensorLike
    teacher_ppl: TensorLike
    weights: TensorLike

    def as_log_dict(self, prefix: str = "ddk") -> dict[str, float]:
        """Flat ``{f"{prefix}/weight/<domain>", f"{prefix}/ppl_student/<domain>", f"{prefix}/ppl_teacher/<domain>",
        f"{prefix}/ratio/<domain>"}`` with ``ratio = ppl_student / ppl_teacher`` (the quantity DDK's softmax uses)."""
        student = _perplexities(self.student_ppl, "student_ppl")
        teacher = _perplexities(self.teacher_ppl, "teacher_ppl")
        weights = _weights(self.weights, "weights")
        names = list(self.domains)
        _same_length(domains=torch.empty(len(names)), student_ppl=student, teacher_ppl=teacher, weights=weights)
        out: dict[str, float] = {}
        for i, name in enumerate(names):
            out[f"{prefix}/weight/{name}"] = float(weights[i])
            out[f"{prefix}/ppl_student/{name}"] = float(student[i])
            out[f"{prefix}/ppl_teacher/{name}"] = float(teacher[i])
            out[f"{prefix}/ratio/{name}"] = float(student[i] / teacher[i])
        return out
