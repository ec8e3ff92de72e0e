"""What the benches say about the machine they ran on, and how they take the slow machine class's code paths."""

from __future__ import annotations

import os
import re
from pathlib import Path

# The slow machine class has AVX2 only. These cap what torch's own kernels, oneDNN (bf16 and most fp32 GEMMs)
# and MKL may use, so a run here takes the code paths such a CPU takes; they are read once, at load.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_line() -> str:
    """The CPU model and the SIMD/AMX flags that decide CPU speed, as one line."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    wanted = sorted(
        f for f in (flags.group(1).split() if flags else []) if f in ("avx2", "fma") or f.startswith(("avx512", "amx"))
    )
    cores = len(re.findall(r"^processor\s*:", text, re.M))
    # A run pinned to fewer CPUs (`taskset -c 0`: the one-core proxy for a 2-vCPU, one-core VM) says so.
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    pinned = f", pinned to {allowed}" if allowed < cores else ""
    return (
        f"CPU: {model.group(1).strip() if model else 'unknown'} x{cores}{pinned}; flags: {' '.join(wanted) or 'none'}"
    )
