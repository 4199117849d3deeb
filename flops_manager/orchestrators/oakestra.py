"""The ``oakestra`` orchestrator: a project's FL services as the services of one Oakestra
application, run from the ``oci`` builder's images on Oakestra's worker nodes.

A project becomes the application ``oakestra_name("flops", project_id)`` in the namespace
:attr:`OakestraOrchestrator.namespace`; each FL service becomes one of its microservices with
one instance:

- the aggregator first, anywhere Oakestra places it, publishing its Flower port as
  ``"PORT:PORT"`` and binding ``0.0.0.0:PORT``; once it runs, the learners get its instance's
  ``host_ip`` and that port as ``FLOPS_AGGREGATOR_ADDRESS``;
- one learner per eligible node, pinned to it with a ``direct`` constraint (the node's
  registered cluster and hostname, the only placement Oakestra honours) and given the node's
  ``platform``;
- images by digest (``code``), the SLA's ``resource_constraints`` as ``memory``/``vcpus``/
  ``storage``, ``one_shot`` (an FL service ends by itself), and the MQTT and MLflow addresses
  the workers reach (``service_mqtt_url``/``service_mlflow_url``, default: the manager's).

A watcher thread polls every service (``GET /api/service/{id}``) every ``poll_interval_s`` and
reports an instance that reached a terminal status (:data:`TERMINAL_STATUSES`) through
``on_service_exit``: ``COMPLETED``/``DEAD`` as exit code 0, ``FAILED`` and scheduling failures
as 1, with Oakestra's status (and ``status_detail``) as the last line. :meth:`stop` deletes the
application, which deletes its services and undeploys their instances; it finds the
application by name, so nothing is left behind even without handles. Handles hold the
application and service ids, so a restarted manager re-attaches by polling them again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flops_manager.errors import OakestraError, OakestraNotFound
from flops_manager.orchestrators.base import (
    Deployment,
    Orchestrator,
    ServiceExitCallback,
    ServiceHandle,
    ServiceSpec,
    ServiceStartedCallback,
    ServiceState,
)
from flops_manager.orchestrators.oakestra_client import (
    SCHEDULING_FAILURES,
    TERMINAL_STATUSES,
    OakestraClient,
    application,
    microservice,
    oakestra_name,
)
from flops_utils import env_vars
from flops_utils.logging import logger

POLL_INTERVAL_S = 1.0
"""Seconds between two status polls of a project's services."""

AGGREGATOR_START_TIMEOUT_S = 300.0
"""Seconds the aggregator's instance may take to reach ``RUNNING`` (pulling its image
included) before the deployment fails."""

EXITED_OK = frozenset({"COMPLETED", "DEAD"})
"""Terminal instance statuses of a service that exited 0 (one-shot or not)."""


@dataclass
class _Service:
    """A watched Oakestra service of a project."""

    name: str
    application_id: str
    service_id: str
    reported: bool = False

    def handle(self) -> ServiceHandle:
        return {
            "name": self.name,
            "application_id": self.application_id,
            "service_id": self.service_id,
        }


def instance_outcome(job: dict[str, Any]) -> tuple[str, str] | None:
    """``(status, detail)`` when the service's instance ended (or could not be placed), else
    ``None`` while it is pending or running. ``job`` is :meth:`OakestraClient.get_service`'s
    answer; a service-level scheduling failure (e.g. ``TargetClusterNotFound``) counts too.
    """
    status = str(job.get("status") or "")
    detail = str(job.get("status_detail") or "")
    if status in SCHEDULING_FAILURES:
        return status, detail
    for instance in job.get("instance_list") or []:
        instance_status = str(instance.get("status") or "")
        if instance_status in TERMINAL_STATUSES:
            return instance_status, str(instance.get("status_detail") or detail)
    return None


