"""Read ahead in a background thread: the next items are made while the consumer works on this one."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_QUEUE_POLL_SECONDS = 0.1  # how often a blocked producer checks whether the consumer has gone
_END = object()  # the producer has queued its last item


class _Failure:
    """An exception raised in the producer thread, on its way to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(items: Iterable[T], depth: int, name: str = "clipreel-read-ahead") -> Iterator[T]:
    """Yield `items`, made by a background thread at most `depth` items ahead of the consumer.

    Memory holds at most depth + 2 items (the queue, the one being made, the one being used). An
    exception in the producer is raised in the consumer; a consumer that stops early (break, error)
    stops the producer before the next item.
    """
    if depth < 1:
        raise ValueError(f"read_ahead: depth must be >= 1 (got {depth})")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(iter(items), ready, stop), name=name, daemon=True)
    producer.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()  # the consumer stopped early, finished or failed: let the producer go
        producer.join()


def _produce(items: Iterator, ready: queue.Queue, stop: threading.Event) -> None:
    """The background thread: make each item and queue it (blocking while the queue is full)."""
    try:
        for item in items:
            if not _put(ready, item, stop):
                return
            if stop.is_set():
                return
        _put(ready, _END, stop)
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
        _put(ready, _Failure(error), stop)


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Queue `item`, waiting while the queue is full; False if the consumer stopped meanwhile."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=_QUEUE_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
