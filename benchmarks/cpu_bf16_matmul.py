"""bfloat16 against float32 matmul on this CPU: is ``train.fsdp_param_dtype: bfloat16`` a lever for fsdp here?

Exact command (from the repository root): ``.venv/bin/python benchmarks/cpu_bf16_matmul.py``

bf16 parameters would halve the bytes FSDP gathers (the transport that makes the fsdp step slower than ddp's on
CPU, benchmarks/gloo_bandwidth.py), but only pays if bf16 compute is not slower than fp32. Times a student-layer-sized
matmul ([512, 576] @ [576, 1536]: 512 tokens through SmolLM2's MLP up-projection) in each dtype, one thread (as each
torchrun process runs), median of ``--repeats``. Writes ``benchmarks/results/cpu_bf16_matmul.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        seconds[str(dtype).removeprefix("torch.")] = statistics.median(times)
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0] if Path("/proc/cpuinfo").is_file() else ""
    result = {"median_seconds": seconds, "bf16_over_fp32": seconds["bfloat16"] / seconds["float32"],
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "repeats": args.repeats}
    out = Path(__file__).resolve().parent / "results" / "cpu_bf16_matmul.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
