"""A fake vLLM server for the fast tier: answers ``/v1/models``, ``/tokenize`` and ``/v1/completions`` with
``prompt_logprobs`` in vLLM's format (top-k plus the actual token, rank and decoded token), computed from a tiny
teacher's own forward (transformers, float32, one unpadded sequence at a time). Runs in a thread on 127.0.0.1,
port 0. Faults for the tests: ``down`` (every request's connection is closed without an answer), ``down_after``
(down from the N-th completion request on), ``malform`` (a function rewriting each completion answer), and a
vocabulary limit (ids at or past it are refused as vLLM refuses them)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

import torch


class FakeVLLM:
    def __init__(self, teacher_dir: Path, *, name: str = "teacher", tokenizer=None, max_model_len: int = 1024,
                 max_logprobs: int = 64, vocab_limit: Optional[int] = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(teacher_dir))
        self.name, self.max_model_len, self.max_logprobs = name, max_model_len, max_logprobs
        self.vocab_limit = vocab_limit or len(self.tokenizer)
        self.down = False
        self.down_after: Optional[int] = None
        self.malform: Optional[Callable[[dict], dict]] = None
        self.completions = 0  # completion requests received (answered or not)
        self.refused_while_down = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts_seen: list[list[int]] = []
        self._lock = threading.Lock()
        self._forward_lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drop(self) -> bool:
                if fake.down:
                    with fake._lock:
                        fake.refused_while_down += 1
                    self.close_connection = True  # no answer at all: the client sees the connection end
                    return True
                return False

            def do_GET(self):
                if self._drop():
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.name, "object": "model",
                                                                 "max_model_len": fake.max_model_len}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/completions":
                    with fake._lock:
                        fake.completions += 1
                        if fake.down_after is not None and fake.completions > fake.down_after:
                            fake.down = True
                if self._drop():
                    return
                if body.get("model") != fake.name:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                elif self.path == "/tokenize":
                    ids = fake.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
                    self._send(200, {"count": len(ids), "max_model_len": fake.max_model_len, "tokens": ids})
                elif self.path == "/v1/completions":
                    with fake._lock:
                        fake.in_flight += 1
                        fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    try:
                        code, answer = fake.complete(body)
                    finally:
                        with fake._lock:
                            fake.in_flight -= 1
                    self._send(code, answer)
                else:
                    self._send(404, {"error": {"message": "not found"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def complete(self, body: dict) -> tuple[int, dict]:
        prompts = body["prompt"]
        prompts = prompts if prompts and isinstance(prompts[0], list) else [prompts]
        k = body.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            return 400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                              f"{self.max_logprobs}", "code": 400}}
        for prompt in prompts:
            bad = [i for i in prompt if not 0 <= i < self.vocab_limit]
            if bad:
                return 400, {"error": {"message": f"Token id {bad[0]} is out of vocabulary", "code": 400}}
        choices = []
        for index, prompt in enumerate(prompts):
            with self._lock:
                self.prompts_seen.append(list(prompt))
            with self._forward_lock, torch.no_grad():
                logp = torch.log_softmax(self.model(torch.tensor([prompt])).logits[0].float(), -1)
            positions: list = [None]
            for j in range(1, len(prompt)):
                row = logp[j - 1]
                values, ids = row.topk(min(k, row.shape[0]))
                entry = {}
                for token in [*ids.tolist(), prompt[j]]:
                    entry[str(token)] = {"logprob": float(row[token]), "rank": int((row > row[token]).sum()) + 1,
                                         "decoded_token": self.tokenizer.decode([token])}
                positions.append(entry)
            choices.append({"index": index, "text": "x", "finish_reason": "length", "prompt_logprobs": positions})
        answer = {"id": "cmpl-fake", "object": "text_completion", "model": self.name, "choices": choices}
        if self.malform is not None:
            answer = self.malform(answer)
        return 200, answer

    def __enter__(self) -> "FakeVLLM":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
