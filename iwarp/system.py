"""What machine this is: for choosing thread counts and for labelling measurements."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's FMA units)."""
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
        if count:
            return count
    except ImportError:
        pass
    try:
        cores = set()
        for cpu in os.sched_getaffinity(0):
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        if cores:
            return len(cores)
    except (AttributeError, OSError):
        pass
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_label() -> str:
    """e.g. 'AMD EPYC 9B14 (2 cores)', for benchmark reports."""
    return f"{cpu_name()} ({os.cpu_count() or 0} cores)"


# ISA features that decide which engine and precision are fastest (bench prints them).
ISA_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_features() -> dict[str, bool]:
    """{feature: present} for `ISA_FEATURES`."""
    flags = cpu_flags()
    return {f: f in flags for f in ISA_FEATURES}


def has_bf16_compute() -> bool:
    """Whether bf16 matrix work runs natively (AMX or AVX512-BF16), not emulated in fp32."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags
