"""The vLLM server launcher (kdlm.vllm_server): clear errors without a vLLM environment or when the server dies at
start-up, the whole process group stopped; the slow tier serves the demo teacher for real."""

from __future__ import annotations

import json
import os
import stat
import urllib.request
from pathlib import Path

import pytest

from kdlm.vllm_server import ServerError, VLLMServer, vllm_python


def test_missing_vllm_environment_names_make_vllm(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLM_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(ServerError, match="make vllm"):
        vllm_python()


def _fake_python(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_server_that_dies_at_start_up_raises_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLM_VLLM_PYTHON", str(_fake_python(tmp_path, 'echo "ValueError: no such model" >&2; exit 3')))
    server = VLLMServer(tmp_path / "model", log_path=tmp_path / "server.log", startup_timeout=60)
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*no such model"):
        server.start()
    assert server.process is None


def test_server_not_ready_in_time_is_stopped_with_its_children(tmp_path, monkeypatch):
    # A "server" that never answers and starts a child: the timeout stops both (the child's pid is written first).
    body = f'sleep 300 & echo $! > {tmp_path}/child.pid; echo started; wait'
    monkeypatch.setenv("KDLM_VLLM_PYTHON", str(_fake_python(tmp_path, body)))
    server = VLLMServer(tmp_path / "model", log_path=tmp_path / "server.log", startup_timeout=3)
    with pytest.raises(ServerError, match="not ready after 3 s"):
        server.start()
    child = int((tmp_path / "child.pid").read_text())
    # The child was SIGKILLed with its group: /proc shows it gone or a zombie awaiting its (dead) parent's reaper.
    state = Path(f"/proc/{child}/stat")
    assert not state.exists() or state.read_text().split()[2] == "Z"


@pytest.mark.slow
def test_demo_teacher_served_with_prompt_logprobs(vllm_demo_teacher):
    server = vllm_demo_teacher
    models = json.loads(urllib.request.urlopen(f"{server.url}/v1/models", timeout=30).read())
    assert [m["id"] for m in models["data"]] == ["teacher"]
    body = json.dumps({"model": "teacher", "prompt": [1, 504, 3458, 2], "max_tokens": 1, "prompt_logprobs": 3,
                       "temperature": 0.0}).encode()
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    answer = json.loads(urllib.request.urlopen(request, timeout=300).read())
    positions = answer["choices"][0]["prompt_logprobs"]
    assert positions[0] is None and len(positions) == 4  # no log-prob for the first token; one entry per other
    for entry in positions[1:]:
        assert 3 <= len(entry) <= 4  # top-3, plus the actual token when it is not among them
        assert all(value["logprob"] <= 0.0 for value in entry.values())


def test_server_dies_with_the_process_that_started_it(tmp_path):
    # A run killed with SIGKILL runs no clean-up: the server (here a fake that never gets ready) must not outlive it.
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "server.pid"
    fake = _fake_python(tmp_path, f"echo $$ > {pid_file}; exec sleep 300")
    parent = subprocess.Popen([sys.executable, "-c", (
        "from kdlm.vllm_server import VLLMServer; "
        f"VLLMServer('{tmp_path}/model', log_path='{tmp_path}/server.log', startup_timeout=300).start()")],
        env={**os.environ, "KDLM_VLLM_PYTHON": str(fake)})
    try:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text().strip():
                break
            time.sleep(0.1)
        server = int(pid_file.read_text())
        assert Path(f"/proc/{server}").exists()  # the fake server runs while its parent waits for it
    finally:
        parent.kill()
        parent.wait()
    for _ in range(100):
        state = Path(f"/proc/{server}/stat")
        if not state.exists() or state.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    state = Path(f"/proc/{server}/stat")
    alive = state.exists() and state.read_text().split()[2] != "Z"
    if alive:  # the test fails, and does not leave the fake server behind
        os.kill(server, 9)
    assert not alive
