"""``POST /mocks`` as a background job: splitting MNIST and pushing the parts takes from a few
seconds to a minute on a loaded machine, longer than an HTTP client should wait. The request
answers 202 with a job id at once; ``GET /mocks/{job_id}`` tells how the job went.

Jobs run one at a time on one worker thread (two pushes to the same nodes would race for the
same tags), and the last :data:`KEPT_JOBS` jobs are remembered in memory (a manager restart
forgets them; the pushed data stays on the nodes). The heavy imports (``datasets``,
``flwr_datasets``) happen in :meth:`MockJobs.warm_up`, off the request thread.
"""

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from flops_utils.errors import FlopsError
from flops_utils.logging import logger

KEPT_JOBS = 100
"""How many finished jobs :meth:`MockJobs.get` still knows."""

JobStatus = Literal["running", "done", "failed"]


@dataclass
class MockJob:
    """One push: ``rows`` per node once ``done``; ``message`` says why it ``failed``."""

    job_id: str
    tag: str
    status: JobStatus = "running"
    rows: dict[str, int] = field(default_factory=dict)
    message: str = ""

    def view(self) -> dict[str, Any]:
        """The job as ``GET /mocks/{job_id}`` shows it."""
        return asdict(self)


class MockJobs:
    """Runs mock-data pushes in the background, one at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mocks")
        self._jobs: OrderedDict[str, MockJob] = OrderedDict()
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Import the mock provider and its datasets libraries on the worker thread."""

        def load() -> None:
            import data_server.mock_provider  # noqa: F401

        self._pool.submit(load)

    def submit(self, tag: str, work: Callable[[], dict[str, int]]) -> MockJob:
        """Queue ``work`` (returns the rows pushed per node; raises ``FlopsError`` with a
        message for the user); returns the new job."""
        job = MockJob(job_id=uuid.uuid4().hex[:12], tag=tag)
        with self._lock:
            self._jobs[job.job_id] = job
            while len(self._jobs) > KEPT_JOBS:
                self._jobs.popitem(last=False)
        self._pool.submit(self._run, job, work)
        return job

    def get(self, job_id: str) -> MockJob | None:
        """The job with ``job_id``; ``None`` when unknown or forgotten."""
        with self._lock:
            return self._jobs.get(job_id)

    def close(self) -> None:
        """Stop taking jobs; a running one finishes."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: MockJob, work: Callable[[], dict[str, int]]) -> None:
        try:
            rows = work()
        except FlopsError as exc:
            job.message, job.status = exc.message, "failed"
        except Exception as exc:
            logger.exception("mock data job %s failed", job.job_id)
            job.message = f"internal error ({type(exc).__name__}); the manager's log has it"
            job.status = "failed"
        else:
            job.rows, job.status = rows, "done"
