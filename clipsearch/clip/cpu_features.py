"""What the processor offers: the flags that decide which precision runs fastest, and the cores
this process may use; read without torch (the indexer consults remembered verdicts before
deciding whether to import it)."""

from __future__ import annotations

import functools
import os

# x86 CPU flags meaning bf16 dot products run in hardware.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# The flags that decide which precision runs fastest: a remembered verdict holds for them only.
SPEED_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", *BF16_FLAGS})


def has_vnni() -> bool:
    """Whether int8 dot products sum exactly in hardware (VNNI). Without it (AVX2), the fast
    u8 x s8 instruction adds each pair of products in saturating int16, which torch's int8
    (`clip.cpu.Int8Linear`) and ONNX Runtime's (`clip.onnx_graph.Graph.linear`) each avoid
    in their own way."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports; empty elsewhere (other systems fall back to fp32)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
