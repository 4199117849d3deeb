"""A faithful double of the Oakestra root orchestrator's REST API that really runs the
instances it deploys, with buildah (or as host processes), on this machine.

- :mod:`.api`: the system manager's routes and quirks, plus test hooks under ``/double/``.
- :mod:`.root`: applications, services, instances; scheduling by ``direct`` constraint;
  worker-side statuses reach the root ``report_delay_s`` late.
- :mod:`.worker`: an instance = ``buildah from`` + ``buildah run --isolation chroot``.
- :mod:`.tokens`: RS256 access/refresh tokens with configurable lifetimes.
- ``python -m oakestra_double --port P ...`` serves it (see :mod:`.__main__`);
  :class:`OakestraDouble` starts it as a child process for tests.

Running instances needs root and buildah; buildah uses ``CONTAINERS_STORAGE_CONF`` from the
environment (tests set it with ``oci_testing.use_test_storage``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from flops_utils.net import find_free_port, wait_for_port
from flops_utils.processes import StartStop, stop_process_groups

from .worker import WorkerSpec

__all__ = ["OakestraDouble", "WorkerSpec"]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class OakestraDouble(StartStop):
    """The double as a child process on ``127.0.0.1:<free port>``; ``url`` is its base URL.

    Args:
        workdir: holds ``double.log`` (its output) and ``instances/`` (each instance's log).
        workers: the worker nodes (default: ``cluster1``/``worker1`` of this machine's arch).
        users: username → password (default ``{"Admin": "Admin"}``, Oakestra's default).
        access_token_lifetime_s: seconds an access token lasts (Oakestra: 600).
        report_delay_s: seconds until a worker-side status reaches the root (Oakestra's
            cluster pushes every 15 s; small here so tests stay fast).
        schedule_delay_s: seconds the root scheduler takes.
        restart_delay_s: seconds after which the cluster manager restarts a ``FAILED``,
            ``DEAD`` or ``NO_WORKER_CAPACITY`` instance (Oakestra: about 15).
        worker_vcpus, worker_memory_mb: each worker's capacity.
        organizations: the organizations one logs in to (Oakestra's default: ``root``).
        port: the port to listen on (default: a free one).
        process_images: image reference → entrypoint argv: run instances as host processes
            (no root, no buildah; see :mod:`.worker`) instead of with buildah.

    :meth:`start` raises ``RuntimeError`` with the log's tail if it does not answer within
    30 s. :meth:`stop` sends SIGTERM (the double undeploys every instance) and waits.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        workers: Sequence[WorkerSpec] = (WorkerSpec("cluster1", "worker1"),),
        users: dict[str, str] | None = None,
        access_token_lifetime_s: float = 600.0,
        report_delay_s: float = 0.2,
        schedule_delay_s: float = 0.05,
        restart_delay_s: float = 15.0,
        worker_vcpus: int = 8,
        worker_memory_mb: int = 16384,
        organizations: Sequence[str] = ("root",),
        port: int | None = None,
        process_images: dict[str, list[str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workers = tuple(workers)
        self.users = users or {"Admin": "Admin"}
        self.access_token_lifetime_s = access_token_lifetime_s
        self.report_delay_s = report_delay_s
        self.schedule_delay_s = schedule_delay_s
        self.restart_delay_s = restart_delay_s
        self.worker_vcpus = worker_vcpus
        self.worker_memory_mb = worker_memory_mb
        self.organizations = tuple(organizations)
        self.process_images = process_images
        self.port = port or find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> OakestraDouble:
        """Start the process and wait until ``GET /double/stats`` answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "oakestra_double", "--port", str(self.port),
            "--access-token-lifetime-s", str(self.access_token_lifetime_s),
            "--report-delay-s", str(self.report_delay_s),
            "--schedule-delay-s", str(self.schedule_delay_s),
            "--restart-delay-s", str(self.restart_delay_s),
            "--worker-vcpus", str(self.worker_vcpus),
            "--worker-memory-mb", str(self.worker_memory_mb),
            "--workdir", str(self.workdir / "instances"),
        ]  # fmt: skip
        for name, password in self.users.items():
            argv += ["--user", f"{name}:{password}"]
        for organization in self.organizations:
            argv += ["--organization", organization]
        for worker in self.workers:
            argv += ["--worker", f"{worker.cluster}:{worker.hostname}:{worker.arch}"]
        for ref, entrypoint in (self.process_images or {}).items():
            argv += ["--process-image", f"{ref}={json.dumps(entrypoint)}"]
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_parent, *filter(None, [env.get("PYTHONPATH")])]
        )
        with (self.workdir / "double.log").open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        if wait_for_port("127.0.0.1", self.port, START_TIMEOUT_S):
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    if requests.get(f"{self.url}/double/stats", timeout=2).ok:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the Oakestra double did not start on {self.url}: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the double (it undeploys its instances) and wait for it to exit."""
        if self._process is not None:
            stop_process_groups([self._process], timeout_s=STOP_TIMEOUT_S)
            self._process = None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of ``double.log``."""
        path = self.workdir / "double.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    # ---- test hooks --------------------------------------------------------------------

    def inject_faults(
        self, count: int, status: int = 500, delay_s: float = 0.0, after: bool = False
    ) -> None:
        """The next ``count`` ``/api/`` requests wait ``delay_s`` seconds, then answer
        ``status`` (``0``: answer normally after the delay). ``after``: handle the request
        first and delay the answer (a slow root that did the work)."""
        body = {"count": count, "status": status, "delay_s": delay_s, "after": after}
        self._post("/double/faults", body)

    def rotate_keys(self) -> None:
        """A new key pair, as after an Oakestra root restart: tokens issued before get 422
        ``Signature verification failed``."""
        self._post("/double/rotate-keys", {})

    def refuse_services(self, count: int, reason: str) -> None:
        """The network manager refuses the next ``count`` services with ``reason``: Oakestra
        answers 200 with them in ``failed_services``."""
        self._post("/double/refuse-services", {"count": count, "reason": reason})

    def revoke_tokens(self, access: bool = True, refresh: bool = False) -> None:
        """Reject the access (and/or refresh) tokens issued until now with a 401."""
        self._post("/double/revoke", {"access": access, "refresh": refresh})

    def stats(self) -> dict[str, int]:
        """Counters: ``logins``, ``refreshes``, ``unauthorized`` (401s), ``requests``, and
        requests per route (``"GET /api/services/<app_id>"``)."""
        stats: dict[str, int] = requests.get(f"{self.url}/double/stats", timeout=5).json()
        return stats

    def instances(self) -> list[dict[str, Any]]:
        """The workers' view: ``service_id``, ``instance_number``, ``image``, ``container``,
        ``pid``, ``status``, ``returncode``, ``log``, ``worker``, ``alive``."""
        found: list[dict[str, Any]] = requests.get(f"{self.url}/double/instances", timeout=5).json()
        return found

    def kill_instance(self, service_id: str, instance_number: int) -> None:
        """SIGKILL the instance's processes; it then reports ``DEAD`` (and the cluster
        manager restarts it after ``restart_delay_s`` unless it is undeployed)."""
        self._post(f"/double/instances/{service_id}/{instance_number}/kill", {})

    def _post(self, path: str, body: dict[str, Any]) -> None:
        requests.post(f"{self.url}{path}", json=body, timeout=5).raise_for_status()
