"""The ``oakestra`` orchestrator: a project's FL services as the services of one Oakestra
application, run from the ``oci`` builder's images on Oakestra's worker nodes.

A project becomes the application ``oakestra_name("flops", project_id)`` in the namespace
:attr:`OakestraOrchestrator.namespace`; each FL service becomes one of its microservices with
one instance:

- the aggregator first, anywhere Oakestra places it, binding ``0.0.0.0:PORT`` and publishing
  it on its worker as ``"PORT:PORT"``. The backend chooses ``PORT`` from its port range
  (``port_range``), skipping the ports its other running services (other projects'
  aggregators, trained-model servers) publish, so that two projects placed on one worker do
  not collide. Once the aggregator runs, the learners get its instance's ``host_ip`` and that
  port as ``FLOPS_AGGREGATOR_ADDRESS``;
- one learner per eligible node, pinned to it with a ``direct`` constraint (the node's
  registered cluster and hostname, the only placement Oakestra honours) and given the node's
  ``platform``;
- images by digest (``code``), the SLA's ``resource_constraints`` as ``memory``/``vcpus``/
  ``storage``, ``one_shot`` (an FL service ends by itself), and the MQTT and MLflow addresses
  the workers reach (``service_mqtt_url``/``service_mlflow_url``, default: the manager's).

The base class's watcher polls every ``poll_interval_s``; all services of a project are read
in one request (``GET /api/services/{application id}``, shared by the project's services for
half an interval), as the root's system manager is a single worker. An instance that reached a
terminal status (:data:`TERMINAL_STATUSES`) is reported through ``on_service_exit``:
``COMPLETED`` as exit code 0; ``DEAD`` (the container exited with an error) as a crash, with
the exit code the runtime gave in its ``status_detail`` (else 1); ``FAILED`` (it could not
start) and scheduling failures as 1. The last line is Oakestra's status with the instance's
own ``status_detail`` and the last line of its ``logs`` (the job-level ``status_detail`` stays
"Waiting for scheduling decision" and is never used). A service that ended is deleted at once:
Oakestra's cluster manager restarts ``FAILED`` and ``DEAD`` instances about every 15 s, so it
would crash-loop or rejoin training. ``NO_WORKER_CAPACITY`` is not an end (Oakestra retries
it), and an instance of an unknown node stays ``CLUSTER_SCHEDULED`` for ever: a service that
has not run within ``start_timeout_s`` ends with a message naming its node.
Statuses reach the root only with the cluster's push every 15 s, so every end is seen up to
15 s late. :meth:`~OakestraOrchestrator.stop` deletes the application, which deletes its
services and undeploys their instances; it finds the application by name, so nothing is left
behind even without handles. Handles hold the application and service ids and the published
port, so a restarted manager re-attaches by polling them again and keeps their ports reserved.

A service's output (``GET /api/flops/projects/{id}/logs``) is its instance's ``logs`` as the
root has them (:meth:`~OakestraOrchestrator.service_log`), followed by polling. Every poll keeps
the last ``logs`` seen, so the output of a service Oakestra deleted stays readable from this
manager process (up to :data:`KEPT_OUTPUTS` services; not after a restart).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flops_manager.errors import OakestraError, OakestraNotFound
from flops_manager.orchestrators.base import (
    Deployment,
    LogSource,
    Orchestrator,
    Service,
    ServiceExit,
    ServiceExitCallback,
    ServiceHandle,
    ServiceLog,
    ServiceSpec,
    ServiceStartedCallback,
    ServiceState,
)
from flops_manager.orchestrators.oakestra_client import (
    CRASHED_STATUSES,
    SCHEDULING_FAILURES,
    TERMINAL_STATUSES,
    OakestraClient,
    application,
    microservice,
    oakestra_name,
)
from flops_manager.orchestrators.ports import first_free_port, parse_port_range
from flops_utils import env_vars
from flops_utils.contract.exit_codes import UNKNOWN_EXIT
from flops_utils.logging import logger

POLL_INTERVAL_S = 1.0
"""Seconds between two status polls of a project's services."""

AGGREGATOR_START_TIMEOUT_S = 300.0
"""Seconds the aggregator's instance may take to reach ``RUNNING`` (pulling its image
included) before the deployment fails."""

