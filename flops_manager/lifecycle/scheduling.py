"""Fair scheduling of builds across customers.

A build holds a worker thread while it fetches a repository and installs its dependencies,
which can take minutes (or, for a repository served slowly on purpose, until the fetch limits
stop it). With one first-come queue, one customer submitting many such projects would hold
every worker and stall everybody else's. :class:`FairQueue` runs at most ``per_customer``
builds of one customer at a time and hands free workers to the customers in turn
(round-robin), so another customer's build starts as soon as a worker is free.
"""

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flops_utils.logging import logger

Work = Callable[[], object]


class FairQueue:
    """Runs submitted work on ``workers`` threads, at most ``per_customer`` of one customer
    at a time, customers served in turn.

    Args:
        workers: threads running work at the same time (at least 1).
        per_customer: the most work of one customer running at the same time (at least 1).
        name: thread name prefix.

    Work that raises is logged; it never stops the queue. Thread-safe.
    """

    def __init__(self, workers: int, per_customer: int, name: str = "build") -> None:
        if workers < 1 or per_customer < 1:
            raise ValueError("workers and per_customer must be at least 1")
        self.workers = workers
        self.per_customer = per_customer
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, deque[Work]] = OrderedDict()
        self._running: dict[str, int] = {}
        self._closed = False

    def submit(self, customer: str, work: Work) -> bool:
        """Queue ``work`` for ``customer``; ``False`` when the queue is closed."""
        with self._lock:
            if self._closed:
                return False
            self._waiting.setdefault(customer, deque()).append(work)
            self._dispatch()
        return True

    def waiting(self, customer: str) -> int:
        """How much work of ``customer`` waits for a worker."""
        with self._lock:
            return len(self._waiting.get(customer, ()))

    def running(self, customer: str) -> int:
        """How much work of ``customer`` runs now."""
        with self._lock:
            return self._running.get(customer, 0)

    def close(self) -> None:
        """Drop the waiting work and stop taking more; running work finishes in its thread."""
        with self._lock:
            self._closed = True
            self._waiting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        """Start waiting work while a worker is free, taking customers in turn: each pass
        moves a served customer to the back of the line. Called with the lock held."""
        while sum(self._running.values()) < self.workers:
            customer = next(
                (
                    c
                    for c, queued in self._waiting.items()
                    if queued and self._running.get(c, 0) < self.per_customer
                ),
                None,
            )
            if customer is None:
                return
            work = self._waiting[customer].popleft()
            self._waiting.move_to_end(customer)
            if not self._waiting[customer]:
                del self._waiting[customer]
            self._running[customer] = self._running.get(customer, 0) + 1
            try:
                self._pool.submit(self._run, customer, work)
            except RuntimeError:  # the pool shut down meanwhile
                self._running[customer] -= 1
                return

    def _run(self, customer: str, work: Work) -> None:
        try:
            work()
        except Exception:
            logger.exception("queued work of customer %s failed", customer)
        finally:
            with self._lock:
                self._running[customer] -= 1
                if not self._running[customer]:
                    del self._running[customer]
                if not self._closed:
                    self._dispatch()
