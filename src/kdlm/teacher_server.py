"""The teacher as a service: its top-k log-probs from a vLLM server, as the same sparse signal as the cache.

With ``teacher.server: URL`` the training process never loads the teacher (only its tokenizer, and its weights
when the student is pruned from them): for every training sequence kdlm sends the **token ids** (no
re-tokenisation) to vLLM's OpenAI-compatible ``POST /v1/completions`` with ``prompt_logprobs = cache.k`` and
``max_tokens = 1``, and turns the answer into the cache's payload (:mod:`kdlm.losses.sparse`): per response token
the k most likely ids, their log-probs and the tail bucket. :class:`ServedTeacher` implements
:class:`kdlm.losses.sparse.TeacherSignal` like :class:`kdlm.cache.TeacherCache`, so the loss (any divergence, fused
or not) takes it unchanged; ``kdlm cache-teacher`` fills the offline cache from it.

What vLLM answers, and what kdlm keeps (docs/serving.md):

* ``choices[i].prompt_logprobs`` of prompt i is a list with ``None`` at position 0 (nothing predicts the first
  token) and, at position j, a dict ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` of the top-k tokens
  predicting token j **plus the actual token j** when it is not among them (k or k + 1 entries). kdlm keeps exactly
  the k entries of largest log-prob: the cache's ``topk_signal``. The actual token's log-prob, when it lies beyond
  the top-k, is not used (it would make the signal differ from the cache's); its presence is checked, which
  catches an answer whose positions are shifted.
* Position j predicts token j, so kdlm's row t (the teacher at position t, predicting token t + 1) is answer
  position t + 1; only response positions (label not ignored) are kept.
* The tail bucket is ``log(1 − Σ_topk p)`` computed in float64 from the returned log-probs (the server does not
  return the rest of the distribution). The returned values are float32, so the sum is uncertain by about
  k·2⁻²⁴; a remainder below that is floored there (a finite tail, never ``log 0``). With k ≥ V the tail is
  empty (−inf), as the cache's.
* Everything is checked strictly: a malformed answer (missing fields, wrong lengths, ids out of the vocabulary,
  log-probs that are not numbers or sum above 1, the actual token missing) is a :class:`TeacherServerError` naming
  the request, the sequence and the position; never a silently wrong loss.

Failures: the server unreachable at start, serving another model, or another tokenizer/vocabulary is refused by
:func:`connect` before any model is loaded; a request that fails (connection lost or refused, timeout, HTTP 5xx)
is retried ``teacher.server_retries`` times with exponential backoff, then :class:`TeacherServerLost` is raised
(training turns it into a clean :class:`~kdlm.errors.TrainingError`, :meth:`ServedTeacher.prefetch`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Optional

import torch

from kdlm.config import Config
from kdlm.data.format import IGNORE
from kdlm.errors import TrainingError
from kdlm.losses import sparse
from kdlm.vllm_server import ServerError

log = logging.getLogger("kdlm")

# A fixed probe: compared with the server's /tokenize (the tokenizer check), then sent as token ids (the
# vocabulary check and the fingerprint of the served model's answers). Plain text, digits, code and non-ASCII.
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. Distillation: a student learns from a teacher's "
              "probabilities, 3 + 4 = 7; def f(x): return x ** 2  # café, naïve, 東京\n")
BACKOFF_S = 1.0  # first retry's wait; doubled for each further retry
BACKOFF_MAX_S = 30.0
PAYLOAD_KEY = "teacher_payload"  # the batch key under which prefetch attaches each micro-batch's payload
_LOGPROB_SLACK = 1e-4  # a float32 log-prob of a certain token may round slightly above 0; a sum slightly above 1


class TeacherServerError(ServerError):
    """The teacher server refused a request, answered malformed, or serves another model or tokenizer."""


class TeacherServerLost(TeacherServerError):
    """The teacher server gave no answer to a request after every retry (connection lost or refused, timeouts, 5xx)."""


def parse_prompt_logprobs(answer: Any, prompts: list[list[int]], k: int, vocab_size: int,
                          what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt, ``(ids [L-1, k'] int64, logp [L-1, k'] float64)`` with k' = min(k, V): row t holds the k'
    most likely next tokens after position t (answer position t + 1), by decreasing log-prob.

    ``answer`` is the parsed JSON of ``/v1/completions`` for ``prompts`` (vLLM's format, module docstring). Raises
    :class:`TeacherServerError` naming ``what``, the sequence and the position for anything malformed.
    """
    width = min(k, vocab_size)

    def bad(message: str) -> TeacherServerError:
        return TeacherServerError(f"{what}: malformed answer of the teacher server: {message}")

    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != len(prompts):
        got = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise bad(f"expected 'choices' with {len(prompts)} entries (one per sequence), got {got}")
    by_index: dict[int, Any] = {}
    for choice in choices:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(prompts) or index in by_index:
            raise bad(f"a choice has index {index!r}; expected each of 0..{len(prompts) - 1} once")
        by_index[index] = choice
    out = []
    for number, prompt in enumerate(prompts):
        where = f"sequence {number + 1} of {len(prompts)}"
        positions = by_index[number].get("prompt_logprobs")
        if not isinstance(positions, list) or len(positions) != len(prompt):
            got = len(positions) if isinstance(positions, list) else repr(positions)[:40]
            raise bad(f"{where}: prompt_logprobs must list one entry per token ({len(prompt)}), got {got} "
                      "(is the server vLLM with prompt_logprobs support?)")
        if positions[0] is not None:
            raise bad(f"{where}: prompt_logprobs[0] must be null (nothing predicts the first token)")
        ids = torch.empty(len(prompt) - 1, width, dtype=torch.int64)
        logp = torch.empty(len(prompt) - 1, width, dtype=torch.float64)
        for j in range(1, len(prompt)):
            entry = positions[j]
            at = f"{where}, position {j}"
            if not isinstance(entry, dict) or not width <= len(entry) <= width + 1:
                size = len(entry) if isinstance(entry, dict) else type(entry).__name__
                raise bad(f"{at}: expected {width} or {width + 1} log-probs (the top-{width} and the actual token), got {size}")
            parsed: list[tuple[float, int]] = []
            for key, value in entry.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise bad(f"{at}: token id {key!r} is not an integer") from None
                if not 0 <= token < vocab_size:
                    raise bad(f"{at}: token id {token} is outside the vocabulary of {vocab_size} tokens")
                number_value = value.get("logprob") if isinstance(value, dict) else None
                if isinstance(number_value, bool) or not isinstance(number_value, (int, float)) \
                        or math.isnan(number_value) or number_value > _LOGPROB_SLACK:
                    raise bad(f"{at}: token {token} has log-prob {number_value!r} (a number <= 0 expected)")
                parsed.append((float(number_value), token))
            if str(prompt[j]) not in entry:
                raise bad(f"{at}: the actual token {prompt[j]} is missing (vLLM lists it with the top-k): the "
                          "answer's positions do not match the sequence sent")
            parsed.sort(key=lambda pair: (-pair[0], pair[1]))
            top = parsed[:width]
            if not math.isfinite(top[-1][0]):
                raise bad(f"{at}: a top-{width} log-prob is -inf")
            total = math.fsum(math.exp(value) for value, _ in top)
            if total > 1.0 + _LOGPROB_SLACK:
                raise bad(f"{at}: the top-{width} probabilities sum to {total:.6f} > 1")
            ids[j - 1] = torch.tensor([token for _, token in top])
            logp[j - 1] = torch.tensor([value for value, _ in top], dtype=torch.float64)
        out.append((ids, logp))
    return out


