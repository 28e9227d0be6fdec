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
* Several processes (torchrun): shard i is written by process i mod world size (:func:`shard_owner`); process 0
  checks the folder before and writes the manifest after, so the files equal the one-process cache's.
* With ``objective.cross_tokenizer`` the examples are the teacher's own sequences (its tokenizer and template) and
  each row also holds ``own``, the log-prob of the teacher's own next token (docs/cache.md: what is exact).
* The teacher's signal comes from a *source* (:class:`LiveTeacher`: the model run here) through one method,
  ``signals(examples)``; a different source plugs in beside it.
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
    """Everything a cache must agree on with the run that reads it (compared key by key). ``tokenizer`` and
    ``vocab_size`` are the teacher's (with objective.cross_tokenizer the student's differ and do not matter)."""
    c = cfg.cache
    signal_cfg: dict = {"mode": c.mode, "dtype": c.dtype, "ids": str(id_dtype(vocab_size)).replace("torch.", "")}
    if c.mode == "topk":
        signal_cfg["k"] = min(c.k, vocab_size)
    else:
        signal_cfg.update(samples=c.samples, top=c.top, seed=cfg.train.seed)
    identity = {
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
    if cfg.objective.cross_tokenizer is not None:
        # The signal is on the teacher's own tokens (``tokenizer`` is the teacher's) and holds the log-prob of the
        # teacher's next token too; either method (uld, align) reads it, with any student tokenizer.
        identity["cross_tokenizer"] = True
    return identity


def _identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


_HOW_TO_FIX = {
    "teacher_weights_fingerprint": "another teacher (or other weights)",
    "teacher_dtype": "teacher.dtype",
    "tokenizer_sha256": "another tokenizer (the teacher's: vocabulary, merges, normaliser or special tokens differ)",
    "cross_tokenizer": "objective.cross_tokenizer (a cross-tokenizer cache is on the teacher's own tokens and stores "
                       "the log-prob of its next token; build one with the same objective.cross_tokenizer setting)",
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


def response_tokens(item: Tokenized) -> int:
    """How many response tokens of ``item`` the teacher predicts (its rows in the cache)."""
    return sum(1 for x in item.labels[1:] if x != IGNORE)


def example_signal(logp: torch.Tensor, item: Tokenized, cfg: Config, vocab_size: int) -> dict[str, torch.Tensor]:
    """The arrays stored for one example, from the teacher's log-probs ``logp`` [T, V] (at ``objective.temperature``)
    at its T response positions, in storage dtypes: ``topk``: ids, logp, tail; ``sampled``: ids, counts (+ top_ids,
    top_logp, rest); with ``objective.cross_tokenizer`` also ``own`` [T], the log-prob of the teacher's own next
    token (the alignment method's chained segment probabilities need it)."""
    c = cfg.cache
    value_dtype, ids_dtype = _DTYPES[c.dtype], id_dtype(vocab_size)
    if c.mode == "topk":
        ids, values, tail = sparse.topk_signal(logp, c.k)
        arrays = {"ids": ids.to(ids_dtype), "logp": values.to(value_dtype), "tail": tail.to(value_dtype)}
    else:
        # Seeded per example (train.seed and its tokens): the draws do not depend on batching, order or process.
        seed_bytes = hashlib.blake2b(f"{cfg.train.seed}|".encode() + example_key(item.input_ids, item.labels),
                                     digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(seed_bytes, "little") >> 1)
        uniforms = torch.rand(logp.shape[0], c.samples, generator=generator, dtype=torch.float64)
        ids, counts, top_ids, top_logp, rest = sparse.sampled_signal(logp, c.samples, uniforms, c.top)
        arrays = {"ids": ids.to(ids_dtype), "counts": counts.to(torch.uint8)}
        if c.top:
            arrays.update(top_ids=top_ids.to(ids_dtype), top_logp=top_logp.to(value_dtype), rest=rest.to(value_dtype))
    if cfg.objective.cross_tokenizer is not None:
        targets = torch.tensor([x for x in item.labels[1:] if x != IGNORE], dtype=torch.long, device=logp.device)
        arrays["own"] = logp.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(value_dtype)
    return {key: value.cpu() for key, value in arrays.items()}


class LiveTeacher:
    """The signal source of ``kdlm cache-teacher``: the teacher model, run here in batches.

    A signal source has one method, :meth:`signals` (examples -> the arrays to store per example, as
    :func:`example_signal` returns them); the shard writer knows nothing else about where the signal comes from, so
    another source (e.g. a served teacher) plugs in beside this one.
    """

    def __init__(self, teacher, cfg: Config, vocab_size: int, pad_id: int, device: torch.device):
        from kdlm.models import OutputHead

        self.teacher, self.cfg, self.vocab_size, self.pad_id, self.device = teacher, cfg, vocab_size, pad_id, device
        self.head = OutputHead.of(teacher, vocab_size)

    def signals(self, items: list[Tokenized]) -> list[dict[str, torch.Tensor]]:
        from kdlm.data.format import collate, response_positions
        from kdlm.models import DecoderOnly

        batch = {k: v.to(self.device) for k, v in collate(items, self.pad_id).items()}
        mask, _ = response_positions(batch)
        out, rows = [], 0
        with torch.no_grad():
            hidden = DecoderOnly(self.teacher)(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
            for item, count in zip(items, mask.sum(1).tolist()):
                logits = self.head.logits(hidden[rows:rows + count]).float()
                rows += count
                logp = torch.log_softmax(logits / self.cfg.objective.temperature, -1)
                out.append(example_signal(logp, item, self.cfg, self.vocab_size))
        return out


def _shard_arrays(source, items: list[Tokenized], batch_size: int, bar,
                  dtypes: Optional[dict[str, torch.dtype]] = None) -> dict[str, torch.Tensor]:
    """The arrays of one shard's examples (``source.signals`` in batches that never leave the shard, so a shard's
    bytes depend on its examples only, not on which process or sitting computes it). ``dtypes``: storage dtypes of
    arrays that a source returns wider (a served teacher answers in int64 / float32)."""
    dtypes = dtypes or {}
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        for item, arrays in zip(chunk, source.signals(chunk)):
            for key, value in arrays.items():
                parts.setdefault(key, []).append(value.to(dtypes[key]) if key in dtypes else value)
            bar.update(response_tokens(item))
    out = {key: torch.cat(values) for key, values in parts.items()}
    out["offsets"] = torch.tensor([0, *torch.tensor([response_tokens(i) for i in items]).cumsum(0).tolist()], dtype=torch.int64)
    out["keys"] = torch.tensor([list(example_key(i.input_ids, i.labels)) for i in items], dtype=torch.uint8).reshape(-1, 16)
    return out


def _shard_is_complete(path: Path, identity_hash: str, examples: int) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("kdlm", "{}"))
    except Exception:  # noqa: BLE001 - unreadable = not complete (it is rewritten)
        return False
    return meta.get("identity") == identity_hash and meta.get("examples") == examples


def shard_owner(index: int, world_size: int) -> int:
    """The process that writes shard ``index``: shards are the one-process cache's (``cache.shard_size`` examples in
    data order), dealt round-robin, so any number of processes writes the same files."""
    return index % world_size


class _Processes:
    """The processes of a multi-process ``cache-teacher`` (torchrun): rank, world size, and the few collectives the
    writer needs. One process: every call is local and nothing is initialised."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and local >= torch.cuda.device_count():
            raise CacheError(f"kdlm cache-teacher: process LOCAL_RANK={local} has no GPU of its own "
                             f"({torch.cuda.device_count()} visible): start at most one process per GPU "
                             "(torchrun --nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPU")
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        self.owns_group = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.owns_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_main(self, value):
        """``value`` as process 0 has it (every process calls this; a barrier too)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self, clean: bool = True) -> None:
        """Destroy the process group if this object made it. After a clean run every process first passes a barrier:
        a process that destroyed its gloo group while a peer was still in the last collective (process 0's manifest
        broadcast) aborted at exit under load ("terminate called without an active exception", SIGABRT), the
        same ordering that kdlm.train.loop._teardown keeps. ``clean`` False after an error: no barrier (the other
        processes may never reach it)."""
        if self.owns_group:
            import torch.distributed as dist

            if clean:
                dist.barrier()
            dist.destroy_process_group()


def _check_folder(folder: Path, identity: dict) -> Optional[dict]:
    """Process 0, before any teacher work: the finished cache's manifest when ``folder`` holds one for this run
    (verified), else None after recording the identity of the unfinished cache and removing torn writes; a
    CacheError for another run's cache."""
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = read_manifest(folder)
        problems = identity_mismatches(manifest["identity"], identity)
        if problems:
            raise CacheError(f"{folder} already holds a finished cache for another run:\n  - " + "\n  - ".join(problems)
                             + "\nChoose another cache.dir, or delete this one to rebuild it.")
        verify_shards(folder, manifest, full=True)
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
    return None


def build_cache(cfg: Config) -> dict:
    """``kdlm cache-teacher``: write (or finish) the cache in ``cfg.cache.dir``; returns the manifest.

    Under torchrun every process runs this: process 0 checks the folder first, each process computes the shards
    :func:`shard_owner` gives it, and process 0 writes the manifest after all have finished. The files equal the
    one-process cache's byte for byte.
    """
    if not cfg.cache.dir:
        raise CacheError("kdlm cache-teacher needs cache.dir (the folder to write), e.g. --cache.dir runs/teacher-cache")
    processes = _Processes()
    try:
        manifest = _build(cfg, processes)
    except BaseException:
        processes.close(clean=False)
        raise
    processes.close()
    return manifest


def _build(cfg: Config, processes: _Processes) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from kdlm.data import load_splits, tokenize_examples
    from kdlm.generation import fill_teacher_responses
    from kdlm.models import load_model, load_tokenizer

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

    # Process 0 alone looks at the folder; every process then stops with the same error, or returns the same manifest.
    verdict: tuple = (None, None)
    if processes.main:
        try:
            verdict = (_check_folder(folder, identity), None)
        except CacheError as error:
            verdict = (None, str(error))
    finished, refusal = processes.from_main(verdict)
    if refusal is not None:
        raise CacheError(refusal)
    if finished is not None:
        log.info("cache %s is complete and verified (%d examples, %d tokens)", folder, finished["examples"], finished["tokens"])
        return finished

    teacher = None if served else load_model(t.name_or_path, dtype=t.dtype, **source).eval().requires_grad_(False).to(processes.device)
    train_examples, eval_examples, has_responses = load_splits(cfg.data, cfg.train.seed)
    if not has_responses:  # the same responses distill will read (cached on disk, keyed by teacher and prompts)
        for turn in (True, False):  # process 0 generates and caches them first, the others then read that cache
            if processes.main == turn:
                fill_teacher_responses(cfg, teacher, tokenizer, train_examples, "train")
                fill_teacher_responses(cfg, teacher, tokenizer, eval_examples, "eval")
            processes.from_main(None)
    items, counts = tokenize_examples(train_examples, tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                      max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    log.info(counts.summary("train data"))
    if not items:
        raise CacheError(f"{cfg.data.train}: no training example left to cache ({counts.summary('train data')})")

    size = cfg.cache.shard_size
    groups = [items[i:i + size] for i in range(0, len(items), size)]
    mine = [index for index in range(len(groups)) if shard_owner(index, processes.world) == processes.rank]
    signal_source = served or LiveTeacher(teacher, cfg, vocab_size, tokenizer.pad_token_id, processes.device)
    kill_after = int(os.environ.get("KDLM_FAULT_KILL_AFTER_SHARDS", "0"))  # kill-and-resume test only
    bar = tqdm(total=sum(response_tokens(item) for index in mine for item in groups[index]), desc="cache-teacher",
               unit="tok", unit_scale=True, dynamic_ncols=True, disable=not cfg.train.progress or not processes.main)
    started = time.time()
    computed_tokens = 0
    written = 0
    for index in mine:
        group = groups[index]
        path = folder / f"shard-{index:05d}.safetensors"
        group_tokens = sum(response_tokens(item) for item in group)
        if path.is_file() and _shard_is_complete(path, identity_hash, len(group)):
            bar.update(group_tokens)
            continue
        stored = {"ids": id_dtype(vocab_size), "logp": _DTYPES[cfg.cache.dtype], "tail": _DTYPES[cfg.cache.dtype]}
        arrays = _shard_arrays(signal_source, group, cfg.cache.batch_size or cfg.train.batch_size, bar, stored)
        computed_tokens += group_tokens
        tmp = folder / f".tmp-{path.name}"
        # One metadata key: safetensors writes several in an arbitrary order, and resumed shards must be byte-equal.
        meta = json.dumps({"format": FORMAT, "identity": identity_hash, "examples": len(group)}, sort_keys=True)
        save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp), metadata={"kdlm": meta})
        os.replace(tmp, path)
        written += 1
        if kill_after and written == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    computed_tokens = sum(processes.gather(computed_tokens))  # also the barrier: every shard is written
    seconds = time.time() - started
    manifest = None
    if processes.main:
        manifest = _write_manifest(cfg, folder, identity, identity_hash, files, groups, served)
    manifest = processes.from_main(manifest)
    rate = computed_tokens / max(seconds, 1e-9)
    total_bytes, total_tokens = manifest["bytes"], manifest["tokens"]
    message = (f"teacher cache {folder}: {len(items)} examples, {total_tokens} response tokens, {len(groups)} shards, "
               f"{total_bytes / 1e6:.1f} MB = {total_bytes / max(total_tokens, 1):.1f} bytes per token; "
               f"{computed_tokens} tokens computed in {seconds:.1f} s ({rate:.0f} teacher tokens/s"
               f"{f' over {processes.world} processes' if processes.world > 1 else ''})")
    if processes.main:
        log.info(message)
        print(message, flush=True)
    # The run's timing goes with the returned dict only: the manifest on disk must not depend on it.
    return {**manifest, "run": {"seconds": seconds, "computed_tokens": computed_tokens, "tokens_per_s": rate,
                                "processes": processes.world}}