def _exit_line(status: str, detail: str) -> str:
    return f"Oakestra reports the instance {status}" + (f": {detail}" if detail else "")


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
    """

    needs_images = True
    serves_models = True

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
    ) -> None:
        super().__init__(on_service_exit)
        self.client = client
        self.namespace = namespace
        self.service_mqtt_url = service_mqtt_url
        self.service_mlflow_url = service_mlflow_url
        self.poll_interval_s = poll_interval_s
        self.aggregator_start_timeout_s = aggregator_start_timeout_s
        self._projects: dict[str, list[_Service]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="oakestra-watch", daemon=True)
        self._watcher.start()

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
    ) -> None:
        """Create the project's application, then its aggregator (waiting until it runs),
        then one learner per node. Raises :class:`~flops_manager.errors.OakestraError` with
        Oakestra's reason (a refused service, an aggregator that cannot be placed or fails),
        ``ValueError`` for a deployment without images."""
        missing = {s.module for s in deployment.services} - set(deployment.images)
        if missing:
            raise ValueError(f"the oakestra orchestrator needs images for {sorted(missing)}")
        project_id = deployment.project_id
        app_name = self.application_name(project_id)
        app_id = self.client.create_application(
            application(app_name, self.namespace, description=f"FLOps project {project_id}")
        )
        logger.info("project %s: Oakestra application %s (%s)", project_id, app_name, app_id)
        aggregator, *learners = deployment.services
        port = aggregator.env[env_vars.AGGREGATOR_ADDRESS].rpartition(":")[2]
        started = self._start(deployment, app_id, aggregator, {
            env_vars.AGGREGATOR_ADDRESS: f"0.0.0.0:{port}",
        }, port=f"{port}:{port}", on_started=on_started)  # fmt: skip
        host = self._wait_running(project_id, started)
        for spec in learners:
            self._start(
                deployment,
                app_id,
                spec,
                {env_vars.AGGREGATOR_ADDRESS: f"{host}:{port}"},
                on_started=on_started,
            )

    def _start(
        self,
        deployment: Deployment,
        app_id: str,
        spec: ServiceSpec,
        overrides: dict[str, str],
        *,
        port: str | None = None,
        on_started: ServiceStartedCallback | None,
    ) -> _Service:
        """Create ``spec``'s service with one instance and start watching it."""
        env = {**spec.env, **overrides}
        if self.service_mqtt_url:
            env[env_vars.MQTT_URL] = self.service_mqtt_url
        if self.service_mlflow_url and env_vars.MLFLOW_URL in env:
            env[env_vars.MLFLOW_URL] = self.service_mlflow_url
        placement = spec.placement
        resources = deployment.resources
        service_id = self.client.create_service(
            app_id,
            microservice(
                oakestra_name(spec.name.replace("-", ""), deployment.project_id),
                self.namespace,
                deployment.images[spec.module],
                env=env,
                memory_mb=int(resources.get("memory", 100)),
                vcpus=int(resources.get("vcpus", 1)),
                storage_mb=int(resources.get("storage", 0)),
                port=port,
                cluster=placement.cluster if placement else None,
                node=placement.hostname if placement else None,
                platform=placement.platform if placement else None,
            ),
        )
        self.client.deploy_instance(service_id)
        service = _Service(spec.name, app_id, service_id)
        with self._lock:
            self._projects.setdefault(deployment.project_id, []).append(service)
        logger.info(
            "project %s: Oakestra service %s for %s%s", deployment.project_id, service_id,
            spec.name, f" on {placement.cluster}/{placement.hostname}" if placement else "",
        )  # fmt: skip
        if on_started is not None:
            on_started(service.handle())
        return service

    def deploy_inference(
        self, project_id: str, image: str, port: int, resources: dict[str, int]
    ) -> str:
        """Run ``image`` as the one service of the application
        :meth:`inference_application_name` (``PORT`` set to ``port``, published as
        ``"port:port"``, not one-shot) and return ``http://<host_ip>:<port>`` once its
        instance runs. Raises :class:`OakestraError` as :meth:`deploy` does."""
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
        host = self._wait_running(project_id, _Service("trained-model server", app_id, service_id))
        logger.info("project %s: trained-model server on %s:%d", project_id, host, port)
        return f"http://{host}:{port}"

    def stop_inference(self, project_id: str) -> bool:
        """Delete the application of the project's trained-model server, if there is one."""
        name = self.inference_application_name(project_id)
        found = self.client.find_application(name, self.namespace)
        if found is None:
            return False
        self.client.delete_application(str(found.get("applicationID")))
        logger.info("project %s: deleted the trained-model server", project_id)
        return True

    def _wait_running(self, project_id: str, service: _Service) -> str:
        """The ``host_ip`` of ``service``'s instance once it runs. Raises
        :class:`OakestraError` when it ends or cannot be placed first, or after
        :attr:`aggregator_start_timeout_s`."""
        deadline = time.monotonic() + self.aggregator_start_timeout_s
        while time.monotonic() < deadline:
            job = self.client.get_service(service.service_id)
            outcome = instance_outcome(job)
            if outcome is not None:
                service.reported = True  # the deployment's error reports it
                raise OakestraError(
                    f"The {service.name} could not start on Oakestra: {_exit_line(*outcome)}."
                )
            for instance in job.get("instance_list") or []:
                host = instance.get("host_ip") or instance.get("publicip")
                if instance.get("status") == "RUNNING" and host:
                    return str(host)
            time.sleep(min(self.poll_interval_s, 0.5))
        raise OakestraError(
            f"The {service.name} did not start on Oakestra within "
            f"{self.aggregator_start_timeout_s:.0f} s; check the worker nodes and the registry."
        )

    # -- watch, stop, re-attach --------------------------------------------------------
    def reattach(self, project_id: str, handles: Sequence[ServiceHandle]) -> list[ServiceState]:
        """Watch again the services of ``handles``; one whose service is gone or whose
        instance ended is reported as not running with Oakestra's status."""
        states = []
        for handle in handles:
            name = str(handle.get("name", "?"))
            app_id, service_id = str(handle.get("application_id")), str(handle.get("service_id"))
            service = _Service(name, app_id, service_id)
            try:
                outcome = instance_outcome(self.client.get_service(service.service_id))
            except OakestraNotFound:
                states.append(ServiceState(name, False, "the Oakestra service is gone"))
                continue
            if outcome is not None:
                states.append(ServiceState(name, False, _exit_line(*outcome)))
                continue
            with self._lock:
                known = {s.name for s in self._projects.get(project_id, [])}
                if name not in known:
                    self._projects.setdefault(project_id, []).append(service)
            states.append(ServiceState(name, True, ""))
        return states

    def stop(self, project_id: str) -> None:
        """Delete the project's application (its services and instances with it), found by
        name; a no-op when Oakestra has none."""
        with self._lock:
            services = self._projects.pop(project_id, [])
        app_ids = {s.application_id for s in services}
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

    def running_services(self, project_id: str) -> list[str]:
        """Names of the project's services whose instance has not ended."""
        with self._lock:
            services = list(self._projects.get(project_id, []))
        running = []
        for service in services:
            try:
                if instance_outcome(self.client.get_service(service.service_id)) is None:
                    running.append(service.name)
            except OakestraError:
                continue
        return running

    def close(self, stop_services: bool = True) -> None:
        """Stop the watcher and, with ``stop_services``, delete every project's application."""
        self._closed.set()
        if stop_services:
            with self._lock:
                project_ids = list(self._projects)
            for project_id in project_ids:
                self.stop(project_id)
        self._watcher.join(timeout=10)
        self.client.close()

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_interval_s):
            with self._lock:
                items = [(p, s) for p, ss in self._projects.items() for s in ss if not s.reported]
            for project_id, service in items:
                try:
                    outcome = instance_outcome(self.client.get_service(service.service_id))
                except OakestraNotFound:
                    outcome = ("UNDEPLOYED", "the service was deleted")
                except OakestraError as exc:
                    logger.warning("polling Oakestra service %s: %s", service.service_id, exc)
                    continue
                if outcome is None or service.reported:
                    continue
                service.reported = True
                code = 0 if outcome[0] in EXITED_OK else 1
                try:
                    self.on_service_exit(project_id, service.name, code, _exit_line(*outcome))
                except Exception:
                    logger.exception("service exit handler failed")


def from_config(config: Any, workdir: Path, on_service_exit: ServiceExitCallback) -> Orchestrator:
    """The orchestrator of ``config`` (:class:`~flops_manager.config.ManagerConfig`):
    ``oakestra_url``, ``oakestra_user``, ``oakestra_password``, ``oakestra_namespace``,
    ``oakestra_mqtt_url``, ``oakestra_mlflow_url``. Raises ``ConfigurationError`` without a
    URL."""
    from flops_manager.errors import ConfigurationError

    if not config.oakestra_url:
        raise ConfigurationError(
            "FLOPS_ORCHESTRATOR=oakestra needs FLOPS_OAKESTRA_URL, the root orchestrator's "
            "system manager (e.g. http://oakestra-root:10000)."
        )
    client = OakestraClient(config.oakestra_url, config.oakestra_user, config.oakestra_password)
    return OakestraOrchestrator(
        client,
        on_service_exit,
        namespace=config.oakestra_namespace,
        service_mqtt_url=config.oakestra_mqtt_url,
        service_mlflow_url=config.oakestra_mlflow_url,
    )