def tail_logp(logp: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log(1 − Σ exp(logp)) per row of top-k log-probs [N, k] (float64), floored at the float32 uncertainty of the
    sum, k·2⁻²⁴ (module docstring); −inf when the k ids are the whole vocabulary."""
    if logp.shape[-1] >= vocab_size:
        return torch.full(logp.shape[:-1], float("-inf"), dtype=torch.float64)
    rest = 1.0 - logp.double().exp().sum(-1)
    return rest.clamp_min(logp.shape[-1] * 2.0**-24).log()


def response_rows(ids: torch.Tensor, logp: torch.Tensor, labels: list[int] | torch.Tensor,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k signal ``(ids [T, k], logp [T, k] float32, tail [T] float32)`` at an example's T response
    positions (rows t with label t + 1 not ignored), from :func:`parse_prompt_logprobs`'s rows of the example."""
    keep = torch.as_tensor(labels, dtype=torch.int64)[1:] != IGNORE
    top = logp[keep]
    return ids[keep], top.float(), tail_logp(top, vocab_size).float()


class ServedTeacher:
    """A vLLM server serving the teacher, checked by :func:`connect`; a :class:`~kdlm.losses.sparse.TeacherSignal`.

    ``payload(batch)`` asks synchronously; :meth:`prefetch` asks ahead while training runs; :meth:`signals` gives
    ``kdlm cache-teacher`` the arrays to store. ``fingerprint`` (``served:<model>:<hash>``) identifies the served
    model by its answers on the probe sequence: a cache built from the server records it.
    """

    def __init__(self, url: str, model: str, *, k: int, vocab_size: int, timeout: float = 300.0, retries: int = 4,
                 concurrency: int = 4, max_model_len: Optional[int] = None):
        self.url, self.model = url.rstrip("/"), model
        self.k, self.vocab_size = k, vocab_size
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency
        self.max_model_len = max_model_len
        self.fingerprint = ""

    # ---- HTTP ------------------------------------------------------------------------------------------------

    def post(self, path: str, body: dict, what: str, stop: Optional[threading.Event] = None, retries: Optional[int] = None) -> Any:
        """POST ``body`` as JSON and return the parsed answer. Connection errors, timeouts and HTTP 5xx are retried
        (``retries``, default ``self.retries``) after 1, 2, 4, ... s (at most 30 s; ``stop`` set ends the waiting),
        then :class:`TeacherServerLost`; HTTP 4xx and a body that is not JSON are a :class:`TeacherServerError`."""
        data = json.dumps(body).encode()
        attempts = 1 + (self.retries if retries is None else retries)
        last = ""
        for attempt in range(attempts):
            try:
                request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:600].decode("utf-8", errors="replace")
                if err.code < 500:
                    raise TeacherServerError(f"{what}: the teacher server {self.url} refused it (HTTP {err.code}): {detail}") from None
                last = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timeout
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise TeacherServerError(f"{what}: the answer of the teacher server {self.url} is not JSON: "
                                             f"{raw[:200]!r}") from None
            if attempt + 1 < attempts:
                delay = min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S)
                log.warning("%s: teacher server %s failed (%s); retry %d of %d in %.1f s", what, self.url, last,
                            attempt + 1, attempts - 1, delay)
                if stop is not None and stop.wait(delay):
                    break
                if stop is None:
                    time.sleep(delay)
        raise TeacherServerLost(f"{what}: no answer from the teacher server {self.url} after {attempts} attempt(s) "
                                f"({last})")

    def topk(self, prompts: list[list[int]], what: str, stop: Optional[threading.Event] = None,
             retries: Optional[int] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The server's top-k rows of each prompt (:func:`parse_prompt_logprobs`), one request for all of them."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.k}
        answer = self.post("/v1/completions", body, what, stop, retries)
        return parse_prompt_logprobs(answer, prompts, self.k, self.vocab_size, what)

    # ---- the signal ------------------------------------------------------------------------------------------

    def example_signals(self, examples: list[tuple[list[int], list[int]]], what: str,
                        stop: Optional[threading.Event] = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(ids, logp, tail)`` at the response positions of each ``(input_ids, labels)`` example (unpadded)."""
        rows = self.topk([list(map(int, ids)) for ids, _ in examples], what, stop)
        return [response_rows(ids, logp, labels, self.vocab_size) for (ids, logp), (_, labels) in zip(rows, examples)]

    def payload(self, batch: dict, what: str = "a training micro-batch", stop: Optional[threading.Event] = None) -> torch.Tensor:
        """Payload rows of every response token of a right-padded batch (``response_positions`` order), on its device."""
        rows = [sparse.pack_payload(*signal) for signal in self.example_signals(_unpadded(batch), what, stop)]
        return torch.cat(rows).to(batch["input_ids"].device)

    def check_items(self, items: list, what: str = "training data") -> None:
        """Every example must fit the server's context (``max_model_len``, one slot left for the token vLLM generates)."""
        if self.max_model_len is None:
            return
        too_long = [item for item in items if len(item.input_ids) >= self.max_model_len]
        if too_long:
            raise TeacherServerError(
                f"{len(too_long)} examples of the {what} (e.g. {too_long[0].origin}, {len(too_long[0].input_ids)} tokens) "
                f"do not fit the teacher server's max_model_len {self.max_model_len}: restart vLLM with "
                f"--max-model-len above data.max_length")

    def signals(self, items: list) -> list[dict[str, torch.Tensor]]:
        """``kdlm cache-teacher``: per example the arrays ``ids`` [T, k] int64, ``logp`` [T, k] and ``tail`` [T]
        float32 (the cache casts them to its storage dtypes); the examples are split over up to
        ``concurrency`` requests in flight together."""
        parts = max(1, min(self.concurrency, len(items)))
        size = math.ceil(len(items) / parts)
        groups = [items[i:i + size] for i in range(0, len(items), size)]

        def ask(group: list) -> list:
            origins = f"{group[0].origin}" + (f" .. {group[-1].origin}" if len(group) > 1 else "")
            return self.example_signals([(g.input_ids, g.labels) for g in group], f"cache-teacher examples {origins}")

        with ThreadPoolExecutor(len(groups), thread_name_prefix="kdlm-teacher") as pool:
            answers = list(pool.map(ask, groups))
        return [{"ids": ids, "logp": logp, "tail": tail} for answer in answers for ids, logp, tail in answer]

    # ---- asking ahead while training runs --------------------------------------------------------------------

    def prefetch(self, batches: Iterator[dict], position) -> Iterator[dict]:
        """The micro-batches of ``batches``, each with its teacher payload in ``batch["teacher_payload"]``; while the
        caller trains on one, the payloads of the next ``concurrency`` micro-batches are asked for (a thread pool of
        that size: at most ``concurrency`` requests in flight, started in the order of the micro-batches).

        ``position`` (the training state: ``epoch``, ``batches_in_epoch``, ``step``) is what ``batches`` advances as
        it yields; drawing ahead would move it past the micro-batches actually trained, so it is swapped: the
        source sees its own position, the caller the position of the micro-batches yielded so far (a checkpoint
        saved by the caller resumes exactly). Payloads are attached in the source's order and depend only on the
        batches' tokens: the run does not depend on timing. A request that fails after every retry stops training
        with a :class:`~kdlm.errors.TrainingError` when the caller reaches its micro-batch.
        """
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kdlm-teacher")
        pending: deque[tuple[dict, tuple[int, int], Future]] = deque()
        ahead = (position.epoch, position.batches_in_epoch)  # the source's own position
        drawn = 0
        exhausted = False

        def refill() -> None:  # draw and ask until `concurrency` micro-batches are asked for beyond the one trained
            nonlocal ahead, drawn, exhausted
            while not exhausted and len(pending) < self.concurrency:
                position.epoch, position.batches_in_epoch = ahead  # the source continues from its own position
                try:
                    batch = next(batches)
                except StopIteration:
                    exhausted = True
                    return
                ahead = (position.epoch, position.batches_in_epoch)
                drawn += 1
                what = f"micro-batch {drawn} of this sitting (epoch {ahead[0]}, batch {ahead[1]} of the epoch)"
                # The worker gets CPU token lists only (extracted here, in the caller's thread).
                pending.append((batch, ahead, pool.submit(self._payload_rows, _unpadded(batch), what, stop)))

        try:
            refill()
            while pending:
                batch, after, future = pending.popleft()
                refill()  # the pool runs at most `concurrency` requests at once, in the order asked
                try:
                    rows = future.result()
                except TeacherServerLost as err:
                    raise TrainingError(
                        f"the teacher server was lost during optimizer step {position.step + 1}: {err}. Training "
                        "stopped before that step; the newest checkpoint in train.output_dir is intact: start the "
                        "server again and rerun with --resume") from None
                batch[PAYLOAD_KEY] = rows.to(batch["input_ids"].device)
                position.epoch, position.batches_in_epoch = after  # what the caller sees: the batches it got
                yield batch
        finally:
            stop.set()  # waiting retries give up
            pool.shutdown(wait=False, cancel_futures=True)

    def _payload_rows(self, examples: list[tuple[list[int], list[int]]], what: str, stop: threading.Event) -> torch.Tensor:
        return torch.cat([sparse.pack_payload(*signal) for signal in self.example_signals(examples, what, stop)])


def _unpadded(batch: dict) -> list[tuple[list[int], list[int]]]:
    """Each row of a right-padded batch as ``(input_ids, labels)`` lists, padding removed (CPU)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    return [(ids[row][:length], labels[row][:length]) for row, length in enumerate(lengths)]


def _get(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def connect(cfg: Config, tokenizer, vocab_size: int) -> ServedTeacher:
    """Reach ``cfg.teacher.server`` and check that it serves this teacher, before anything is loaded.

    Refused with a :class:`TeacherServerError` saying what differs: the server unreachable; the model not served
    (``teacher.served_model``, or several served and none named); ``max_model_len`` not above ``data.max_length``;
    its tokenizer (``/tokenize`` of :data:`PROBE_TEXT`) giving other ids than ``tokenizer``; a vocabulary smaller
    (the probe's last token, id V − 1, refused) or larger (top-k ids ≥ V) than ``vocab_size``; ``cache.k`` above its
    ``--max-logprobs``. Sets the returned teacher's ``fingerprint`` from its top-1 ids on the probe.
    """
    t = cfg.teacher
    url = t.server.rstrip("/")
    try:
        models = _get(f"{url}/v1/models", timeout=min(t.server_timeout, 30.0))
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TeacherServerError(f"teacher.server {url} cannot be reached ({reason}): start the vLLM server "
                                 "(docs/serving.md) or correct teacher.server") from None
    entries = models.get("data") if isinstance(models, dict) else None
    if not isinstance(entries, list) or not all(isinstance(m, dict) and "id" in m for m in entries):
        raise TeacherServerError(f"{url}/v1/models: not an OpenAI-compatible model list: {str(models)[:200]}")
    names = [m["id"] for m in entries]
    name = t.served_model
    if name is None:
        if len(names) != 1:
            raise TeacherServerError(f"teacher.server {url} serves {len(names)} models ({', '.join(names) or 'none'}): "
                                     "set teacher.served_model to the teacher's")
        name = names[0]
    elif name not in names:
        raise TeacherServerError(f"teacher.served_model {name!r} is not served by {url} (it serves: {', '.join(names)})")
    max_model_len = next(m for m in entries if m["id"] == name).get("max_model_len")
    if isinstance(max_model_len, int) and max_model_len <= cfg.data.max_length:
        raise TeacherServerError(f"the teacher server's max_model_len is {max_model_len}, data.max_length is "
                                 f"{cfg.data.max_length}: restart vLLM with --max-model-len {cfg.data.max_length + 1} or more")
    served = ServedTeacher(url, name, k=cfg.cache.k, vocab_size=vocab_size, timeout=t.server_timeout,
                           retries=t.server_retries, concurrency=t.server_concurrency,
                           max_model_len=max_model_len if isinstance(max_model_len, int) else None)
    local = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    answer = served.post("/tokenize", {"model": name, "prompt": PROBE_TEXT, "add_special_tokens": False},
                         "the tokenizer check (/tokenize of the probe text)", retries=0)
    remote = answer.get("tokens") if isinstance(answer, dict) else None
    if remote != local:
        if not isinstance(remote, list):
            raise TeacherServerError(f"{url}/tokenize answered without a token list: {str(answer)[:200]}")
        at = next((i for i, (a, b) in enumerate(zip(local, remote)) if a != b), min(len(local), len(remote)))
        raise TeacherServerError(
            f"the teacher server's tokenizer differs from {cfg.teacher.name_or_path}'s: the probe text gives "
            f"{len(remote)} tokens there, {len(local)} here, first difference at token {at} (server "
            f"{remote[at:at + 3]}, here {local[at:at + 3]}): serve the teacher whose tokenizer the student uses")
    probe = [*local, vocab_size - 1]
    try:
        ((ids, _),) = served.topk([probe], "the probe request (vocabulary check)", retries=0)
    except TeacherServerLost as err:
        raise TeacherServerError(str(err)) from None
    except TeacherServerError as err:
        text = str(err)
        if "max allowed" in text or "max_logprobs" in text:  # vLLM: "Requested prompt logprobs of K, ... max allowed: M"
            raise TeacherServerError(f"{text}\n(cache.k={cfg.cache.k}: start vLLM with --max-logprobs {cfg.cache.k} "
                                     "or more, or lower cache.k)") from None
        if "outside the vocabulary" in text:
            raise TeacherServerError(f"{text}: the served model has a larger vocabulary than the tokenizer's "
                                     f"{vocab_size} tokens (another model?)") from None
        if "out of vocabulary" in text:  # vLLM: "Token id N is out of vocabulary"
            raise TeacherServerError(f"{text}\n(the probe ends with token id {vocab_size - 1}, the last of the "
                                     f"tokenizer's {vocab_size}: the served vocabulary is smaller, another model?)") from None
        raise
    top1 = ids[:, 0].tolist()
    served.fingerprint = f"served:{name}:" + hashlib.sha256(json.dumps([name, top1]).encode()).hexdigest()[:32]
    log.info("teacher: served by %s as %r (max_model_len %s), top-%d log-probs per token; fingerprint %s",
             url, name, max_model_len, served.k, served.fingerprint)
    return served


def connect_for_run(cfg: Config) -> ServedTeacher:
    """:func:`connect` with the tokenizer ``teacher.name_or_path`` names (loaded here; no model is)."""
    from kdlm.models import load_tokenizer

    t = cfg.teacher
    tokenizer = load_tokenizer(t.name_or_path, gguf_file=t.gguf_file, revision=t.revision,
                               trust_remote_code=t.trust_remote_code, cache_dir=cfg.data.cache_dir)
    return connect(cfg, tokenizer, max(tokenizer.get_vocab().values()) + 1)


__all__ = ["PAYLOAD_KEY", "PROBE_TEXT", "ServedTeacher", "TeacherServerError", "TeacherServerLost", "connect",
           "connect_for_run", "parse_prompt_logprobs", "response_rows", "tail_logp"]
