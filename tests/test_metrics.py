"""Tests for kdlm.eval.metrics: ROUGE-L / exact match (MiniLLM protocol), distinct-n, self-BLEU, aggregation.

Expected values come from rouge_score's own scorer, from statistics.stdev, or are worked out by hand in the
comments; none is taken from the function under test.
"""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
from rouge_score import rouge_scorer

from conftest import make_tokenizer

from kdlm.eval import metrics
from kdlm.eval.metrics import (
    distinct_n,
    exact_match,
    exact_match_multi,
    mean_length,
    mean_std,
    normalize_answer,
    rouge_l,
    rouge_l_multi,
    score_texts,
    self_bleu,
)

# ------------------------------------------------------------------------------------------- ROUGE-L

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("running dogs", "the dog runs"),  # stemming: running -> run, dogs -> dog, runs -> run
    ("Hello, world!", "hello world"),  # punctuation and case are separators / folded
    ("", "a non-empty reference"),  # empty prediction
    ("a completely different sentence", "nothing in common here"),
    ("The quick brown fox jumps over the lazy dog.", "A quick brown dog jumped over a lazy fox!"),
    ("studies studying studied", "study"),
]


@pytest.mark.parametrize("prediction,reference", PAIRS)
def test_rouge_l_agrees_with_rouge_score(prediction, reference):
    reference_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = 100.0 * reference_scorer.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_hand_computed():
    # prediction: the cat sat on the mat (6 tokens); reference: the cat is on the mat (6 tokens).
    # LCS = "the cat on the mat" = 5 -> P = R = 5/6 -> F = 5/6 = 83.333...
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(500 / 6, abs=1e-9)
    # With stemming: [run, dog] vs [the, dog, run]; the two common tokens are in opposite orders, LCS = 1.
    # P = 1/2, R = 1/3, F = 2 * (1/6) / (5/6) = 0.4 -> 40
    assert rouge_l("running dogs", "the dog runs") == pytest.approx(40.0, abs=1e-9)
    # Punctuation is a separator, case is folded: identical token lists -> 100.
    assert rouge_l("Hello, world!", "hello world") == pytest.approx(100.0, abs=1e-9)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "") == 0.0


def test_rouge_l_scorer_built_once():
    assert metrics._rouge_scorer() is metrics._rouge_scorer()


def test_rouge_l_multi_takes_max():
    pred = "the cat sat on the mat"
    # vs "the cat is on the mat": 83.33 (above); vs "dog": 0; vs "the cat sat on the mat": 100
    assert rouge_l_multi(pred, ["dog", "the cat is on the mat"]) == pytest.approx(500 / 6, abs=1e-9)
    assert rouge_l_multi(pred, ["dog", "the cat sat on the mat", "the cat is on the mat"]) == pytest.approx(100.0)
    assert rouge_l_multi(pred, ["dog"]) == 0.0
    # a bare string is one reference, not a list of characters
    assert rouge_l_multi(pred, "the cat is on the mat") == pytest.approx(500 / 6, abs=1e-9)
    with pytest.raises(ValueError, match="empty"):
        rouge_l_multi(pred, [])


# ------------------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("The Cat!", "the cat", 100.0),  # case and punctuation
        ("  the   cat \n", "the cat", 100.0),  # whitespace collapsed
        ("don't", "dont", 100.0),  # the apostrophe is deleted, not a separator
        ("U.S.A.", "usa", 100.0),
        ("cats", "cat", 0.0),  # no stemming in EM
        ("the cat", "cat", 0.0),  # MiniLLM keeps articles
        ("a cat", "the cat", 0.0),
        ("\u201chi\u201d", "hi", 0.0),  # curly quotes are not in string.punctuation
        ("", "", 100.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match_minillm_normalisation(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("the cat", "cat", 100.0),
        ("A cat.", "the cat", 100.0),
        ("an answer", "answer", 100.0),
        ("theatre", "atre", 0.0),  # only whole words are articles
        ("the end", "end the", 100.0),  # both become "end"
        ("cat sat", "sat cat", 0.0),  # word order still matters
    ],
)
def test_exact_match_squad_articles(prediction, reference, expected):
    assert exact_match(prediction, reference, remove_articles=True) == expected


