"""``kdlm cache-teacher`` on several processes (torchrun, gloo on CPU): the same files as one process. Slow tier."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_config

from kdlm.cache import build_cache
from kdlm.config import save_resolved
from test_distributed_slow import _launch

pytestmark = pytest.mark.slow

# sampled: the draws are seeded per example, so equal bytes also show that no process used another's seeds.
SETTINGS = {"cache.mode": "sampled", "cache.samples": 8, "cache.top": 2, "cache.shard_size": 5, "train.progress": False}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_processes_write_the_one_process_cache_byte_for_byte(tiny, tmp_path):
    one = tiny_config(tiny, tmp_path / "one", **SETTINGS, **{"cache.dir": str(tmp_path / "one_cache")})
    manifest = build_cache(one)
    assert len(manifest["shards"]) >= 3  # both processes write shards, one of them more than the other
    two = tiny_config(tiny, tmp_path / "two", **SETTINGS, **{"cache.dir": str(tmp_path / "two_cache")})
    save_resolved(two, tmp_path / "two.yaml")
    result = _launch(tmp_path / "two.yaml", 2, kdlm_command="cache-teacher", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 processes" in result.stdout and result.stdout.count("bytes per token") == 1  # process 0 reports
    # Every response token computed once over both processes (not once per process).
    total, computed = re.search(r"(\d+) response tokens.* (\d+) tokens computed", result.stdout).groups()
    assert int(computed) == int(total) == manifest["tokens"]
    expected, got = _files(Path(one.cache.dir)), _files(Path(two.cache.dir))
    assert list(got) == list(expected) == ["manifest.json", *(s["file"] for s in manifest["shards"])]
    for name in expected:
        assert got[name] == expected[name], name


def test_a_killed_two_process_run_resumes_to_the_same_bytes(tiny, tmp_path):
    one = tiny_config(tiny, tmp_path / "one", **SETTINGS, **{"cache.dir": str(tmp_path / "one_cache")})
    build_cache(one)
    two = tiny_config(tiny, tmp_path / "two", **SETTINGS, **{"cache.dir": str(tmp_path / "two_cache")})
    save_resolved(two, tmp_path / "two.yaml")
    # Each process SIGKILLs itself right after writing its first shard; torchrun then stops the other one.
    killed = _launch(tmp_path / "two.yaml", 2, kdlm_command="cache-teacher", timeout=300,
                     env={"KDLM_FAULT_KILL_AFTER_SHARDS": "1"})
    assert killed.returncode != 0
    folder = Path(two.cache.dir)
    assert not (folder / "manifest.json").exists() and (folder / "identity.json").is_file()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    assert kept and set(kept) <= {"shard-00000.safetensors", "shard-00001.safetensors"}
    done = _launch(tmp_path / "two.yaml", 2, kdlm_command="cache-teacher", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept  # finished shards are not recomputed
    expected, got = _files(Path(one.cache.dir)), _files(folder)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name] == expected[name], name
