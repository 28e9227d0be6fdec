"""The offline teacher cache: run the teacher once, distil many times from a compact on-disk signal.

``kdlm cache-teacher --config run.yaml --cache.dir DIR`` runs the teacher over the run's training data (the same
reading, teacher responses, chat template, prompt masking and lengths as ``kdlm distill``) and stores, for every
response token, a sparse teacher signal (:mod:`kdlm.losses.sparse`):

* ``topk``: the k most likely token ids, their log-probs and the log of the remaining tail mass;
* ``sampled``: ``samples`` draws from the teacher distribution as distinct ids with counts (the unbiased random
  sampling of Sparse Logit Sampling), optionally after the ``top`` most likely tokens stored exactly.

``kdlm distill --config run.yaml --cache.dir DIR`` then trains from it: the teacher is never run (and not even
loaded unless the student is pruned from it).

Format (docs/cache.md has the why):

* ``shard-00000.safetensors`` ...: one file per ``shard_size`` examples, tensors ``offsets`` [n+1] (each
  example's rows), ``keys`` [n, 16] (a hash of each example's token ids and labels, so training finds its rows
  whatever the order or subset), and the signal arrays. safetensors: memory-mapped, slice-wise reads, dtype and
  shape checked against the file size when opened, no pickle, already a dependency.
* ``manifest.json``, written last and atomically: format version, the run identity that training must match
  (teacher weights fingerprint and dtype, tokenizer and template hashes, lengths, temperature, signal settings),
  and each shard's name, size, sha256, example and token counts. No manifest = caching did not finish.
* Shards are written to a temporary name and renamed, so a killed run leaves only whole shards; rerunning the
  same command skips them (checked against the identity) and produces the same bytes as one uninterrupted run
  (sampling is seeded per example, batches never cross a shard boundary).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from kdlm.config import Config
from kdlm.data.format import IGNORE, Tokenized
from kdlm.errors import CacheError
from kdlm.losses import sparse
from kdlm.models import teacher_fingerprint, teacher_weight_files, weights_fingerprint  # noqa: F401 (re-exported)

log = logging.getLogger("kdlm")

FORMAT = "kdlm-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"^shard-\d{5}\.safetensors$")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------------
# Identity: what a run and a cache must agree on.
# --------------------------------------------------------------------------------------------------


def _hash_file_into(digest, path: Path) -> None:
    """Stream a file into ``digest`` in 4 MiB blocks (weights can be far larger than memory)."""
    with path.open("rb") as handle:
        for block in iter(partial(handle.read, 1 << 22), b""):
            digest.update(block)


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file's bytes, streamed."""
    digest = hashlib.sha256()
    _hash_file_into(digest, path)
    return digest.hexdigest()