def test_normalize_answer():
    assert normalize_answer("  The   Cat's hat! ") == "the cats hat"  # articles kept by default
    assert normalize_answer("  The   Cat's hat! ", remove_articles=True) == "cats hat"
    assert normalize_answer("the.", remove_articles=True) == ""  # punctuation goes first, then the article


def test_exact_match_multi_takes_max():
    assert exact_match_multi("Paris.", ["London", "paris"]) == 100.0
    assert exact_match_multi("Paris.", ["London", "Rome"]) == 0.0
    with pytest.raises(ValueError):
        exact_match_multi("Paris", [])


# ------------------------------------------------------------------------------------------- distinct-n


def test_distinct_n_hand_checked():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 7 in all, {a, b, c} -> 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(100 * 3 / 7)
    # bigrams: (a b)(b a)(a b) + (a b)(b c) -> 5 in all, {ab, ba, bc} -> 3 distinct. (Joining the texts would
    # add a cross-boundary "b a" and give 3/6.)
    assert distinct_n(texts, 2) == pytest.approx(100 * 3 / 5)
    # trigrams: (a b a)(b a b) + (a b c) -> 3, all distinct
    assert distinct_n(texts, 3) == pytest.approx(100.0)


def test_distinct_n_lowercases_and_edge_cases():
    assert distinct_n(["A a"], 1) == pytest.approx(50.0)  # a, a -> 1 distinct / 2
    assert distinct_n(["x, x"], 1) == pytest.approx(100.0)  # "x," and "x" differ: punctuation stays attached
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n(["a b", "c"], 3) == 0.0  # no text has 3 words
    with pytest.raises(ValueError):
        distinct_n(["a b"], 0)


# ------------------------------------------------------------------------------------------- self-BLEU


def test_self_bleu_identical_texts_is_100():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)


