"""Text-quality metrics for generated responses: ROUGE-L and exact match, distinct-n and self-BLEU.

Sources
-------
* ROUGE-L and exact match follow the MiniLLM evaluation protocol: Y. Gu, L. Dong, F. Wei, M. Huang,
  "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024 (arXiv 2306.08543), whose
  ``minillm/rouge_metric.py`` (in microsoft/LMOps; itself taken from the Super-NaturalInstructions
  evaluation) scores every example against each of its references and keeps the best, with
  ``rouge_score``'s ``RougeScorer(["rougeL"], use_stemmer=True)`` F-measure for ROUGE-L and a string
  comparison after normalisation for exact match, and reports both means ×100.
* Diversity metrics (distinct-n, self-BLEU) as reported alongside ROUGE-L in the AKL paper: T. Wu, C. Tao,
  J. Wang, R. Yang, Z. Zhao, N. Wong, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
  Large Language Models" (arXiv 2404.02657). Distinct-n: J. Li et al., "A Diversity-Promoting Objective
  Function for Neural Conversation Models", NAACL 2016. Self-BLEU: Y. Zhu et al., "Texygen: A Benchmarking
  Platform for Text Generation Models", SIGIR 2018.

Conventions
-----------
* Every score is on a 0-100 scale (the papers' tables are).
* ROUGE-L tokenisation is ``rouge_score``'s own (lowercase, every run of characters outside ``[a-z0-9]``
  is a separator, Porter stemming of tokens longer than 3 characters). A consequence worth knowing: text
  with no ASCII letters or digits (e.g. Chinese) has no tokens and scores 0; MiniLLM's English datasets
  never hit this (its multilingual GPT-2-tokenizer variant is not used for them and is not provided here).
* Exact-match normalisation is MiniLLM's: lowercase, delete ASCII punctuation (``string.punctuation``),
  collapse whitespace. Unlike SQuAD v1.1's ``normalize_answer`` it does NOT delete the articles
  a/an/the (MiniLLM's source says so: "adapted ... from Squad v1.1 evaluation, without removing the
  articles"); ``remove_articles=True`` gives the full SQuAD v1.1 normalisation.
* Distinct-n and self-BLEU tokenise by ``text.lower().split()``: whitespace-separated, punctuation stays
  attached to its word. N-grams never cross from one text to the next.
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from collections import Counter
from typing import Any, Optional, Sequence, Union

__all__ = [
    "rouge_l",
    "rouge_l_multi",
    "exact_match",
    "exact_match_multi",
    "normalize_answer",
    "distinct_n",
    "self_bleu",
    "mean_length",
    "score_texts",
    "mean_std",
]

# ---------------------------------------------------------------------------------------------------------
# ROUGE-L (rouge_score) and exact match
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _rouge_scorer():
    """The one ``RougeScorer`` of the process, built on first use.

    Built lazily so that importing this module (e.g. by the CLI) does not import rouge_score/nltk/absl, and
    built once because constructing it sets up the Porter stemmer; ``score`` keeps no state between calls.
    """
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure ×100 of ``prediction`` against ``reference``.

    ``F = 2 P R / (P + R)`` with ``P = LCS / |prediction|`` and ``R = LCS / |reference|``, LCS the longest
    common (not necessarily contiguous) token subsequence, tokens as ``rouge_score`` makes them (see the
    module docstring). 0 when either side has no tokens. As in MiniLLM (``rouge_metric.rouge``) ×100.
    """
    # rouge_score's argument order is (target, prediction); F1 is symmetric but P and R are not.
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def rouge_l_multi(prediction: str, references: Sequence[str]) -> float:
    """``max`` over ``references`` of :func:`rouge_l` — MiniLLM's ``metric_max_over_ground_truths``."""
    references = _as_reference_list(references, "references")
    return max(rouge_l(prediction, ref) for ref in references)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str, *, remove_articles: bool = False) -> str:
    """MiniLLM's exact-match normalisation: lowercase, delete ASCII punctuation, collapse whitespace.

    With ``remove_articles=True`` the words a/an/the are deleted too (after the punctuation, as SQuAD v1.1
    does, so "the." loses both), which is SQuAD v1.1's ``normalize_answer`` exactly. Only
    ``string.punctuation`` counts as punctuation: curly quotes, dashes other than ``-`` etc. are kept.
    """
    text = text.lower().translate(_PUNCT_TABLE)
    if remove_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str, *, remove_articles: bool = False) -> float:
    """100.0 if ``prediction`` and ``reference`` are equal after :func:`normalize_answer`, else 0.0."""
    same = normalize_answer(prediction, remove_articles=remove_articles) == normalize_answer(
        reference, remove_articles=remove_articles
    )
    return 100.0 if same else 0.0