def weights_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}|".encode())
        _hash_file_into(digest, path)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the vocabulary, merges/normaliser (fast tokenizers' JSON) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps({"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id})
    return hashlib.sha256((body + specials).encode()).hexdigest()


def template_sha256(tokenizer, system_prompt: Optional[str]) -> str:
    """Hash of what turns messages into the prompt text: the chat template (or the plain one) and the system prompt."""
    template = getattr(tokenizer, "chat_template", None) or "kdlm-plain-template-v1"
    return hashlib.sha256(json.dumps([template, system_prompt]).encode()).hexdigest()


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every token id."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 65536:
        return torch.uint16
    return torch.int32


def run_identity(cfg: Config, tokenizer, vocab_size: int, fingerprint: str) -> dict:
    """Everything a cache must agree on with the run that reads it (compared key by key)."""
    c = cfg.cache
    signal_cfg: dict = {"mode": c.mode, "dtype": c.dtype, "ids": str(id_dtype(vocab_size)).replace("torch.", "")}
    if c.mode == "topk":
        signal_cfg["k"] = min(c.k, vocab_size)
    else:
        signal_cfg.update(samples=c.samples, top=c.top, seed=cfg.train.seed)
    return {
        "teacher_weights_fingerprint": fingerprint,
        "teacher_dtype": cfg.teacher.dtype,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "template_sha256": template_sha256(tokenizer, cfg.data.system_prompt),
        "vocab_size": vocab_size,
        "max_prompt_length": cfg.data.max_prompt_length,
        "max_length": cfg.data.max_length,
        "temperature": cfg.objective.temperature,
        "signal": signal_cfg,
    }


def _identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


_HOW_TO_FIX = {
    "teacher_weights_fingerprint": "another teacher (or other weights)",
    "teacher_dtype": "teacher.dtype",
    "tokenizer_sha256": "another tokenizer",
    "template_sha256": "another chat template or data.system_prompt",
    "vocab_size": "another vocabulary",
    "max_prompt_length": "data.max_prompt_length",
    "max_length": "data.max_length",
    "temperature": "objective.temperature",
}


def identity_mismatches(cached: dict, run: dict) -> list[str]:
    """Human-readable differences between a cache's identity and a run's, one per key."""
    problems = []
    for key in sorted(set(cached) | set(run)):
        if cached.get(key) == run.get(key):
            continue
        if key == "signal":
            for sub in sorted(set(cached.get(key, {})) | set(run.get(key, {}))):
                a, b = cached.get(key, {}).get(sub), run.get(key, {}).get(sub)
                if a != b:
                    name = "train.seed (the sampling seed)" if sub == "seed" else f"cache.{sub}"
                    problems.append(f"{name}: cache built with {a!r}, this run has {b!r}")
        else:
            problems.append(f"{_HOW_TO_FIX.get(key, key)}: cache built with {cached.get(key)!r}, this run has {run.get(key)!r}")
    return problems


def example_key(input_ids: list[int] | torch.Tensor, labels: list[int] | torch.Tensor) -> bytes:
    """16-byte hash of an example's token ids and labels (prompt mask): how training finds its cached rows."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64).cpu().numpy().tobytes()
    lab = torch.as_tensor(labels, dtype=torch.int64).cpu().numpy().tobytes()
    return hashlib.blake2b(ids + b"|" + lab, digest_size=16).digest()


# --------------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shard_arrays(
    teacher, items: list[Tokenized], cfg: Config, vocab_size: int, pad_id: int, bar
) -> dict[str, torch.Tensor]:
    """The signal arrays of one shard's examples (teacher forward in batches that never leave the shard)."""
    from kdlm.data.format import collate, response_positions
    from kdlm.models import DecoderOnly, OutputHead

    c = cfg.cache
    value_dtype, ids_dtype = _DTYPES[c.dtype], id_dtype(vocab_size)
    batch_size = c.batch_size or cfg.train.batch_size
    parts: dict[str, list[torch.Tensor]] = {}
    lengths: list[int] = []
    served = hasattr(teacher, "signals")  # a kdlm.teacher_server.ServedTeacher: the server gives the top-k arrays
    if not served:
        head = OutputHead.of(teacher, vocab_size)
        device = next(teacher.parameters()).device
    for start in range(0, len(items), batch_size):
        chunk_items = items[start:start + batch_size]
        if served:
            for arrays in teacher.signals(chunk_items):
                lengths.append(len(arrays["tail"]))
                for key, value in arrays.items():
                    parts.setdefault(key, []).append(value.to(ids_dtype if key == "ids" else value_dtype))
                bar.update(lengths[-1])
            continue
        batch = {k: v.to(device) for k, v in collate(chunk_items, pad_id).items()}
        mask, _ = response_positions(batch)
        with torch.no_grad():
            hidden = DecoderOnly(teacher)(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        per_row = mask.sum(1).tolist()
        rows = 0
        for item, count in zip(chunk_items, per_row):
            with torch.no_grad():
                logp = torch.log_softmax(head.logits(hidden[rows:rows + count]).float() / cfg.objective.temperature, -1)
            rows += count
            lengths.append(count)
            if c.mode == "topk":
                ids, values, tail = sparse.topk_signal(logp, c.k)
                arrays = {"ids": ids.to(ids_dtype), "logp": values.to(value_dtype), "tail": tail.to(value_dtype)}
            else:
                seed_bytes = hashlib.blake2b(f"{cfg.train.seed}|".encode() + example_key(item.input_ids, item.labels),
                                             digest_size=8).digest()
                generator = torch.Generator().manual_seed(int.from_bytes(seed_bytes, "little") >> 1)
                uniforms = torch.rand(count, c.samples, generator=generator, dtype=torch.float64)
                ids, counts, top_ids, top_logp, rest = sparse.sampled_signal(logp, c.samples, uniforms, c.top)
                arrays = {"ids": ids.to(ids_dtype), "counts": counts.to(torch.uint8)}
                if c.top:
                    arrays.update(top_ids=top_ids.to(ids_dtype), top_logp=top_logp.to(value_dtype), rest=rest.to(value_dtype))
            for key, value in arrays.items():
                parts.setdefault(key, []).append(value.cpu())
            bar.update(count)
    out = {key: torch.cat(values) for key, values in parts.items()}
    out["offsets"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    out["keys"] = torch.tensor([list(example_key(i.input_ids, i.labels)) for i in items], dtype=torch.uint8).reshape(-1, 16)
    return out


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    _hash_file_into(digest, path)
    return digest.hexdigest()


def _shard_is_complete(path: Path, identity_hash: str, examples: int) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("kdlm", "{}"))
    except Exception:  # noqa: BLE001 - unreadable = not complete (it is rewritten)
        return False
    return meta.get("identity") == identity_hash and meta.get("examples") == examples


def build_cache(cfg: Config) -> dict:
    """``kdlm cache-teacher``: write (or finish) the cache in ``cfg.cache.dir``; returns the manifest."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from kdlm.data import load_splits, tokenize_examples
    from kdlm.generation import fill_teacher_responses
    from kdlm.models import load_model, load_tokenizer

    if not cfg.cache.dir:
        raise CacheError("kdlm cache-teacher needs cache.dir (the folder to write), e.g. --cache.dir runs/teacher-cache")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # several writers would race on the same shard files
        raise CacheError("kdlm cache-teacher runs in one process: start it without torchrun / accelerate launch "
                         "(a killed run resumes shard by shard, so a long cache can be built in several sittings)")
    folder = Path(cfg.cache.dir)
    t = cfg.teacher
    source = dict(gguf_file=t.gguf_file, revision=t.revision, trust_remote_code=t.trust_remote_code, cache_dir=cfg.data.cache_dir)
    tokenizer = load_tokenizer(t.name_or_path, **source)
    vocab_size = max(tokenizer.get_vocab().values()) + 1
    served = None
    if t.server is not None:  # the teacher is a vLLM server: reached and checked first, its answers fingerprinted
        from kdlm.teacher_server import connect

        served = connect(cfg, tokenizer, vocab_size)
    files = teacher_weight_files(cfg) if served is None else []
    identity = run_identity(cfg, tokenizer, vocab_size, served.fingerprint if served else weights_fingerprint(files))
    identity_hash = _identity_hash(identity)

    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = read_manifest(folder)
        problems = identity_mismatches(manifest["identity"], identity)
        if problems:
            raise CacheError(f"{folder} already holds a finished cache for another run:\n  - " + "\n  - ".join(problems)
                             + "\nChoose another cache.dir, or delete this one to rebuild it.")
        verify_shards(folder, manifest, full=True)
        log.info("cache %s is complete and verified (%d examples, %d tokens)", folder, manifest["examples"], manifest["tokens"])
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    progress_path = folder / "identity.json"  # the identity of the unfinished cache: resume only the same run
    if progress_path.is_file():
        started = json.loads(progress_path.read_text())
        problems = identity_mismatches(started, identity)
        if problems:
            raise CacheError(f"{folder} holds an unfinished cache for another run:\n  - " + "\n  - ".join(problems)
                             + "\nChoose another cache.dir, or delete this one.")
    else:
        _atomic_write_text(progress_path, json.dumps(identity, indent=1, sort_keys=True))
    for stale in folder.glob(".tmp-*"):  # left by a kill in the middle of a write
        stale.unlink()

    teacher = served or load_model(t.name_or_path, dtype=t.dtype, **source).eval().requires_grad_(False)
    train_examples, eval_examples, has_responses = load_splits(cfg.data, cfg.train.seed)
    if not has_responses:  # the same responses distill will read (cached on disk, keyed by teacher and prompts)
        fill_teacher_responses(cfg, None if served else teacher, tokenizer, train_examples, "train")
        fill_teacher_responses(cfg, None if served else teacher, tokenizer, eval_examples, "eval")
    items, counts = tokenize_examples(train_examples, tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                      max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    log.info(counts.summary("train data"))
    if not items:
        raise CacheError(f"{cfg.data.train}: no training example left to cache ({counts.summary('train data')})")

    size = cfg.cache.shard_size
    groups = [items[i:i + size] for i in range(0, len(items), size)]
    total_tokens = sum(sum(1 for x in item.labels[1:] if x != IGNORE) for item in items)
    kill_after = int(os.environ.get("KDLM_FAULT_KILL_AFTER_SHARDS", "0"))  # kill-and-resume test only
    shards = []
    bar = tqdm(total=total_tokens, desc="cache-teacher", unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not cfg.train.progress)
    started = time.time()
    computed_tokens = 0
    written = 0
    for index, group in enumerate(groups):
        path = folder / f"shard-{index:05d}.safetensors"
        group_tokens = sum(sum(1 for x in item.labels[1:] if x != IGNORE) for item in group)
        if path.is_file() and _shard_is_complete(path, identity_hash, len(group)):
            bar.update(group_tokens)
        else:
            arrays = _shard_arrays(teacher, group, cfg, vocab_size, tokenizer.pad_token_id, bar)
            computed_tokens += group_tokens
            tmp = folder / f".tmp-{path.name}"
            # One metadata key: safetensors writes several in an arbitrary order, and resumed shards must be byte-equal.
            meta = json.dumps({"format": FORMAT, "identity": identity_hash, "examples": len(group)}, sort_keys=True)
            save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp), metadata={"kdlm": meta})
            os.replace(tmp, path)
            written += 1
            if kill_after and written == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        shards.append({"file": path.name, "examples": len(group), "tokens": group_tokens,
                       "bytes": path.stat().st_size, "sha256": _sha256_of(path)})
    bar.close()
    seconds = time.time() - started
    total_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        "teacher": {"name_or_path": t.name_or_path, "gguf_file": t.gguf_file, "revision": t.revision,
                    **({"weights_sha256": weights_sha256(files)} if served is None else
                       {"server": served.url, "served_model": served.model})},
        "data": {"train": cfg.data.train, "seed": cfg.train.seed},
        "examples": len(items),
        "tokens": total_tokens,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(total_tokens, 1),
        "shards": shards,
    }
    _atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))  # last: the cache is complete
    progress_path.unlink(missing_ok=True)
    rate = computed_tokens / max(seconds, 1e-9)
    message = (f"teacher cache {folder}: {len(items)} examples, {total_tokens} response tokens, {len(shards)} shards, "
               f"{total_bytes / 1e6:.1f} MB = {total_bytes / max(total_tokens, 1):.1f} bytes per token; "
               f"{computed_tokens} tokens computed in {seconds:.1f} s ({rate:.0f} teacher tokens/s)")
    log.info(message)
    print(message, flush=True)
    # The run's timing goes with the returned dict only: the manifest on disk must not depend on it.
    return {**manifest, "run": {"seconds": seconds, "computed_tokens": computed_tokens, "tokens_per_s": rate}}


# --------------------------------------------------------------------------------------------------
# Reading.
# --------------------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        extra = (" (an unfinished cache is there: rerun kdlm cache-teacher with the same config to finish it)"
                 if (Path(folder) / "identity.json").is_file() else "")
        raise CacheError(f"{path} is missing: {folder} is not a finished teacher cache{extra}. "
                         "Build it with: kdlm cache-teacher --config <your run.yaml> --cache.dir " + str(folder))
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{path}: not valid JSON ({err}); rebuild the cache") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this kdlm reads "
                         f"{FORMAT!r} version {VERSION}: rebuild the cache with this version")
    return manifest


def _shard_path(folder: Path, name: str) -> Path:
    """The shard's path, refusing names that could point outside the cache folder."""
    if not isinstance(name, str) or not _SHARD_NAME.match(name):
        raise CacheError(f"{folder / MANIFEST}: shard name {name!r} is not of the form shard-NNNNN.safetensors")
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise CacheError(f"{folder / MANIFEST}: shard {name!r} resolves outside the cache folder")
    return path


def verify_shards(folder: Path, manifest: dict, full: bool = False) -> list[Path]:
    """Every shard listed exists with the manifest's size (and sha256 when ``full``); returns their paths."""
    paths = []
    for shard in manifest["shards"]:
        path = _shard_path(Path(folder), shard["file"])
        if not path.is_file():
            raise CacheError(f"{path}: missing shard of the teacher cache; rerun kdlm cache-teacher to rebuild it")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise CacheError(f"{path}: {size} bytes, the manifest says {shard['bytes']} (torn or replaced shard); "
                             "delete it and rerun kdlm cache-teacher, which recomputes only missing shards")
        if full and _sha256_of(path) != shard["sha256"]:
            raise CacheError(f"{path}: sha256 differs from the manifest (corrupted shard); delete it and rerun kdlm cache-teacher")
        paths.append(path)
    return paths


@dataclass
class _Location:
    shard: int
    row: int


class TeacherCache:
    """A finished cache opened for training: looks up each batch row's teacher signal as a sparse payload."""

    def __init__(self, folder: str | Path, identity: Optional[dict] = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if identity is not None:
            problems = identity_mismatches(self.manifest["identity"], identity)
            if problems:
                raise CacheError(f"the teacher cache {self.folder} does not match this run:\n  - " + "\n  - ".join(problems)
                                 + "\nRebuild it with kdlm cache-teacher (same config), or point cache.dir to a matching cache.")
        self.signal = self.manifest["identity"]["signal"]
        self.files = []
        self.offsets: list[torch.Tensor] = []
        self.index: dict[bytes, _Location] = {}
        for number, path in enumerate(verify_shards(self.folder, self.manifest)):
            try:
                handle = safe_open(str(path), "pt")
            except Exception as err:  # noqa: BLE001 - safetensors checks the header against the file size
                raise CacheError(f"{path}: unreadable shard ({err}); delete it and rerun kdlm cache-teacher") from None
            self.files.append(handle)
            self.offsets.append(handle.get_tensor("offsets"))
            for row, key in enumerate(handle.get_tensor("keys").numpy()):
                self.index[bytes(key)] = _Location(number, row)
        if self.signal["mode"] == "topk":
            self.width = self.signal["k"]
        else:
            self.width = self.signal["samples"] + self.signal["top"]

    def check_items(self, items: list[Tokenized], what: str = "training data") -> None:
        """Every example must be in the cache (same data, same tokenisation)."""
        missing = [item for item in items if example_key(item.input_ids, item.labels) not in self.index]
        if missing:
            raise CacheError(
                f"{len(missing)} of {len(items)} examples of the {what} are not in the teacher cache {self.folder} "
                f"(e.g. {missing[0].origin}): the data changed since caching. Rerun kdlm cache-teacher on this data."
            )

    def example(self, key: bytes, tokens: int, origin: str = "") -> torch.Tensor:
        """Payload rows [tokens, 2m + 1] of one example (:func:`kdlm.losses.sparse.pack_payload`)."""
        where = self.index.get(key)
        if where is None:
            raise CacheError(f"example {origin or key.hex()} is not in the teacher cache {self.folder}; rerun kdlm cache-teacher on this data")
        handle = self.files[where.shard]
        start, stop = (int(x) for x in self.offsets[where.shard][where.row:where.row + 2])
        if stop - start != tokens:
            raise CacheError(f"example {origin or key.hex()}: the cache holds {stop - start} response tokens, the batch {tokens}")

        def read(name: str) -> torch.Tensor:
            return handle.get_slice(name)[start:stop]

        if self.signal["mode"] == "topk":
            ids, logp, tail = read("ids").long(), read("logp").float(), read("tail").float()
        else:
            top = self.signal["top"]
            rows = stop - start
            top_ids = read("top_ids") if top else torch.zeros(rows, 0, dtype=torch.long)
            top_logp = read("top_logp") if top else torch.zeros(rows, 0)
            rest = read("rest") if top else torch.zeros(rows)
            ids, logp, tail = sparse.sampled_targets(read("ids").long(), read("counts").long(), top_ids, top_logp, rest)
        return sparse.pack_payload(ids, logp, tail)

    def payload(self, batch: dict) -> torch.Tensor:
        """Payload rows of all response tokens of a right-padded batch, in ``response_positions`` order."""
        rows = []
        lengths = batch["attention_mask"].sum(1).tolist()
        for row, length in enumerate(lengths):
            ids, labels = batch["input_ids"][row, :length], batch["labels"][row, :length]
            tokens = int((labels[1:] != IGNORE).sum())
            rows.append(self.example(example_key(ids, labels), tokens))
        return torch.cat(rows).to(batch["input_ids"].device)


def open_for_run(cfg: Config, tokenizer, vocab_size: int, fingerprint: Optional[str] = None) -> TeacherCache:
    """The cache of ``cfg.cache.dir``, checked against this run (teacher, tokenizer, template, lengths, τ, signal).
    ``fingerprint``: the teacher's, when it is served (:attr:`kdlm.teacher_server.ServedTeacher.fingerprint`)."""
    identity = run_identity(cfg, tokenizer, vocab_size, fingerprint or teacher_fingerprint(cfg))
    return TeacherCache(cfg.cache.dir, identity)


__all__ = ["TeacherCache", "build_cache", "example_key", "open_for_run", "read_manifest", "run_identity"]
