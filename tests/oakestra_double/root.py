"""The root orchestrator's state: users, applications, services (jobs) and their instances.

Mirrors the system manager's services layer (``application_management``,
``service_management``, ``instance_management`` of oakestra/oakestra): what it stores, what it
validates, and the order in which an instance's status changes. Root-side steps (``REQUESTED``,
``CLUSTER_SCHEDULED``) are visible at once; what the cluster and the worker report
(``NODE_SCHEDULED``, ``RUNNING``, ``COMPLETED``, ``FAILED``, ``DEAD``, ``NO_WORKER_CAPACITY``)
reaches the root ``report_delay_s`` seconds later, as the real cluster manager's push does
(every 15 s there).

Scheduling as the real root and cluster schedulers answer:

- a ``direct`` constraint naming a cluster that is not active: job status
  ``TargetClusterNotActive``, no instance;
- a service asking more ``vcpus``/``memory`` than any (or the named) cluster has: job status
  ``NoActiveClusterWithCapacity``;
- a ``direct`` constraint naming a node the cluster does not have: the instance stays
  ``CLUSTER_SCHEDULED`` for ever (nothing reports on it);
- a node without the capacity: instance ``NO_WORKER_CAPACITY``.

The job-level ``status_detail`` stays ``Waiting for scheduling decision`` for ever (only the
instances' own ``status_detail`` and ``logs`` say what happened). The cluster manager
restarts ``FAILED``, ``DEAD`` and ``NO_WORKER_CAPACITY`` instances ``restart_delay_s`` after
they ended (its check runs about every 15 s), until the instance is undeployed.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .worker import InstanceRunner, ProcessImages, WorkerSpec, platform_arch

NAME = re.compile(r"^[a-zA-Z0-9]{1,30}$")
"""Application, namespace and microservice names (``sla/schema.py``)."""

SLA_INVALID = "The given SLA was not formatted correctly"
SERVICE_IP_NET = ipaddress.ip_network("10.30.0.0/16")
"""Where Oakestra's network manager hands out service (round-robin) IPs."""

INT_FIELDS = ("memory", "vcpus", "vgpus", "vtpus", "bandwidth_in", "bandwidth_out", "storage")
STR_FIELDS = ("code", "state", "port", "virtualization", "sla_violation_strategy", "target_node")
STR_LIST_FIELDS = ("cmd", "environment", "added_files", "args")


class SlaInvalid(Exception):
    """The SLA breaks the v2.0 schema; the message says where (logged, never returned)."""


def new_id() -> str:
    """A 24-hex id, shaped like MongoDB's ObjectId."""
    return secrets.token_hex(12)