def exact_match_multi(prediction: str, references: Sequence[str], *, remove_articles: bool = False) -> float:
    """``max`` over ``references`` of :func:`exact_match` (MiniLLM takes the best reference for EM too)."""
    references = _as_reference_list(references, "references")
    return max(exact_match(prediction, ref, remove_articles=remove_articles) for ref in references)


def _as_reference_list(references: Union[str, Sequence[str]], name: str) -> list[str]:
    # A bare string is one reference; iterating it would silently score against single characters.
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError(f"{name} is empty: every prediction needs at least one reference")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"{name} must hold strings, got {type(r).__name__}")
    return refs


# ---------------------------------------------------------------------------------------------------------
# Diversity: distinct-n, self-BLEU
# ---------------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n ×100: distinct n-grams / all n-grams, pooled over ``texts``.

    The n-grams of every text (``text.lower().split()``; none cross a text boundary) are pooled;
    the score is ``100 * |set(pool)| / len(pool)``. Corpus-level, not a mean of per-text ratios: a model
    that repeats the same answer to every prompt must score low even if each answer is internally varied.
    0.0 when there are no n-grams (no text has ``n`` words).
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = _ngrams(_words(text), n)
        total += len(grams)
        unique.update(grams)
    return 100.0 * len(unique) / total if total else 0.0


def self_bleu(
    texts: Sequence[str],
    max_n: int = 4,
    *,
    max_texts: Optional[int] = None,
    seed: int = 0,
) -> float:
    """Self-BLEU ×100: the mean over texts of the BLEU of that text against all the other texts.

    BLEU is nltk's ``sentence_bleu`` with uniform weights ``(1/max_n, ..., 1/max_n)`` and
    ``SmoothingFunction().method1`` (a zero n-gram match count becomes ``epsilon = 0.1``), tokens
    ``text.lower().split()``. Higher means less diverse. Texts with no tokens are dropped first (they
    would be an empty hypothesis and a useless reference); with fewer than 2 texts left there is nothing
    to compare and the result is 0.0.

    Note that a text of fewer than ``max_n`` words has no ``max_n``-grams, so its smoothed precision there
    is ``0.1`` and even an exact duplicate scores below 100.

    Cost is O(k²) BLEU computations for k texts. ``max_texts`` caps k: when more non-empty texts are
    given, a uniform random subset of ``max_texts`` of them (``random.Random(seed)``, so the same input
    and seed always give the same subset) is scored against itself. ``None`` (the default) uses all.
    """
    if max_n < 1:
        raise ValueError(f"self_bleu: max_n must be >= 1, got {max_n}")
    if max_texts is not None and max_texts < 2:
        raise ValueError(f"self_bleu: max_texts must be >= 2 (or None), got {max_texts}")
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    tokenised = [t for t in (_words(text) for text in texts) if t]
    if max_texts is not None and len(tokenised) > max_texts:
        keep = sorted(random.Random(seed).sample(range(len(tokenised)), max_texts))
        tokenised = [tokenised[i] for i in keep]
    if len(tokenised) < 2:
        return 0.0
    weights = (1.0 / max_n,) * max_n
    smoothing = SmoothingFunction().method1
    # No warning filter is needed: nltk's "The hypothesis contains 0 counts of n-gram overlaps" warning is
    # raised only by the unsmoothed method0, which method1 replaces (tests/test_metrics.py checks this).
    scores = [
        sentence_bleu(tokenised[:i] + tokenised[i + 1 :], hyp, weights=weights, smoothing_function=smoothing)
        for i, hyp in enumerate(tokenised)
    ]
    return 100.0 * math.fsum(scores) / len(scores)


