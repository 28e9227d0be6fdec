"""Data: reading examples, templating and masking, batching."""

from kdlm.data.ddk import (
    STRATEGIES,
    DomainBatchSampler,
    DomainStats,
    allocate_counts,
    carve_validation,
    ddk_init,
    ddk_update,
    initial_weights,
    next_weights,
    split_step,
)
from kdlm.data.format import IGNORE, DropCounts, Tokenized, collate, render_prompt, tokenize_examples
from kdlm.data.sources import Example, load_splits, read_examples

__all__ = [
    "IGNORE",
    "STRATEGIES",
    "DomainBatchSampler",
    "DomainStats",
    "DropCounts",
    "Example",
    "Tokenized",
    "allocate_counts",
    "carve_validation",
    "collate",
    "ddk_init",
    "ddk_update",
    "initial_weights",
    "load_splits",
    "next_weights",
    "read_examples",
    "render_prompt",
    "split_step",
    "tokenize_examples",
]