def test_self_bleu_disjoint_vocabularies_near_zero():
    texts = ["a b c d e", "f g h i j", "k l m n o"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # method1 smoothing: nltk's zero-count warning must not fire
        value = self_bleu(texts)
    assert 0.0 <= value < 1.0


def test_self_bleu_hand_computed():
    # hyp "a b c d" vs ref "a b c e" (and symmetrically): p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> method1 makes
    # it epsilon / 1 = 0.1; equal lengths -> brevity penalty 1. BLEU = (0.75 * 2/3 * 0.5 * 0.1) ** (1/4).
    expected = 100 * (0.75 * (2 / 3) * 0.5 * 0.1) ** 0.25
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx(expected, rel=1e-9)
    # max_n = 2: (0.75 * 2/3) ** (1/2)
    assert self_bleu(["a b c d", "a b c e"], max_n=2) == pytest.approx(100 * 0.5**0.5, rel=1e-9)


def test_self_bleu_fewer_than_two_texts():
    assert self_bleu(["only one text here"]) == 0.0
    assert self_bleu([]) == 0.0
    assert self_bleu(["only one text here", "", "   "]) == 0.0  # empty texts are dropped


def test_self_bleu_max_texts_subsample():
    a, b = "one two three four", "five six seven eight"
    texts = [a, a, b, b]
    # All four: every text has its twin among the others -> BLEU 100 each.
    assert self_bleu(texts) == pytest.approx(100.0)
    # Any 3 of them are a twin pair plus a singleton: 100, 100 and 0 (no shared unigram) -> 200/3,
    # whichever subset the seed picks.
    for seed in range(5):
        assert self_bleu(texts, max_texts=3, seed=seed) == pytest.approx(200 / 3)
    # Deterministic for a seed; max_texts >= len is no subsample.
    many = [f"w{i % 7} w{i % 5} w{i % 3} w{i % 2}" for i in range(30)]
    assert self_bleu(many, max_texts=10, seed=3) == self_bleu(many, max_texts=10, seed=3)
    assert self_bleu(texts, max_texts=4) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        self_bleu(texts, max_texts=1)


# ------------------------------------------------------------------------------------------- length, mean_std


def test_mean_length():
    assert mean_length(["a b", "c d e", ""]) == pytest.approx(5 / 3)
    assert mean_length([]) == 0.0
    # character-level test tokenizer: "ab c" is 4 tokens, "xyz" 3; no special tokens counted
    assert mean_length(["ab c", "xyz"], tokenizer=make_tokenizer()) == pytest.approx(3.5)

    class WrapsInSpecials:
        """One token per character, plus BOS and EOS when special tokens are asked for."""

        def encode(self, text, add_special_tokens=True):
            return [0] * (len(text) + (2 if add_special_tokens else 0))

    assert mean_length(["ab c", "xyz"], tokenizer=WrapsInSpecials()) == pytest.approx(3.5)


def test_mean_std():
    values = [1.0, 2.0, 3.0, 4.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(statistics.stdev(values))  # sample std, sqrt(5/3)
    assert std == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([7.5]) == (7.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


# ------------------------------------------------------------------------------------------- score_texts


def test_score_texts_overall_and_domains():
    predictions = ["the cat sat on the mat", "hello world", "foo"]
    references = ["the cat is on the mat", ["bye", "Hello, world!"], "bar"]
    domains = ["x", "y", "x"]
    out = score_texts(predictions, references, domains)
    # per example: ROUGE-L 500/6, 100 (best reference), 0; EM 0, 100, 0
    overall = out["overall"]
    assert overall["count"] == 3
    assert overall["rouge_l"] == pytest.approx((500 / 6 + 100) / 3)
    assert overall["exact_match"] == pytest.approx(100 / 3)
    # words: 6 + 2 + 1 = 9, distinct {the, cat, sat, on, mat, hello, world, foo} = 8
    assert overall["distinct_1"] == pytest.approx(100 * 8 / 9)
    # bigrams: 5 + 1 + 0 = 6, all distinct
    assert overall["distinct_2"] == pytest.approx(100.0)
    # no two predictions share a word -> every BLEU is 0
    assert overall["self_bleu"] == 0.0
    assert overall["length"] == pytest.approx(3.0)

    assert list(out["domains"]) == ["x", "y"]
    x, y = out["domains"]["x"], out["domains"]["y"]
    assert x["count"] == 2 and y["count"] == 1
    assert x["rouge_l"] == pytest.approx(500 / 12)
    assert x["exact_match"] == 0.0
    assert x["distinct_1"] == pytest.approx(100 * 6 / 7)  # 7 words, {the, cat, sat, on, mat, foo}
    assert x["distinct_2"] == pytest.approx(100.0)
    assert x["length"] == pytest.approx(3.5)
    assert y["rouge_l"] == pytest.approx(100.0)
    assert y["exact_match"] == 100.0
    assert y["self_bleu"] == 0.0  # a single text
    assert y["length"] == pytest.approx(2.0)
    assert set(overall) == set(x) == {
        "rouge_l", "exact_match", "distinct_1", "distinct_2", "self_bleu", "length", "count"
    }


def test_score_texts_self_bleu_per_group():
    # Each domain holds a duplicated pair -> 100 inside the domain; overall each text still has its twin.
    predictions = ["one two three four", "one two three four", "five six seven eight", "five six seven eight"]
    out = score_texts(predictions, ["r"] * 4, ["p", "p", "q", "q"])
    assert out["domains"]["p"]["self_bleu"] == pytest.approx(100.0)
    assert out["domains"]["q"]["self_bleu"] == pytest.approx(100.0)
    out = score_texts(predictions, ["r"] * 4, ["p", "q", "p", "q"])
    assert out["domains"]["p"]["self_bleu"] == 0.0  # no shared words within the group


def test_score_texts_without_domains():
    out = score_texts(["a"], ["a"])
    assert out["domains"] == {}
    assert out["overall"]["exact_match"] == 100.0


def test_score_texts_length_mismatch():
    with pytest.raises(ValueError, match=r"predictions and references.*\(2 vs 1\)"):
        score_texts(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"domains and predictions.*\(1 vs 2\)"):
        score_texts(["a", "b"], ["a", "b"], ["d"])
    with pytest.raises(ValueError, match="no predictions"):
        score_texts([], [])
    with pytest.raises(ValueError, match=r"references\[1\]"):
        score_texts(["a", "b"], ["a", []])