def mean_length(texts: Sequence[str], tokenizer: Any = None) -> float:
    """Mean length of ``texts``: whitespace-separated words, or ``tokenizer`` tokens when one is given.

    ``tokenizer`` is a Hugging Face tokenizer (anything with ``encode(text, add_special_tokens=False)``);
    special tokens are not counted, so the number is the response's own length. 0.0 for no texts.
    """
    if not texts:
        return 0.0
    if tokenizer is None:
        lengths = [len(text.split()) for text in texts]
    else:
        lengths = [len(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    return math.fsum(lengths) / len(lengths)


# ---------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------


def _group_scores(
    rouge: list[float], em: list[float], predictions: list[str], tokenizer: Any, self_bleu_max_texts: Optional[int]
) -> dict:
    n = len(predictions)
    return {
        "rouge_l": math.fsum(rouge) / n,
        "exact_match": math.fsum(em) / n,
        "distinct_1": distinct_n(predictions, 1),
        "distinct_2": distinct_n(predictions, 2),
        "self_bleu": self_bleu(predictions, max_texts=self_bleu_max_texts),
        "length": mean_length(predictions, tokenizer),
        "count": n,
    }


def score_texts(
    predictions: Sequence[str],
    references: Sequence[Union[str, Sequence[str]]],
    domains: Optional[Sequence[str]] = None,
    *,
    tokenizer: Any = None,
    self_bleu_max_texts: Optional[int] = None,
) -> dict:
    """All text metrics for a set of generations, overall and per domain.

    Returns ``{"overall": S, "domains": {domain: S, ...}}`` where ``S`` holds
    ``rouge_l`` and ``exact_match`` (means over examples of :func:`rouge_l_multi` / :func:`exact_match_multi`,
    i.e. MiniLLM's protocol: best reference per example, then the mean), ``distinct_1``, ``distinct_2``,
    ``self_bleu`` and ``length`` (computed on that group's predictions as a set, :func:`mean_length` with
    ``tokenizer``) and ``count``. A reference is a string or a non-empty list of strings. ``domains`` is
    one label per example; without it ``"domains"`` is ``{}``. Domains appear in first-seen order.
    ``self_bleu_max_texts`` is passed to :func:`self_bleu` as ``max_texts`` for every group.
    """
    predictions = list(predictions)
    references = list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"score_texts: predictions and references differ in length ({len(predictions)} vs {len(references)})"
        )
    if domains is not None:
        domains = list(domains)
        if len(domains) != len(predictions):
            raise ValueError(
                f"score_texts: domains and predictions differ in length ({len(domains)} vs {len(predictions)})"
            )
    if not predictions:
        # A mean over nothing has no value; 0 would read as a real (terrible) score.
        raise ValueError("score_texts: no predictions to score")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"score_texts: predictions[{i}] is {type(p).__name__}, not str")
    refs = [_as_reference_list(r, f"references[{i}]") for i, r in enumerate(references)]
    rouge = [rouge_l_multi(p, r) for p, r in zip(predictions, refs)]
    em = [exact_match_multi(p, r) for p, r in zip(predictions, refs)]

    result = {"overall": _group_scores(rouge, em, predictions, tokenizer, self_bleu_max_texts), "domains": {}}
    if domains is not None:
        members: dict[str, list[int]] = {}
        for i, d in enumerate(domains):
            members.setdefault(d, []).append(i)
        for d, idx in members.items():
            result["domains"][d] = _group_scores(
                [rouge[i] for i in idx],
                [em[i] for i in idx],
                [predictions[i] for i in idx],
                tokenizer,
                self_bleu_max_texts,
            )
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of ``values``, e.g. one score per sampling seed.

    The sample (not population) std because the seeds are a sample of the run-to-run spread we want to
    report. With a single value the spread is unknown and 0.0 is returned for it; no values is an error.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: no values")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