PORT_RANGE = (30000, 30999)
"""Default ports (inclusive) the aggregators and trained-model servers publish on workers."""

EXITED_OK = frozenset({"COMPLETED"})
"""The terminal instance status of a one-shot service that exited 0."""

UNKNOWN_CRASH_RC = UNKNOWN_EXIT
"""Return code reported for a ``DEAD`` instance whose ``status_detail`` gives no exit code
(and for ``FAILED`` instances and scheduling failures, which never ran)."""

KEPT_OUTPUTS = 500
"""The most services whose last ``logs`` the backend keeps after Oakestra deleted them (it
deletes a service as soon as it ended, see the module docstring); the oldest go first."""

MAX_OUTPUT_CHARS = 64 * 1024
"""The most characters of one service's ``logs`` kept (its end): with :data:`KEPT_OUTPUTS`,
at most about 32 MB."""

LOG_POLL_INTERVAL_S = 2.0
"""Seconds between two reads of a followed service's ``logs`` from the root (its system
manager is a single worker; the cluster pushes new statuses every 15 s anyway)."""

_EXIT_CODE = re.compile(
    r"(?:exit(?:ed)?(?: with)?(?: status)? code|exit status)[:= ]*(-?\d+)", re.I
)


@dataclass(eq=False)
class _OakestraService(Service):
    """A watched Oakestra service of a project. ``where``: its placement in words (empty:
    anywhere); ``deployed_s``: ``time.monotonic()`` when it was deployed (or re-attached);
    ``has_run``: its instance was seen running; ``outcome``: how it ended, once seen."""

    application_id: str
    service_id: str
    where: str = field(default="", kw_only=True)
    deployed_s: float = field(default_factory=time.monotonic, kw_only=True)
    has_run: bool = field(default=False, kw_only=True)
    outcome: ServiceExit | None = field(default=None, kw_only=True)

    def handle(self) -> ServiceHandle:
        return {
            "name": self.name,
            "application_id": self.application_id,
            "service_id": self.service_id,
            "port": self.port,
        }


def instance_outcome(job: dict[str, Any]) -> tuple[str, str] | None:
    """``(status, detail)`` when the service's instance ended (or could not be placed), else
    ``None`` while it is pending or running. ``job`` is :meth:`OakestraClient.get_service`'s
    answer; a service-level scheduling failure (e.g. ``TargetClusterNotActive``) counts too.
    ``detail`` is the instance's own ``status_detail`` and the last line of its ``logs``
    (never the job's ``status_detail``, which stays "Waiting for scheduling decision").
    """
    status = str(job.get("status") or "")
    if status in SCHEDULING_FAILURES and not job.get("instance_list"):
        return status, ""
    for instance in job.get("instance_list") or []:
        instance_status = str(instance.get("status") or "")
        if instance_status in TERMINAL_STATUSES:
            return instance_status, _instance_detail(instance)
    return None


def _instance_detail(instance: dict[str, Any]) -> str:
    """The instance's ``status_detail`` and, unless it completed, its last output line."""
    detail = str(instance.get("status_detail") or "")
    if instance.get("status") in EXITED_OK:
        return detail
    lines = [line for line in str(instance.get("logs") or "").splitlines() if line.strip()]
    if lines:
        detail += ("; " if detail else "") + f"its last output: {lines[-1].strip()[-300:]}"
    return detail


def instance_logs(job: dict[str, Any]) -> str | None:
    """The ``logs`` of the service's instance as the root has them (Oakestra's NodeEngine
    reports the end of the instance's output), or ``None`` when it has none."""
    for instance in job.get("instance_list") or []:
        logs = instance.get("logs")
        if logs:
            return str(logs)[-MAX_OUTPUT_CHARS:]
    return None


def new_lines(seen: list[str], current: list[str]) -> list[str]:
    """The lines of ``current`` after what ``seen`` already had. Both are windows on the
    end of one output (the root keeps only its last lines): the longest end of ``seen``
    that ``current`` begins with is what they share; with nothing shared, all of
    ``current`` is new."""
    for shared in range(min(len(seen), len(current)), 0, -1):
        if seen[-shared:] == current[:shared]:
            return current[shared:]
    return current


