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