def oid(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as ``bson.json_util.dumps`` writes it: ``_id`` becomes ``{"$oid": ...}``."""
    return {**record, "_id": {"$oid": record["_id"]}}


WAITING = "Waiting for scheduling decision"
"""The job-level ``status_detail`` the real root sets at deployment and never updates."""

RESTARTED = frozenset({"FAILED", "DEAD", "NO_WORKER_CAPACITY"})
"""Instance statuses the cluster manager restarts."""


@dataclass
class Cluster:
    """A cluster and its workers (hostname → spec)."""

    id: str
    name: str
    workers: dict[str, WorkerSpec] = field(default_factory=dict)


@dataclass
class PendingReport:
    due: float
    service_id: str
    instance_number: int
    fields: dict[str, Any]


class Root:
    """The system manager's state, guarded by one lock.

    ``users``: username → password (each an ``Admin``). ``workers``: the worker nodes, each
    with ``worker_vcpus`` and ``worker_memory_mb``. ``organizations``: the organizations one
    logs in to (``root`` is Oakestra's default). ``workdir``: instance logs. Delays in
    seconds: ``report_delay_s`` the cluster's push, ``restart_delay_s`` the cluster manager's
    restart of an ended instance. ``process_images``: run instances with the worker's
    ``process`` runtime (see :mod:`.worker`) instead of buildah.
    """

    def __init__(
        self,
        users: dict[str, str],
        workers: list[WorkerSpec],
        workdir: Path,
        *,
        report_delay_s: float = 0.5,
        schedule_delay_s: float = 0.1,
        restart_delay_s: float = 15.0,
        worker_vcpus: int = 8,
        worker_memory_mb: int = 16384,
        organizations: tuple[str, ...] = ("root",),
        process_images: ProcessImages | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.process_images = process_images
        self.passwords = dict(users)
        self.user_ids = {name: new_id() for name in users}
        self.organizations = {name: new_id() for name in organizations}
        self.workdir = workdir
        self.report_delay_s = report_delay_s
        self.schedule_delay_s = schedule_delay_s
        self.restart_delay_s = restart_delay_s
        self.worker_vcpus = worker_vcpus
        self.worker_memory_mb = worker_memory_mb
        self._generations: dict[tuple[str, int], int] = {}
        self._closed = False
        self.clusters: dict[str, Cluster] = {}
        for worker in workers:
            cluster = self.clusters.setdefault(
                worker.cluster, Cluster(id=new_id(), name=worker.cluster)
            )
            cluster.workers[worker.hostname] = worker
        self.apps: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.worker_ids = {(w.cluster, w.hostname): new_id() for w in workers}
        self.runners: dict[tuple[str, int], InstanceRunner] = {}
        self._stopping: list[InstanceRunner] = []
        self._reports: list[PendingReport] = []
        self._rr_ips: dict[str, str] = {}
        self.refusals: list[str] = []

    # ---- users -------------------------------------------------------------------------

    def user(self, username: str) -> dict[str, Any]:
        """The user record (``_id``, ``name``, ``email``, ``created_at``)."""
        return {
            "_id": self.user_ids[username],
            "name": username,
            "email": f"{username}@oakestra.local",
            "created_at": "01/01/2024, 00:00:00",
        }

    # ---- applications ------------------------------------------------------------------

    def register_app(self, sla: dict[str, Any], username: str) -> tuple[Any, int]:
        """``register_app``: 409 duplicate name+namespace, 422 bad names, else 200 with all of
        the user's applications. Microservices in the SLA are created too."""
        if sla.get("sla_version") != "v2.0":
            return {"message": SLA_INVALID}, 400
        with self.lock:
            for application in sla.get("applications") or []:
                name = application.get("application_name")
                namespace = application.get("application_namespace")
                if any(
                    app["application_name"] == name
                    and app["application_namespace"] == namespace
                    and app["userId"] == username
                    for app in self.apps.values()
                ):
                    return {
                        "message": "An application with the same name and namespace exists already"
                    }, 409
                if not (isinstance(name, str) and NAME.match(name)) or not (
                    isinstance(namespace, str) and NAME.match(namespace)
                ):
                    return {
                        "message": "Application name or namespace are not in the valid format"
                    }, 422
                app_id = new_id()
                self.apps[app_id] = {
                    "_id": app_id,
                    "applicationID": app_id,
                    "application_name": name,
                    "application_namespace": namespace,
                    "application_desc": application.get("application_desc", ""),
                    "userId": username,
                    "microservices": [],
                }
                microservices = application.get("microservices") or []
                if microservices:
                    result, status = self.create_services(
                        {
                            "sla_version": sla["sla_version"],
                            "customerID": username,
                            "applications": [{**application, "applicationID": app_id}],
                        },
                        username,
                    )
                    if status != 200:
                        self.delete_app(app_id, username)
                        return result, status
            return self.user_apps(username), 200

    def user_apps(self, username: str) -> list[dict[str, Any]]:
        """The user's applications, ``_id`` as ``{"$oid"}``."""
        with self.lock:
            return [oid(app) for app in self.apps.values() if app["userId"] == username]

    def get_app(self, app_id: str, username: str) -> dict[str, Any] | None:
        with self.lock:
            app = self.apps.get(app_id)
            return app if app is not None and app["userId"] == username else None

    def delete_app(self, app_id: str, username: str) -> bool:
        """``delete_app``: deletes the app's services (undeploying their instances) too."""
        with self.lock:
            app = self.get_app(app_id, username)
            if app is None:
                return False
            for service_id in list(app["microservices"]):
                self.delete_service(service_id, username)
            del self.apps[app_id]
            return True

    # ---- services ----------------------------------------------------------------------

    def create_services(self, sla: dict[str, Any], username: str) -> tuple[Any, int]:
        """``create_services_of_app``: validate (422), find the app (404), insert one job
        per microservice; a service the network manager refuses lands in ``failed_services``."""
        try:
            validate_sla(sla)
        except SlaInvalid as exc:
            return {"message": str(exc)}, 422
        application = sla["applications"][0]
        with self.lock:
            app = self.get_app(str(application["applicationID"]), username)
            if app is None:
                return {"message": "application not found"}, 404
            deployed: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            last_id = ""
            for microservice in application["microservices"]:
                job = dict(microservice)
                job_id = new_id()
                job.update(
                    {
                        "_id": job_id,
                        "microserviceID": job_id,
                        "applicationID": app["applicationID"],
                        "app_name": app["application_name"],
                        "app_ns": app["application_namespace"],
                        "service_name": job["microservice_name"],
                        "service_ns": job["microservice_namespace"],
                        "image": job["code"],
                        "next_instance_progressive_number": 0,
                        "instance_list": [],
                        "job_name": ".".join(
                            (
                                app["application_name"],
                                app["application_namespace"],
                                job["microservice_name"],
                                job["microservice_namespace"],
                            )
                        ),
                    }
                )
                if job.get("virtualization") == "container":
                    job["virtualization"] = "docker"
                addresses = job.get("addresses") or {}
                job["RR_ip"] = addresses.get("rr_ip")
                last_id = job_id
                refusal = self._net_refusal(job.get("RR_ip"), job_id)
                if refusal:
                    failed.append(
                        {
                            "service_name": job["service_name"],
                            "message": f"failed to deploy service: {refusal}",
                            "status": 500,
                        }
                    )
                    continue
                self.jobs[job_id] = job
                app["microservices"].append(job_id)
                deployed.append({"service_name": job["service_name"], "status": 200})
            return {
                "job_id": last_id,
                "deployed_services": deployed,
                "failed_services": failed,
            }, 200

    def _net_refusal(self, rr_ip: str | None, job_id: str) -> str:
        """Why the network manager refuses the service's round-robin IP ('' if it takes it);
        a reason queued by :meth:`refuse_services` (a test hook) comes first."""
        if self.refusals:
            return self.refusals.pop(0)
        if not rr_ip:
            return ""
        try:
            address = ipaddress.ip_address(rr_ip)
        except ValueError:
            return f"invalid service IP {rr_ip!r}"
        if address not in SERVICE_IP_NET:
            return f"service IP {rr_ip} is outside the service network {SERVICE_IP_NET}"
        if rr_ip in self._rr_ips.values():
            return f"service IP {rr_ip} is already assigned"
        self._rr_ips[job_id] = rr_ip
        return ""

    def refuse_services(self, count: int, reason: str) -> None:
        """Test hook: the network manager refuses the next ``count`` services with
        ``reason`` (they land in ``failed_services``)."""
        with self.lock:
            self.refusals.extend([reason] * count)

    def app_services(self, app_id: str, username: str) -> list[dict[str, Any]] | None:
        """Every job of the application (``GET /api/services/<app id>``), ``None`` for an
        application the user does not have."""
        with self.lock:
            self._apply_due_reports()
            app = self.get_app(app_id, username)
            if app is None:
                return None
            return [oid(self.jobs[j]) for j in app["microservices"] if j in self.jobs]

    def get_service(self, service_id: str, username: str) -> dict[str, Any] | None:
        """The job as the root knows it (cluster reports due by now applied)."""
        with self.lock:
            self._apply_due_reports()
            job = self.jobs.get(service_id)
            if job is None or self.get_app(job["applicationID"], username) is None:
                return None
            return oid(job)

    def delete_service(self, service_id: str, username: str) -> bool:
        """``delete_service``: undeploy every instance, detach from the app, drop the job."""
        with self.lock:
            job = self.jobs.get(service_id)
            if job is None:
                return False
            app = self.get_app(job["applicationID"], username)
            if app is None or service_id not in app["microservices"]:
                return False
            self.undeploy(service_id, username, -1)
            app["microservices"].remove(service_id)
            del self.jobs[service_id]
            self._rr_ips.pop(service_id, None)
            return True

    # ---- instances ---------------------------------------------------------------------

    def deploy(self, service_id: str, username: str) -> None:
        """``request_scale_up_instance``: status REQUESTED, then schedule in the background.
        Unknown services are ignored (the real one logs and answers 200)."""
        with self.lock:
            job = self.jobs.get(service_id)
            if job is None or self.get_app(job["applicationID"], username) is None:
                return
            job["status"] = "REQUESTED"
            job["status_detail"] = WAITING
        threading.Thread(target=self._schedule, args=(service_id,), daemon=True).start()

    def _schedule(self, service_id: str) -> None:
        """The root scheduler picks a cluster (only ``direct`` constraints are honoured; with
        none, the first cluster with a worker of the service's platform and the capacity),
        then the cluster scheduler the node (see the module docstring)."""
        time.sleep(self.schedule_delay_s)
        with self.lock:
            job = self.jobs.get(service_id)
            if job is None:
                return
            direct = next(
                (c for c in job.get("constraints") or [] if c.get("type") == "direct"), None
            )
            cluster = self._pick_cluster(job, direct)
            if cluster is None:
                return
            number = job["next_instance_progressive_number"]
            job["next_instance_progressive_number"] = number + 1
            job["instance_list"].append(
                {
                    "instance_number": number,
                    "cluster_id": cluster.id,
                    "cluster_location": "location-unknown",
                    "status": "CLUSTER_SCHEDULED",
                }
            )
            job["status"] = "CLUSTER_SCHEDULED"
            if direct is not None:
                worker = cluster.workers.get(str(direct.get("node")))
            else:
                wanted = platform_arch(str(job.get("platform") or ""))
                worker = next(
                    (w for w in cluster.workers.values() if not wanted or w.arch == wanted), None
                )
            if worker is None:
                return  # the cluster never finds the node: CLUSTER_SCHEDULED for ever
            self._place(service_id, number, worker)

    def _pick_cluster(self, job: dict[str, Any], direct: dict[str, Any] | None) -> Cluster | None:
        """The root scheduler's cluster, or ``None`` with the job's status set to the
        negative scheduling status."""
        vcpus, memory = int(job.get("vcpus") or 0), int(job.get("memory") or 0)

        def fits(cluster: Cluster) -> bool:
            count = len(cluster.workers)
            return vcpus <= count * self.worker_vcpus and memory <= count * self.worker_memory_mb

        if direct is not None:
            candidates = [c for c in self.clusters.values() if c.name == direct.get("cluster")]
            if not candidates:
                job["status"] = "TargetClusterNotActive"
                return None
        else:
            wanted = platform_arch(str(job.get("platform") or ""))
            candidates = [
                c
                for c in self.clusters.values()
                if any(not wanted or w.arch == wanted for w in c.workers.values())
            ]
        chosen = next((c for c in candidates if fits(c)), None)
        if chosen is None:
            job["status"] = "NoActiveClusterWithCapacity"
        return chosen

    def _place(self, service_id: str, number: int, worker: WorkerSpec) -> None:
        """The cluster's placement of instance ``number`` on ``worker`` (again, when the
        cluster manager restarts it); caller holds the lock."""
        job = self.jobs[service_id]
        key = (service_id, number)
        generation = self._generations.get(key, 0) + 1
        self._generations[key] = generation
        worker_id = self.worker_ids[(worker.cluster, worker.hostname)]

        def report(fields: dict[str, Any]) -> None:
            self._report(service_id, number, {**fields, "worker_id": worker_id})
            if fields.get("status") in RESTARTED:
                self._restart_later(service_id, number, worker, generation)

        if int(job.get("vcpus") or 0) > self.worker_vcpus or (
            int(job.get("memory") or 0) > self.worker_memory_mb
        ):
            detail = f"worker {worker.hostname} lacks the vcpus or memory"
            report({"status": "NO_WORKER_CAPACITY", "status_detail": detail})
            return
        taken = self._published_elsewhere(worker, job.get("port"))
        if taken:
            report({"status": "FAILED", "status_detail": taken})
            return
        container = f"oakdouble-{service_id[:12]}-{number}-{generation}"
        runner = InstanceRunner(
            dict(job),
            worker,
            container,
            self.workdir / f"{container}.log",
            report,
            self.process_images,
        )
        self.runners[key] = runner
        runner.start()

    def _restart_later(
        self, service_id: str, number: int, worker: WorkerSpec, generation: int
    ) -> None:
        """The cluster manager's restart of an ended instance, unless it was undeployed or
        placed again meanwhile."""

        def restart() -> None:
            with self.lock:
                job = self.jobs.get(service_id)
                if self._closed or job is None:
                    return
                if self._generations.get((service_id, number)) != generation:
                    return
                if not any(i["instance_number"] == number for i in job["instance_list"]):
                    return
                self._place(service_id, number, worker)

        timer = threading.Timer(self.restart_delay_s, restart)
        timer.daemon = True
        timer.start()

    def _published_elsewhere(self, worker: WorkerSpec, port: object) -> str:
        """Why ``worker`` cannot publish ``port`` (a running instance there publishes the
        same host port, as the NodeEngine's port mapping fails), else ''."""
        if not port:
            return ""
        host_port = str(port).split(":")[0].split("/")[0]
        for runner in self.runners.values():
            view = runner.describe()
            if runner.worker == worker and view["alive"] and view["host_port"] == host_port:
                return f"port {host_port} is already published on worker {worker.hostname}"
        return ""

    def undeploy(self, service_id: str, username: str, which: int) -> None:
        """``request_scale_down_instance``: drop instance ``which`` (-1: all) from the
        service's list at once; its runner is stopped in the background."""
        with self.lock:
            job = self.jobs.get(service_id)
            if job is None or self.get_app(job["applicationID"], username) is None:
                return
            kept = []
            for instance in job["instance_list"]:
                number = instance["instance_number"]
                if which in (-1, number):
                    self._generations.pop((service_id, number), None)
                    runner = self.runners.pop((service_id, number), None)
                    if runner is not None:
                        threading.Thread(target=runner.undeploy, daemon=True).start()
                        self._stopping.append(runner)
                else:
                    kept.append(instance)
            job["instance_list"] = kept
            self._reports = [
                r
                for r in self._reports
                if r.service_id != service_id or (which not in (-1, r.instance_number))
            ]

    def _report(self, service_id: str, number: int, fields: dict[str, Any]) -> None:
        """A cluster report, applied ``report_delay_s`` from now."""
        with self.lock:
            self._reports.append(
                PendingReport(time.monotonic() + self.report_delay_s, service_id, number, fields)
            )

    def _apply_due_reports(self) -> None:
        now = time.monotonic()
        due = [r for r in self._reports if r.due <= now]
        self._reports = [r for r in self._reports if r.due > now]
        for report in due:
            job = self.jobs.get(report.service_id)
            if job is None:
                continue
            for instance in job["instance_list"]:
                if instance["instance_number"] == report.instance_number:
                    instance.update(report.fields)
                    job["status"] = report.fields["status"]  # status_detail stays WAITING

    def shutdown(self) -> None:
        """Undeploy every instance and wait for their containers to be removed."""
        with self.lock:
            self._closed = True
            runners = list(self.runners.values()) + list(self._stopping)
            self.runners.clear()
        for runner in runners:
            runner.undeploy(timeout_s=5.0)


def validate_sla(sla: dict[str, Any]) -> None:
    """The v2.0 SLA schema of ``sla/schema.py`` for a service request; raises
    :class:`SlaInvalid` naming the first problem."""
    if not isinstance(sla, dict) or sla.get("sla_version") != "v2.0":
        raise SlaInvalid("sla_version must be 'v2.0'")
    if not isinstance(sla.get("customerID"), str):
        raise SlaInvalid("customerID is required and must be a string")
    applications = sla.get("applications")
    if not isinstance(applications, list) or not applications:
        raise SlaInvalid("applications must be a non-empty array")
    for application in applications:
        for key in ("applicationID", "application_name", "application_namespace"):
            if not isinstance(application.get(key), str):
                raise SlaInvalid(f"applications[].{key} is required and must be a string")
        for key in ("application_name", "application_namespace"):
            if not NAME.match(application[key]):
                raise SlaInvalid(f"{application[key]!r} does not match {NAME.pattern}")
        microservices = application.get("microservices")
        if not isinstance(microservices, list) or not microservices:
            raise SlaInvalid("applications[].microservices must be a non-empty array")
        for ms in microservices:
            _validate_microservice(ms)


def _validate_microservice(ms: Any) -> None:
    if not isinstance(ms, dict):
        raise SlaInvalid("a microservice must be an object")
    for key in ("microservice_name", "microservice_namespace", "virtualization", "code"):
        if not isinstance(ms.get(key), str):
            raise SlaInvalid(f"microservices[].{key} is required and must be a string")
    for key in ("microservice_name", "microservice_namespace"):
        if not NAME.match(ms[key]):
            raise SlaInvalid(f"{ms[key]!r} does not match {NAME.pattern}")
    if ms.get("microserviceID"):
        raise SlaInvalid("microserviceID must be empty")
    for key in INT_FIELDS:
        if key in ms and (not isinstance(ms[key], int) or isinstance(ms[key], bool)):
            raise SlaInvalid(f"{key} must be an integer")
    for key in STR_FIELDS:
        if key in ms and not isinstance(ms[key], str):
            raise SlaInvalid(f"{key} must be a string")
    for key in STR_LIST_FIELDS:
        if key in ms and not (
            isinstance(ms[key], list) and all(isinstance(item, str) for item in ms[key])
        ):
            raise SlaInvalid(f"{key} must be an array of strings")
    if "one_shot" in ms and not isinstance(ms["one_shot"], bool):
        raise SlaInvalid("one_shot must be a boolean")
    constraints = ms.get("constraints", [])
    if not isinstance(constraints, list) or not all(
        isinstance(c, dict) and isinstance(c.get("type"), str) for c in constraints
    ):
        raise SlaInvalid("constraints must be an array of objects with a type")