class OakestraLog(ServiceLog):
    """A service's output as the root reports it: ``read`` returns the instance's ``logs``
    text now (``None``: none), which is the end of the output only, so :meth:`read_new`
    returns the lines past the part it shares with the last read (:func:`new_lines`)."""

    def __init__(self, read: Callable[[], str | None]) -> None:
        self.read = read
        self._seen: list[str] = []

    def read_tail(self, max_bytes: int) -> tuple[list[str], bool]:
        text = self.read() or ""
        lines = _lines(text[-max_bytes:])
        if len(text) > max_bytes and lines:
            lines = lines[1:]
        self._seen = _lines(text)
        return lines, len(text) > max_bytes

    def read_new(self, max_bytes: int) -> list[str]:
        current = _lines(self.read() or "")
        fresh = new_lines(self._seen, current) if current != self._seen else []
        self._seen = current
        return fresh


def _lines(text: str) -> list[str]:
    """``text``'s lines, split at line feeds only (as the local backend's files are)."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    return lines[:-1] if lines and not lines[-1] else lines


def _exit_line(status: str, detail: str) -> str:
    return f"Oakestra reports the instance {status}" + (f": {detail}" if detail else "")


def exit_of(status: str, detail: str, where: str = "") -> ServiceExit:
    """The :class:`ServiceExit` of an instance that ended with ``status``: ``COMPLETED`` 0;
    ``DEAD`` (a crash) the exit code ``detail`` names, else :data:`UNKNOWN_CRASH_RC`; any
    other status :data:`UNKNOWN_CRASH_RC`. ``where``: the placement in words, for scheduling
    failures."""
    if status in EXITED_OK:
        return ServiceExit(0, _exit_line(status, detail))
    if status in CRASHED_STATUSES:
        found = _EXIT_CODE.search(detail)
        code = int(found.group(1)) if found else UNKNOWN_CRASH_RC
        return ServiceExit(code or UNKNOWN_CRASH_RC, _exit_line(f"{status} (it crashed)", detail))
    if status in SCHEDULING_FAILURES:
        text = f"Oakestra could not place it{f' on {where}' if where else ''}: {status}"
        return ServiceExit(UNKNOWN_CRASH_RC, text + (f" ({detail})" if detail else ""))
    if status == "FAILED":
        return ServiceExit(UNKNOWN_CRASH_RC, _exit_line(f"{status} (it could not start)", detail))
    return ServiceExit(UNKNOWN_CRASH_RC, _exit_line(status, detail))


def _pending_text(service: _OakestraService, status: str) -> str:
    """Why a service has not run yet, naming its node (an unknown node leaves the instance
    ``CLUSTER_SCHEDULED`` for ever)."""
    if not service.where:
        return f"its instance is still {status}; check the worker nodes and the registry"
    return (
        f"its instance is still {status} for {service.where}; check that Oakestra has a "
        "worker of that hostname in that cluster, with the capacity the SLA asks"
    )


def _placement_text(placement: Any) -> str:
    return f"node {placement.hostname!r} of cluster {placement.cluster!r}" if placement else ""


class OakestraOrchestrator(Orchestrator):
    """Runs services on Oakestra through its root orchestrator's REST API.

    Args:
        client: a logged-in-on-demand :class:`OakestraClient`.
        on_service_exit: see :class:`Orchestrator`.
        namespace: the applications' and services' namespace (``^[a-zA-Z0-9]{1,30}$``).
        service_mqtt_url, service_mlflow_url: the broker and MLflow addresses the services on
            the workers reach (replace the manager's ``FLOPS_MQTT_URL``/``FLOPS_MLFLOW_URL``
            in their environment); empty keeps the manager's.
        poll_interval_s: seconds between status polls.
        aggregator_start_timeout_s: seconds the aggregator may take to run.
        start_timeout_s: seconds any other service's instance may take to run before the
            service ends (an instance of an unknown node stays ``CLUSTER_SCHEDULED`` for
            ever); default: ``aggregator_start_timeout_s``.
        port_range: ``(first, last)`` ports (inclusive) the aggregators and trained-model
            servers publish on their worker; open them in the workers' firewalls.
    """

    needs_images = True
    serves_models = True
    enforces_resources = True
    aggregator_bind_host = "0.0.0.0"
    log_where = "oakestra"
    log_poll_interval_s = LOG_POLL_INTERVAL_S

    def __init__(
        self,
        client: OakestraClient,
        on_service_exit: ServiceExitCallback,
        *,
        namespace: str = "flops",
        service_mqtt_url: str = "",
        service_mlflow_url: str = "",
        poll_interval_s: float = POLL_INTERVAL_S,
        aggregator_start_timeout_s: float = AGGREGATOR_START_TIMEOUT_S,
        port_range: tuple[int, int] = PORT_RANGE,
        start_timeout_s: float | None = None,
    ) -> None:
        super().__init__(on_service_exit, poll_interval_s)
        self.client = client
        self.namespace = namespace
        self.service_mqtt_url = service_mqtt_url
        self.service_mlflow_url = service_mlflow_url
        self.aggregator_start_timeout_s = aggregator_start_timeout_s
        self.start_timeout_s = (
            aggregator_start_timeout_s if start_timeout_s is None else start_timeout_s
        )
        self._jobs_lock = threading.Lock()
        self._jobs: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}
        self.port_range = port_range
        self._applications: dict[str, str] = {}
        self._inference_ports: dict[str, int] = {}
        self._outputs: OrderedDict[str, str] = OrderedDict()
        """Service id → the last ``logs`` seen (:meth:`_keep_output`), at most
        :data:`KEPT_OUTPUTS`."""

    @staticmethod
    def application_name(project_id: str) -> str:
        """The Oakestra application name of a project (letters and digits, ≤ 30)."""
        return oakestra_name("flops", project_id)

    @staticmethod
    def inference_application_name(project_id: str) -> str:
        """The Oakestra application of a project's trained-model server: apart from the FL
        services' application, so that it outlives the project's end."""
        return oakestra_name("flopsmodel", project_id)

    # -- deploy ------------------------------------------------------------------------
    def deploy(
        self, deployment: Deployment, on_started: ServiceStartedCallback | None = None
    ) -> str:
        """Create the project's application, then its aggregator (waiting until it runs),
        then one learner per node; returns ``<aggregator host_ip>:<port>``. Raises
        :class:`~flops_manager.errors.OakestraError` with Oakestra's reason (a refused
        service, an aggregator that cannot be placed or fails),
        :class:`~flops_manager.errors.ServiceUnavailable` when no port of
        :attr:`port_range` is free, ``ValueError`` for a deployment without images."""
        self._check(deployment)
        project_id = deployment.project_id
        app_name = self.application_name(project_id)
        app_id = self.client.create_application(
            application(app_name, self.namespace, description=f"FLOps project {project_id}")
        )
        logger.info("project %s: Oakestra application %s (%s)", project_id, app_name, app_id)
        with self._lock:
            self._applications[project_id] = app_id
        return super().deploy(deployment, on_started)

    def _check(self, deployment: Deployment) -> None:
        missing = {s.module for s in deployment.services} - set(deployment.images)
        if missing:
            raise ValueError(f"the oakestra orchestrator needs images for {sorted(missing)}")

    def _free_port(self) -> int:
        """The first port of :attr:`port_range` that no tracked service or trained-model
        server publishes. Raises ``ServiceUnavailable`` when all are taken."""
        with self._lock:
            inference = set(self._inference_ports.values())
        low, high = self.port_range
        return first_free_port(range(low, high + 1), self.ports_in_use() | inference)

    def _aggregator_port(self, deployment: Deployment) -> int:
        return self._free_port()

    def _aggregator_address(self, project_id: str, aggregator: Service, port: int) -> str:
        assert isinstance(aggregator, _OakestraService)
        return f"{self._wait_running(aggregator)}:{port}"

    def _start(
        self, project_id: str, spec: ServiceSpec, deployment: Deployment, port: int | None
    ) -> Service:
        """Create ``spec``'s service with one instance (publishing ``port`` as
        ``"port:port"``) in the project's application."""
        with self._lock:
            app_id = self._applications[project_id]
        env = dict(spec.env)
        if self.service_mqtt_url:
            env[env_vars.MQTT_URL] = self.service_mqtt_url
        if self.service_mlflow_url and env_vars.MLFLOW_URL in env:
            env[env_vars.MLFLOW_URL] = self.service_mlflow_url
        placement = spec.placement
        resources = deployment.resources
        service_id = self.client.create_service(
            app_id,
            microservice(
                oakestra_name(spec.name.replace("-", ""), project_id),
                self.namespace,
                deployment.images[spec.module],
                env=env,
                memory_mb=int(resources.get("memory", 100)),
                vcpus=int(resources.get("vcpus", 1)),
                storage_mb=int(resources.get("storage", 0)),
                port=f"{port}:{port}" if port is not None else None,
                cluster=placement.cluster if placement else None,
                node=placement.hostname if placement else None,
                platform=placement.platform if placement else None,
            ),
        )
        self.client.deploy_instance(service_id)
        logger.info(
            "project %s: Oakestra service %s for %s%s", project_id, service_id, spec.name,
            f" on {placement.cluster}/{placement.hostname}" if placement else "",
        )  # fmt: skip
        return _OakestraService(
            spec.name, app_id, service_id, port=port, where=_placement_text(placement)
        )

    def deploy_inference(self, project_id: str, image: str, resources: dict[str, int]) -> str:
        """Run ``image`` as the one service of the application
        :meth:`inference_application_name` (``PORT`` a free port of :attr:`port_range`,
        published as ``"port:port"``, not one-shot) and return ``http://<host_ip>:<port>``
        once its instance runs. Raises :class:`OakestraError` as :meth:`deploy` does, and
        ``ServiceUnavailable`` when no port is free."""
        with self._port_lock:
            with self._lock:
                self._inference_ports.pop(project_id, None)
            port = self._free_port()
            with self._lock:
                self._inference_ports[project_id] = port
        app_id = self.client.create_application(
            application(
                self.inference_application_name(project_id),
                self.namespace,
                description=f"FLOps trained model of project {project_id}",
            )
        )
        service_id = self.client.create_service(
            app_id,
            microservice(
                oakestra_name("model", project_id),
                self.namespace,
                image,
                env={"PORT": str(port)},
                memory_mb=int(resources.get("memory", 100)),
                vcpus=int(resources.get("vcpus", 1)),
                storage_mb=int(resources.get("storage", 0)),
                port=f"{port}:{port}",
                one_shot=False,
            ),
        )
        self.client.deploy_instance(service_id)
        server = _OakestraService("trained-model server", app_id, service_id, port=port)
        host = self._wait_running(server)
        logger.info("project %s: trained-model server on %s:%d", project_id, host, port)
        return f"http://{host}:{port}"

    def stop_inference(self, project_id: str) -> bool:
        """Delete the application of the project's trained-model server, if there is one."""
        with self._lock:
            self._inference_ports.pop(project_id, None)
        name = self.inference_application_name(project_id)
        found = self.client.find_application(name, self.namespace)
        if found is None:
            return False
        self.client.delete_application(str(found.get("applicationID")))
        logger.info("project %s: deleted the trained-model server", project_id)
        return True

    def _wait_running(self, service: _OakestraService) -> str:
        """The ``host_ip`` of ``service``'s instance once it runs. Raises
        :class:`OakestraError` when it ends or cannot be placed first (then its end is not
        reported again), or after :attr:`aggregator_start_timeout_s`."""
        deadline = time.monotonic() + self.aggregator_start_timeout_s
        status = "REQUESTED"
        while time.monotonic() < deadline:
            job = self.client.get_service(service.service_id)
            self._keep_output(service.service_id, job)
            outcome = instance_outcome(job)
            if outcome is not None:
                self._mark_ended(service)  # the deployment's error reports it
                self._remove(service)  # else Oakestra restarts it
                ended = exit_of(*outcome, where=service.where)
                raise OakestraError(f"The {service.name} could not start on Oakestra: "
                                    f"{ended.last_line}.")  # fmt: skip
            for instance in job.get("instance_list") or []:
                status = str(instance.get("status") or status)
                host = instance.get("host_ip") or instance.get("publicip")
                if instance.get("status") == "RUNNING" and host:
                    service.has_run = True
                    return str(host)
            time.sleep(min(self.poll_interval_s, 0.5))
        self._mark_ended(service)
        self._remove(service)
        raise OakestraError(
            f"The {service.name} did not start on Oakestra within "
            f"{self.aggregator_start_timeout_s:.0f} s: {_pending_text(service, status)}."
        )

    # -- poll, remove, re-attach --------------------------------------------------------
    def _poll(self, service: Service) -> ServiceExit | None:
        """How ``service`` ended (see the module docstring), from the project's services
        read at most once per half interval; a service that ended is deleted at once.
        Raises ``OakestraError`` when Oakestra does not answer (the watcher retries)."""
        assert isinstance(service, _OakestraService)
        if service.outcome is not None:
            return service.outcome
        job = self._project_jobs(service.application_id, service.deployed_s).get(service.service_id)
        if job is None:  # confirm before reporting it gone
            try:
                job = self.client.get_service(service.service_id)
                self._keep_output(service.service_id, job)
            except OakestraNotFound:
                job = None
        ended = self._ended(service, job)
        if ended is not None:
            service.outcome = ended
            self._remove(service)
            logger.info(
                "%s (Oakestra service %s) ended and was deleted: %s",
                service.name, service.service_id, ended.last_line,
            )  # fmt: skip
        return ended

    def _ended(self, service: _OakestraService, job: dict[str, Any] | None) -> ServiceExit | None:
        """How ``service`` (Oakestra's ``job``, ``None``: gone) ended, or ``None``."""
        if job is None:
            return ServiceExit(
                UNKNOWN_CRASH_RC, _exit_line("UNDEPLOYED", "the service was deleted")
            )
        outcome = instance_outcome(job)
        if outcome is not None:
            return exit_of(*outcome, where=service.where)
        statuses = [str(i.get("status") or "") for i in job.get("instance_list") or []]
        if "RUNNING" in statuses:
            service.has_run = True
        elif not service.has_run and time.monotonic() - service.deployed_s > self.start_timeout_s:
            status = statuses[0] if statuses else str(job.get("status") or "REQUESTED")
            return ServiceExit(
                UNKNOWN_CRASH_RC,
                f"Oakestra did not start it within {self.start_timeout_s:.0f} s: "
                f"{_pending_text(service, status)}",
            )
        return None

    def _project_jobs(self, application_id: str, since_s: float) -> dict[str, dict[str, Any]]:
        """Service id → job of every service of the application, read with one request and
        kept for half a poll interval (``{}`` once the application is gone); read again when
        the copy is older than ``since_s`` (``time.monotonic()``)."""
        now = time.monotonic()
        with self._jobs_lock:
            cached = self._jobs.get(application_id)
            if (
                cached is not None
                and cached[0] >= since_s
                and now - cached[0] < self.poll_interval_s / 2
            ):
                return cached[1]
        try:
            jobs = {str(j["_id"]): j for j in self.client.list_services(application_id)}
        except OakestraNotFound:
            jobs = {}
        for service_id, job in jobs.items():
            self._keep_output(service_id, job)
        with self._jobs_lock:
            self._jobs[application_id] = (time.monotonic(), jobs)
        return jobs

    def _remove(self, service: Service) -> None:
        assert isinstance(service, _OakestraService)
        try:
            self.client.delete_service(service.service_id)
        except OakestraError as exc:
            logger.warning("deleting Oakestra service %s: %s", service.service_id, exc)

    def _remove_services(self, project_id: str, services: list[Service]) -> None:
        """Delete the project's application (its services and instances with it), found by
        name too, so that nothing is left behind even without handles."""
        with self._lock:
            app_ids = {s.application_id for s in services if isinstance(s, _OakestraService)}
            known = self._applications.pop(project_id, None)
        with self._jobs_lock:
            for app_id in app_ids | ({known} if known else set()):
                self._jobs.pop(app_id, None)
        if known is not None:
            app_ids.add(known)
        try:
            found = self.client.find_application(self.application_name(project_id), self.namespace)
        except OakestraError as exc:
            logger.warning("project %s: cannot list Oakestra applications: %s", project_id, exc)
            found = None
        if found is not None:
            app_ids.add(str(found.get("applicationID")))
        for app_id in app_ids:
            try:
                self.client.delete_application(app_id)
                logger.info("project %s: deleted Oakestra application %s", project_id, app_id)
            except OakestraError as exc:
                logger.warning("project %s: deleting application %s: %s", project_id, app_id, exc)

    def _reattach_one(
        self, project_id: str, handle: ServiceHandle
    ) -> tuple[Service | None, ServiceState]:
        """A service that is gone, or whose instance ended, is not running; its state
        carries Oakestra's status."""
        name = str(handle.get("name", "?"))
        port = handle.get("port")
        service = _OakestraService(
            name,
            str(handle.get("application_id")),
            str(handle.get("service_id")),
            port=int(port) if port is not None else None,
        )
        try:
            job = self.client.get_service(service.service_id)
        except OakestraNotFound:
            return None, ServiceState(name, False, "the Oakestra service is gone")
        self._keep_output(service.service_id, job)
        outcome = instance_outcome(job)
        if outcome is not None:
            self._remove(service)  # else Oakestra restarts a FAILED or DEAD instance
            return None, ServiceState(name, False, exit_of(*outcome).last_line)
        service.has_run = any(i.get("status") == "RUNNING" for i in job.get("instance_list") or [])
        return service, ServiceState(name, True, "")

    # -- the services' output ---------------------------------------------------------
    def service_log(self, project_id: str, source: LogSource) -> ServiceLog:
        """The ``logs`` of ``source``'s instance, read from the root at each read; once
        Oakestra deleted the service, the last ``logs`` this backend saw (none after a
        manager restart). Reads raise :class:`OakestraError` when the root does not answer."""
        service_id = str(source.handle.get("service_id") or "")

        def read() -> str | None:
            if service_id:
                try:
                    job = self.client.get_service(service_id)
                except OakestraNotFound:
                    pass
                else:
                    self._keep_output(service_id, job)
            with self._lock:
                return self._outputs.get(service_id)

        return OakestraLog(read)

    def log_sources(self, project_id: str, handles: Sequence[ServiceHandle]) -> list[LogSource]:
        """One per handle that names its Oakestra service."""
        return [s for s in super().log_sources(project_id, handles) if s.handle.get("service_id")]

    def _keep_output(self, service_id: str, job: dict[str, Any]) -> None:
        """Remember the ``logs`` of ``job`` (the root's view of service ``service_id``)."""
        logs = instance_logs(job)
        if logs is None:
            return
        with self._lock:
            self._outputs[service_id] = logs
            self._outputs.move_to_end(service_id)
            while len(self._outputs) > KEPT_OUTPUTS:
                self._outputs.popitem(last=False)

    def close(self, stop_services: bool = True) -> None:
        """Stop the watcher and, with ``stop_services``, delete every project's application;
        then close the client."""
        super().close(stop_services)
        self.client.close()