def _write_manifest(cfg: Config, folder: Path, identity: dict, identity_hash: str, files: list[Path],
                    groups: list[list[Tokenized]], served=None) -> dict:
    """Process 0, after every process finished its shards: the manifest over all shards, written last (atomically)."""
    shards = []
    for index, group in enumerate(groups):
        path = folder / f"shard-{index:05d}.safetensors"
        if not (path.is_file() and _shard_is_complete(path, identity_hash, len(group))):  # a guard: never a torn cache
            raise CacheError(f"{path}: missing or incomplete after caching; rerun kdlm cache-teacher to finish it")
        shards.append({"file": path.name, "examples": len(group), "tokens": sum(response_tokens(i) for i in group),
                       "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    total_tokens = sum(s["tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    t = cfg.teacher
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        "teacher": {"name_or_path": t.name_or_path, "gguf_file": t.gguf_file, "revision": t.revision,
                    **({"weights_sha256": weights_sha256(files)} if served is None else
                       {"server": served.url, "served_model": served.model})},
        "data": {"train": cfg.data.train, "seed": cfg.train.seed},
        "examples": sum(len(g) for g in groups),
        "tokens": total_tokens,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / max(total_tokens, 1),
        "shards": shards,
    }
    _atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))  # last: the cache is complete
    (folder / "identity.json").unlink(missing_ok=True)
    return manifest


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
        if full and file_sha256(path) != shard["sha256"]:
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
        # A cross-tokenizer cache: keyed by the teacher's own sequences, rows carry the teacher's own-token log-prob.
        self.cross_tokenizer = bool(self.manifest["identity"].get("cross_tokenizer"))
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
        missing = [item for item in items if self.item_key(item) not in self.index]
        if missing:
            raise CacheError(
                f"{len(missing)} of {len(items)} examples of the {what} are not in the teacher cache {self.folder} "
                f"(e.g. {missing[0].origin}): the data changed since caching. Rerun kdlm cache-teacher on this data."
            )

    def item_key(self, item: Tokenized) -> bytes:
        """The key of an example's rows: of the teacher's own sequence in a cross-tokenizer cache
        (:class:`kdlm.data.align.PairedTokenized`), else of the sequence itself."""
        if self.cross_tokenizer:
            return example_key(item.teacher_input_ids, item.teacher_labels)
        return example_key(item.input_ids, item.labels)

    def example(self, key: bytes, tokens: int, origin: str = "") -> torch.Tensor:
        """Payload rows [tokens, 2m + 1] of one example (:func:`kdlm.losses.sparse.pack_payload`); a cross-tokenizer
        cache appends one column, the log-prob of the teacher's own next token: [tokens, 2m + 2]."""
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
        payload = sparse.pack_payload(ids, logp, tail)
        if self.cross_tokenizer:
            payload = torch.cat([payload, read("own").float().unsqueeze(-1)], dim=-1)
        return payload

    def payload(self, batch: dict) -> torch.Tensor:
        """Payload rows (:meth:`example`) of all response tokens of a right-padded batch (``input_ids``, ``labels``,
        ``attention_mask``; the teacher's own sequences for a cross-tokenizer cache), in ``response_positions`` order."""
        rows = []
        lengths = batch["attention_mask"].sum(1).tolist()
        for row, length in enumerate(lengths):
            ids, labels = batch["input_ids"][row, :length], batch["labels"][row, :length]
            tokens = int((labels[1:] != IGNORE).sum())
            rows.append(self.example(example_key(ids, labels), tokens))
        return torch.cat(rows).to(batch["input_ids"].device)


def open_for_run(cfg: Config, tokenizer, vocab_size: int, fingerprint: Optional[str] = None) -> TeacherCache:
    """The cache of ``cfg.cache.dir``, checked against this run (teacher, tokenizer, template, lengths, τ, signal).
    ``tokenizer``, ``vocab_size``: the teacher's. ``fingerprint``: the teacher's, when it is served
    (:attr:`kdlm.teacher_server.ServedTeacher.fingerprint`)."""
    identity = run_identity(cfg, tokenizer, vocab_size, fingerprint or teacher_fingerprint(cfg))
    return TeacherCache(cfg.cache.dir, identity)


__all__ = ["LiveTeacher", "TeacherCache", "build_cache", "example_key", "example_signal", "open_for_run", "read_manifest",
           "run_identity", "shard_owner"]
