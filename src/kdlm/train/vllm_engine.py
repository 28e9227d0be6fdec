"""vLLM as the sampling engine for the student's rollouts (``objective.sampling.engine: vllm``).

A vLLM server of the student runs beside the training process (``make vllm``'s environment, started through
:class:`kdlm.vllm_server.VLLMServer`), and the student's weights follow it there:

* **Start, lazily**: at the first sampling call the current student is written to a folder (``/dev/shm`` when it
  exists: memory, not disk) and a server is started on it, with vLLM's development routes
  (``VLLM_SERVER_DEV_MODE=1``) and without prefix caching (cached prefixes would hold keys and values of old
  weights).
* **Weight updates**: before a sampling call, when the optimizer step (``version``) differs from the last one
  pushed, the student's weights are written to a new folder and the server reloads them in place with
  ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": folder}}`` (the worker method
  ``reload_weights`` of vLLM 0.32). Why this path: vLLM's weight-transfer engines behind ``/update_weights``
  (``nccl``, ``ipc``, ...) need CUDA; a reload from a safetensors folder is the one that works on the CPU build.
  The weights are written UNTIED (``tie_word_embeddings: false``, ``lm_head.weight`` a copy of the input
  embeddings): on the CPU build a tied output layer loads no weights of its own on a reload, so its prepacked
  matrix product keeps the OLD embeddings (measured: log-prob errors up to 3 nats after an update of the
  embeddings; untied: 4e-5, float32 noise). Cost for the demo student: see docs/sampling.md.
* **Sampling**: one ``POST /v1/completions`` per prompt (token ids in, ``return_token_ids``; the requests run
  concurrently so that vLLM batches them), each with its own ``seed``; ``logprobs: 0`` returns the log-prob of
  every sampled token under the served student at temperature 1 (vLLM's ``raw_logprobs``: the model's
  ``log_softmax``, before temperature, top-k or top-p).
* **Stop**: :meth:`VLLMEngine.close`, called by the garbage collector when the engine is dropped (the objective
  at the end of a run, also a failed one) and at interpreter exit, stops the server with its process group and
  removes the weight folders.

:meth:`VLLMEngine.engine` is a :data:`kdlm.train.rollout.Engine` (prompts and row seeds in, tokens and their
log-probs out): :func:`kdlm.train.rollout.sample_window` builds the training batches around it, so the batch layout,
masking, stop rules and the off-policy statistics' ``sample_logprobs`` are the same code for both engines.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from kdlm.train.rollout import Engine, SamplingSettings
from kdlm.vllm_server import ServerError, VLLMServer, vllm_python

__all__ = ["VLLMEngine", "export_weights"]

SERVED_NAME = "student"


def export_weights(model: nn.Module, folder: Path) -> None:
    """Write ``model`` (a Hugging Face causal LM) to ``folder`` as ``model.safetensors`` + ``config.json``, untied.

    The output layer is written as its own ``lm_head.weight`` and the config says ``tie_word_embeddings: false``
    (see the module docstring for why); ``quantization_config`` is dropped (vLLM would read the weights as
    quantised). Tensors are written in the model's dtype, on the CPU.
    """
    from safetensors.torch import save_file

    if hasattr(model, "peft_config"):
        raise ServerError("sampling.engine vllm cannot serve a LoRA student yet: use sampling.engine hf")
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
        output = model.get_output_embeddings()
        if output is not None:  # a copy: safetensors refuses two names on one storage
            tensors["lm_head.weight"] = output.weight.detach().to("cpu").clone()
    save_file(tensors, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["tie_word_embeddings"] = False
    config.pop("quantization_config", None)
    config.setdefault("architectures", [type(model).__name__])
    if not config["architectures"]:
        config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))


def _post(url: str, body: dict, timeout: float) -> Any:
    """POST ``body`` as JSON; the parsed answer (None for an empty body). Failures are :class:`ServerError`."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", errors="replace")[:500]
        raise ServerError(f"vLLM server refused POST {url}: HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        raise ServerError(f"vLLM server at {url} unreachable ({error}); see its log") from None
    return json.loads(text) if text else None


def _stop(server: VLLMServer, folder: Path) -> None:
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


class VLLMEngine:
    """A vLLM server of the student, started lazily, whose weights follow the student by optimizer step.

    ``max_model_len`` bounds prompt + completion on the server (vLLM refuses longer requests; default 4096; never
    more than the model's ``max_position_embeddings``). ``concurrency`` caps the requests in flight. ``log_path`` is the
    server's log (default: inside the engine's temporary folder, removed with it). The vLLM environment is
    looked up here (:func:`kdlm.vllm_server.vllm_python`), so a missing one fails before training starts.
    """

    def __init__(self, *, max_model_len: Optional[int] = None, concurrency: int = 64,
                 log_path: Optional[str | Path] = None, startup_timeout: float = 1800.0,
                 request_timeout: float = 900.0, kv_cache_gib: int = 1):
        vllm_python()  # a ServerError naming `make vllm` when there is no vLLM environment
        self.max_model_len, self.concurrency = max_model_len, concurrency
        self.log_path, self.startup_timeout, self.request_timeout = log_path, startup_timeout, request_timeout
        self.kv_cache_gib = kv_cache_gib
        self.server: Optional[VLLMServer] = None
        self.folder: Optional[Path] = None
        self.version: Optional[int] = None  # the optimizer step whose weights the server holds
        self.pushes = 0
        self.push_seconds = 0.0  # of the last push: writing the weights + the server's reload
        self._finalizer: Optional[weakref.finalize] = None

    # --- server life --------------------------------------------------------------------------------------------
    def _start(self, model: nn.Module, tokenizer) -> None:
        root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        self.folder = Path(tempfile.mkdtemp(prefix="kdlm-vllm-", dir=root))
        initial = self.folder / "initial"
        export_weights(model, initial)
        tokenizer.save_pretrained(initial)  # the server needs a tokenizer; it never re-tokenises kdlm's ids
        positions = int(getattr(model.config, "max_position_embeddings", 4096))
        length = min(self.max_model_len or 4096, positions)
        self.server = VLLMServer(
            initial, served_name=SERVED_NAME, max_model_len=length, kv_cache_gib=self.kv_cache_gib,
            log_path=self.log_path or self.folder / "server.log", startup_timeout=self.startup_timeout,
            # /collective_rpc (the weight reloads); vLLM's own wait for its engine core gets our start-up budget
            # (its default of 600 s is exceeded on a loaded 2-core machine).
            env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_ENGINE_READY_TIMEOUT_S": str(int(self.startup_timeout))},
            # No prefix cache (its keys/values would outlive a weight update); the model's generation config
            # must not add sampling defaults (e.g. a repetition penalty) to kdlm's settings.
            extra_args=["--no-enable-prefix-caching", "--generation-config", "vllm"],
        )
        self._finalizer = weakref.finalize(self, _stop, self.server, self.folder)
        try:
            self.server.start()
        except BaseException:
            self.close()  # the folder goes too; a later call would start anew
            raise

    def close(self) -> None:
        """Stop the server (its whole process group) and remove the weight folders; safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()
        self.server, self.version, self.folder = None, None, None

    @property
    def url(self) -> str:
        if self.server is None:
            raise ServerError("the vLLM engine has no server: call sync(model, version, tokenizer) first")
        return self.server.url

    def sync(self, model: nn.Module, version: int, tokenizer) -> None:
        """Make the server hold ``model``'s weights: start it at the first call, else reload the weights when
        ``version`` (the optimizer step the caller samples at) differs from the last one pushed."""
        if self.server is None:
            started = time.perf_counter()
            self._start(model, tokenizer)
            self.version, self.push_seconds = version, time.perf_counter() - started
            return
        if version == self.version:
            self.push_seconds = 0.0
            return
        started = time.perf_counter()
        folder = self.folder / f"push-{self.pushes + 1}"
        export_weights(model, folder)
        _post(f"{self.url}/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}},
              self.request_timeout)
        previous = self.folder / f"push-{self.pushes}"
        shutil.rmtree(previous, ignore_errors=True)  # the server read it at the previous reload
        self.pushes += 1
        self.version, self.push_seconds = version, time.perf_counter() - started

    # --- requests -----------------------------------------------------------------------------------------------
    def complete(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int,
                 stop_token_ids: Sequence[int]) -> list[tuple[list[int], list[float]]]:
        """For each prompt (token ids), the sampled token ids (up to and including the first stop token) and the
        log-prob of each under the served model at temperature 1. ``seeds[b]`` seeds prompt ``b``'s request;
        ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` are off."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        stops = [int(i) for i in stop_token_ids]

        def one(index: int) -> tuple[list[int], list[float]]:
            body = {"model": SERVED_NAME, "prompt": [int(i) for i in prompts[index]], "max_tokens": max_new_tokens,
                    "temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k),
                    "seed": int(seeds[index]), "stop_token_ids": stops, "repetition_penalty": 1.0,
                    "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False}
            answer = _post(f"{self.url}/v1/completions", body, self.request_timeout)
            try:
                choice = answer["choices"][0]
                ids = [int(i) for i in choice["token_ids"]]
                logprobs = [float(v) for v in choice["logprobs"]["token_logprobs"]]
            except (KeyError, IndexError, TypeError, ValueError) as error:
                raise ServerError(f"malformed vLLM answer to prompt {index} ({error!r}): {str(answer)[:300]}") from None
            if not ids or len(logprobs) != len(ids) or len(ids) > max_new_tokens:
                raise ServerError(f"malformed vLLM answer to prompt {index}: {len(ids)} tokens, {len(logprobs)} "
                                  f"log-probs, max_tokens {max_new_tokens}")
            if len(ids) < max_new_tokens and ids[-1] not in stops:
                # Cut for another reason than the budget (e.g. the server's max_model_len): kdlm would read the
                # padding after it as a stop, so refuse instead.
                raise ServerError(f"vLLM stopped prompt {index} after {len(ids)} of {max_new_tokens} tokens without "
                                  f"a stop token (finish_reason {choice.get('finish_reason')!r}); raise the engine's "
                                  "max_model_len or shorten data.max_length")
            return ids, logprobs

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            return list(pool.map(one, range(len(prompts))))

    def prompt_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) under the served model for t = 1 .. len(ids)-1 (float32, temperature 1)."""
        body = {"model": SERVED_NAME, "prompt": [int(i) for i in ids], "max_tokens": 1, "prompt_logprobs": 0,
                "temperature": 0.0}
        entries = _post(f"{self.url}/v1/completions", body, self.request_timeout)["choices"][0]["prompt_logprobs"]
        return [float(entries[t][str(int(ids[t]))]["logprob"]) for t in range(1, len(ids))]

    def engine(self, *, version: int, tokenizer) -> Engine:
        """This server as a :data:`kdlm.train.rollout.Engine` for a call at optimizer step ``version``: the model
        is pushed first when ``version`` differs from the last push (:meth:`sync`), then every prompt row is one
        request seeded by its row seed, so a row's sample depends only on its prompt, the weights and its seed (as
        with the hf engine; vLLM's random stream differs from it). Tokens past a row's stop are ``pad_token_id``;
        log-probs are the served student's at temperature 1 (0 on padding)."""

        def sample(model: nn.Module, prompts: Tensor, attention_mask: Tensor, row_seeds: Sequence[int],
                   settings: SamplingSettings) -> tuple[Tensor, Tensor]:
            self.sync(model, version, tokenizer)
            rows = [row[mask.bool()].tolist() for row, mask in zip(prompts, attention_mask)]  # left padding not sent
            results = self.complete(rows, row_seeds, max_new_tokens=settings.max_new_tokens,
                                    temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                                    stop_token_ids=settings.stop_token_ids)
            width = max(len(ids) for ids, _ in results)
            tokens = torch.full((len(rows), width), settings.pad_token_id, dtype=torch.long)
            logprobs = torch.zeros(len(rows), width, dtype=torch.float32)
            for row, (ids, values) in enumerate(results):
                tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                logprobs[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
            return tokens.to(prompts.device), logprobs.to(prompts.device)

        return sample
