"""A small Prometheus text-format (0.0.4) registry: counters, gauges, histograms.

Written here rather than depending on prometheus_client: the server needs a dozen series, all
updated from the event loop thread, so no locking is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: a loopback round trip is tens of ms; an overloaded CPU model can take a second.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text

    def samples(self) -> list[tuple[str, float]]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{name} {_fmt(value)}" for name, value in self.samples()]
        return "\n".join(lines) + "\n"


class Counter(Metric):
    """Counted by hand, or read from `fn` (which must never decrease) at scrape time."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self.value = 0.0
        self.fn = fn

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def samples(self) -> list[tuple[str, float]]:
        return [(self.name, float(self.fn()) if self.fn else self.value)]


class Gauge(Metric):
    """A value set by hand, or read from `fn` at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self.value = 0.0
        self.fn = fn

    def set(self, value: float) -> None:
        self.value = float(value)

    def samples(self) -> list[tuple[str, float]]:
        return [(self.name, float(self.fn()) if self.fn else self.value)]


class Histogram(Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def samples(self) -> list[tuple[str, float]]:
        out = []
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            cumulative += n
            out.append((f'{self.name}_bucket{{le="{_fmt(bound)}"}}', cumulative))
        out.append((f'{self.name}_bucket{{le="+Inf"}}', self.count))
        out.append((f"{self.name}_sum", self.sum))
        out.append((f"{self.name}_count", self.count))
        return out


class Labelled(Metric):
    """A family of samples with labels, read from `fn` at scrape time: `fn` returns
    (name suffix, labels, value) triples, e.g. ("", {"replica": "a1"}, 12.0)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        fn: Callable[[], list[tuple[str, dict[str, str], float]]],
    ) -> None:
        super().__init__(name, help_text)
        self.kind = kind
        self.fn = fn

    def samples(self) -> list[tuple[str, float]]:
        out = []
        for suffix, labels, value in self.fn():
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append((f"{self.name}{suffix}{{{text}}}" if text else self.name + suffix, value))
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def add(self, metric: Metric) -> Metric:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str) -> Counter:
        return self.add(Counter(name, help_text))  # type: ignore[return-value]

    def counter_fn(self, name: str, help_text: str, fn: Callable[[], float]) -> Counter:
        return self.add(Counter(name, help_text, fn))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, fn: Callable[[], float] | None = None) -> Gauge:
        return self.add(Gauge(name, help_text, fn))  # type: ignore[return-value]

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        return self.add(Histogram(name, help_text, buckets))  # type: ignore[return-value]

    def labelled(
        self,
        name: str,
        help_text: str,
        kind: str,
        fn: Callable[[], list[tuple[str, dict[str, str], float]]],
    ) -> Labelled:
        return self.add(Labelled(name, help_text, kind, fn))  # type: ignore[return-value]

    def render(self) -> str:
        return "".join(m.render() for m in self.metrics.values())


def parse_samples(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from exposition text (for tests and the benchmark)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
