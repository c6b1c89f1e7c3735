"""The machine a benchmark ran on, as one line for its JSON and table: OS, CPU model, CPU count and the widest
x86 vector extension (AVX-512 or AVX2; compiled packages are built for AVX2 and run on both, but the eager model's
kernels use what the CPU has, so timings from the two kinds of CPU are not comparable)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return ", ".join(filter(None, [platform.platform(), model, f"{os.cpu_count()} CPUs", vector]))
