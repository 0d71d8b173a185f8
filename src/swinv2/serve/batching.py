"""Dynamic batching: single items submitted from any thread, run by one function in batches.

`DynamicBatcher(run_batch, max_batch=, max_wait_s=)` owns one thread, the model's. An item submitted
waits at most `max_wait_s` from its arrival for others to join it; a batch runs as soon as it holds
`max_batch` items or its first item has waited that long, whichever comes first (and at once while
closing, or after `hurry()`). `run_batch(values)` returns one result per value, in order; each result goes to the
`Future` of its own item, so a caller can only ever receive the answer to what it submitted. A batch
that raises fails each of its items with that exception; the thread goes on with the next batch.

Why one thread: a model runtime (PyTorch, ONNX Runtime, OpenVINO) already spreads one call over the
CPU's cores; two calls at once would only fight for them. Batching is what turns many small calls into
fewer large ones, which these runtimes run at a higher images/s.

An item whose future was cancelled before its batch starts (its request timed out) is dropped, not
run. `max_pending` bounds what may wait (`QueueFull` past it), so memory cannot grow without bound
even if a caller does not bound its own admissions.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

V = TypeVar("V")
R = TypeVar("R")


class QueueFull(Exception):
    """`max_pending` items are waiting already."""


class Closed(Exception):
    """The batcher is closing or closed: it takes no new items."""


@dataclass
class _Item(Generic[V]):
    value: V
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[V, R]):
    """Runs `run_batch` on batches of submitted values in its own thread (see the module docstring).

    `on_batch(size, seconds)` is told each batch run (for metrics)."""

    def __init__(
        self,
        run_batch: Callable[[list[V]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_pending: int | None = None,
        on_batch: Callable[[int, float], Any] | None = None,
        name: str = "swinv2-batcher",
    ) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_s at least 0")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self.max_pending, self.on_batch = max_pending, on_batch
        self._pending: deque[_Item[V]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._hurry = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Items waiting for a batch (not counting the batch running)."""
        return len(self._pending)

    def submit(self, value: V) -> Future:
        """A Future of `value`'s result; `QueueFull` or `Closed` where it cannot be taken."""
        item: _Item[V] = _Item(value)
        with self._cond:
            if self._closed:
                raise Closed("the batcher is closed")
            if self.max_pending is not None and len(self._pending) >= self.max_pending:
                raise QueueFull(f"{len(self._pending)} items are waiting already")
            self._pending.append(item)
            self._cond.notify()
        return item.future

    def hurry(self) -> None:
        """From now on run each batch with what is waiting, without waiting for it to fill (a drain)."""
        with self._cond:
            self._hurry = True
            self._cond.notify()

    def close(self, timeout: float | None = None) -> bool:
        """Take no new items, run those waiting, stop the thread; whether it stopped within `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_batch(self) -> list[_Item[V]] | None:
        """The next batch to run (None: closed and nothing left), per the rule of the module docstring."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = self._pending[0].arrived + self.max_wait_s
            while len(self._pending) < self.max_batch and not (self._closed or self._hurry):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [it for it in batch if it.future.set_running_or_notify_cancel()]  # cancelled: timed out
            if not live:
                continue
            start = time.perf_counter()
            try:
                results = self.run_batch([it.value for it in live])
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} values")
            except Exception as e:  # every item is answered, whatever went wrong; the thread goes on
                for it in live:
                    it.future.set_exception(e)
                continue
            seconds = time.perf_counter() - start
            if self.on_batch is not None:
                self.on_batch(len(live), seconds)
            for it, result in zip(live, results):
                it.future.set_result(result)
