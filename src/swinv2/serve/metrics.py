"""The server's metrics in the Prometheus text exposition format (version 0.0.4), written here: the
three kinds `swinv2 serve` needs (counters by label, histograms, gauges read when scraped) are a few
dozen lines, where `prometheus_client` would be one more dependency of the serve extra for the same
text. Every update takes one lock: the event loop and the model thread both record.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


class Counter:
    """A monotonically increasing count per combination of label values."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, by: float = 1.0) -> None:
        self._values[label_values] = self._values.get(label_values, 0.0) + by

    def value(self, *label_values: str) -> float:
        return self._values.get(label_values, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in sorted(self._values.items())]
        return lines


class Histogram:
    """Observations counted into cumulative buckets (upper bounds `buckets`, then +Inf), with their sum."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self._counts[i] += 1
                break
        self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip(self.bounds, self._counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {total}')
        lines += [f"{self.name}_sum {_number(self._sum)}", f"{self.name}_count {total}"]
        return lines


class Gauge:
    """A value read when the metrics are scraped (`read()`), such as a queue's depth."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.read())}"]


class Registry:
    """The metrics of one server, rendered together in the order they were added."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._metrics: list[Counter | Histogram | Gauge] = []

    def add(self, metric: Counter | Histogram | Gauge):
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        with self.lock:
            return "\n".join(line for m in self._metrics for line in m.render()) + "\n"


# Seconds: a micro model answers in about a millisecond, SwinV2-T under load in about a second.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """What `/metrics` shows: requests by endpoint and status, the latency of predictions, the sizes and
    run times of the model's batches, and the queue (requests admitted and not yet answered, and of those
    the images waiting for a batch)."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        queue_limit: int,
        ready: Callable[[], bool],
        waiting: Callable[[], float] = lambda: 0,
    ) -> None:
        self.registry = r = Registry()
        self.requests = r.add(
            Counter("swinv2_requests_total", "HTTP requests answered, by endpoint and status.", ("endpoint", "status"))
        )
        self.latency = r.add(
            Histogram(
                "swinv2_predict_latency_seconds",
                "Time from a prediction request's arrival "
                "to its answer (decoding, queueing, the model), answered requests.",
                LATENCY_BUCKETS,
            )
        )
        self.batch_size = r.add(Histogram("swinv2_batch_size", "Images per batch the model ran.", BATCH_BUCKETS))
        self.batch_seconds = r.add(Histogram("swinv2_batch_seconds", "Time the model took per batch.", LATENCY_BUCKETS))
        r.add(Gauge("swinv2_queue_depth", "Prediction requests admitted and not yet answered.", queue_depth))
        r.add(Gauge("swinv2_batch_waiting", "Decoded images waiting for the model's next batch.", waiting))
        r.add(
            Gauge(
                "swinv2_queue_limit", "Admitted requests at most (--queue); more are answered 503.", lambda: queue_limit
            )
        )
        r.add(Gauge("swinv2_ready", "1 once the model is loaded and warmed up, else 0.", lambda: float(ready())))

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self.registry.lock:
            self.requests.inc(endpoint, str(status))
            if seconds is not None:
                self.latency.observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        with self.registry.lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)

    def render(self) -> str:
        return self.registry.render()