def from_config(config: Any, workdir: Path, on_service_exit: ServiceExitCallback) -> Orchestrator:
    """The orchestrator of ``config`` (:class:`~flops_manager.config.ManagerConfig`):
    ``oakestra_url``, ``oakestra_user``, ``oakestra_password``, ``oakestra_namespace``,
    ``oakestra_mqtt_url``, ``oakestra_mlflow_url`` and, when the configuration has them,
    ``oakestra_organization`` (default ``root``) and ``oakestra_port_range``
    (``FIRST-LAST``, default :data:`PORT_RANGE`). Raises ``ConfigurationError`` without a URL
    or with a malformed port range."""
    from flops_manager.errors import ConfigurationError

    if not config.oakestra_url:
        raise ConfigurationError(
            "FLOPS_ORCHESTRATOR=oakestra needs FLOPS_OAKESTRA_URL, the root orchestrator's "
            "system manager (e.g. http://oakestra-root:10000)."
        )
    port_range = PORT_RANGE
    if getattr(config, "oakestra_port_range", ""):
        try:
            port_range = parse_port_range(str(config.oakestra_port_range))
        except ValueError as exc:
            raise ConfigurationError(f"FLOPS_OAKESTRA_PORT_RANGE: {exc}.") from None
    client = OakestraClient(
        config.oakestra_url,
        config.oakestra_user,
        config.oakestra_password,
        organization=str(getattr(config, "oakestra_organization", "") or "root"),
    )
    return OakestraOrchestrator(
        client,
        on_service_exit,
        namespace=config.oakestra_namespace,
        service_mqtt_url=config.oakestra_mqtt_url,
        service_mlflow_url=config.oakestra_mlflow_url,
        port_range=port_range,
    )
