"""Data: reading examples, templating and masking, batching."""

from kdlm.data.format import IGNORE, DropCounts, Tokenized, collate, render_prompt, tokenize_examples
from kdlm.data.sources import Example, load_splits, read_examples

__all__ = [
    "IGNORE",
    "DropCounts",
    "Example",
    "Tokenized",
    "collate",
    "load_splits",
    "read_examples",
    "render_prompt",
    "tokenize_examples",
]
