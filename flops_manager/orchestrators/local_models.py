"""Trained-model servers of the ``local`` backend: one per project, on this machine.

:meth:`LocalModelServers.serve` runs the project's trained model behind MLflow's scoring
protocol (``POST /invocations``, ``GET /ping``) on ``127.0.0.1`` and a free port:

- from its image in the local Docker engine, when there is an image and an engine that answers
  (the container publishes its ``PORT`` on ``127.0.0.1`` only, and is limited to the SLA's
  ``resource_constraints`` memory and vcpus, :func:`container_limits`);
- else as a process: the MLflow model is downloaded from the tracking server into
  ``<workdir>/<project_id>/model`` and served from a virtualenv made for its requirements
  (:class:`~flops_manager.model_delivery.ModelEnvironments`, cached by what it installs), its
  output in ``<workdir>/<project_id>/model-server.log``.

Both outlive the manager process (as the Oakestra backend's trained-model application does):
``<workdir>/<project_id>/model-server.json`` records the server (the process's identity or the
container's id), so :meth:`LocalModelServers.stop` finds it after a restart too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flops_manager import model_delivery as md
from flops_manager.process_identity import ProcessIdentity
from flops_utils.logging import logger
from flops_utils.processes import stop_process_groups

STOP_TIMEOUT_S = 10.0
RECORD_FILE = "model-server.json"
SERVER_LOG = "model-server.log"
"""The output of a trained-model server run as a process, in ``<workdir>/<project_id>``."""


@dataclass
class _Server:
    """A running model server: ``url``, and either ``process`` (a child of this manager) or
    ``identity`` (re-found from the record), or ``container_id``."""

    url: str
    process: subprocess.Popen[bytes] | None = None
    identity: ProcessIdentity | None = None
    container_id: str | None = None


class LocalModelServers:
    """The local backend's trained-model servers.

    Args:
        workdir: per-project files go under ``workdir/<project_id>``.
        environments: where model virtualenvs are cached.
        host: the address servers bind and the URLs name (default ``127.0.0.1``).
        ready_timeout_s: seconds a server may take to answer ``/ping``.
    """

    def __init__(
        self,
        workdir: Path,
        environments: md.ModelEnvironments,
        host: str = md.LOOPBACK,
        ready_timeout_s: float = md.READY_TIMEOUT_S,
    ) -> None:
        self.workdir = workdir
        self.environments = environments
        self.host = host
        self.ready_timeout_s = ready_timeout_s
        self._servers: dict[str, _Server] = {}
        self._lock = threading.Lock()

    def serve(
        self,
        project_id: str,
        model: md.TrainedModel,
        resources: Mapping[str, int] | None = None,
    ) -> str:
        """Serve ``model`` for the project (replacing a server it had); returns the base URL
        ``http://127.0.0.1:<port>``.

        ``resources``: the SLA's ``resource_constraints`` (``memory`` MB, ``vcpus``,
        ``storage`` MB). A container is limited to ``memory`` and ``vcpus``
        (:func:`container_limits`); a process is not limited (as the local backend's learners
        are not; admission refuses explicit ``resource_constraints`` for this backend), which
        is logged. Raises ``FlopsError`` subclasses
        (:class:`~flops_manager.model_delivery.ModelDeliveryError`, the model fetch's)."""
        self.stop(project_id)
        directory = self.workdir / project_id
        directory.mkdir(parents=True, exist_ok=True)
        engine = self.engine() if model.image else None
        try:
            if engine is not None and model.image:
                limits = container_limits(resources or {}, os.cpu_count() or 1)
                server = self._serve_container(project_id, engine, model.image, limits)
            else:
                if resources:
                    logger.info(
                        "project %s: the trained-model server runs as a process, which the "
                        "local backend does not limit (resource_constraints %s not applied)",
                        project_id,
                        dict(resources),
                    )
                server = self._serve_process(project_id, model, directory)
        except BaseException:
            (directory / RECORD_FILE).unlink(missing_ok=True)
            raise
        with self._lock:
            self._servers[project_id] = server
        logger.info("project %s: trained-model server at %s", project_id, server.url)
        return server.url

    def engine(self) -> Any:
        """The local Docker engine's client (:func:`~flops_manager.model_delivery.
        docker_engine`), or ``None`` when none answers."""
        return md.docker_engine()

    def stop(self, project_id: str) -> bool:
        """Stop the project's model server (this manager's, or the one its record names);
        ``False`` when none ran."""
        with self._lock:
            server = self._servers.pop(project_id, None)
        record = self.workdir / project_id / RECORD_FILE
        if server is None:
            server = _read_record(record)
        record.unlink(missing_ok=True)
        if server is None:
            return False
        _stop(server)
        logger.info("project %s: stopped the trained-model server", project_id)
        return True

    def log_path(self, project_id: str) -> Path | None:
        """The output file of the project's trained-model server when it ran as a process
        (``<workdir>/<project_id>/model-server.log``), else ``None``."""
        path = self.workdir / project_id / SERVER_LOG
        return path if path.is_file() else None

    def serving(self, project_id: str) -> bool:
        """Whether the project's trained-model server runs (this manager's, or the one its
        record names)."""
        with self._lock:
            if project_id in self._servers:
                return True
        server = _read_record(self.workdir / project_id / RECORD_FILE)
        return server is not None and server.identity is not None and server.identity.is_alive()

    # -- the two ways ---------------------------------------------------------------------
    def _serve_container(
        self, project_id: str, engine: Any, image: str, limits: Mapping[str, Any]
    ) -> _Server:
        md.remove_containers(engine, {md.CONTAINER_LABEL: project_id})
        md.pull_image(engine, image)
        port = md.free_port(self.host)
        container = run_limited_container(
            engine, image, self.host, port, limits, name=f"flops-model-{project_id}",
            labels={md.CONTAINER_LABEL: project_id},
        )  # fmt: skip
        server = _Server(f"http://{self.host}:{port}", container_id=str(container.id))
        self._record(project_id, server)
        try:
            md.wait_until_serving(
                server.url, self.ready_timeout_s, lambda: md.container_ended(container)
            )
        except BaseException:
            _stop(server)
            raise
        return server

    def _serve_process(self, project_id: str, model: md.TrainedModel, directory: Path) -> _Server:
        model_dir = directory / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        md.download_model_dir(model.model_uri, model.tracking_url, model_dir, model.credentials)
        python = self.environments.python_for(model_dir)
        port = md.free_port(self.host)
        log_path = directory / SERVER_LOG
        with log_path.open("ab") as log:
            process = md.start_model_process(python, model_dir, self.host, port, log)
        identity = ProcessIdentity.of(process.pid)
        server = _Server(f"http://{self.host}:{port}", process=process, identity=identity)
        self._record(project_id, server)

        def ended() -> str | None:
            if process.poll() is None:
                return None
            return f"exit code {process.returncode}; last log line: {_last_line(log_path)}"

        try:
            md.wait_until_serving(server.url, self.ready_timeout_s, ended)
        except BaseException:
            _stop(server)
            raise
        return server

    def _record(self, project_id: str, server: _Server) -> None:
        document: dict[str, Any] = {"url": server.url}
        if server.identity is not None:
            document["process"] = server.identity.to_dict()
        if server.container_id is not None:
            document["container_id"] = server.container_id
        (self.workdir / project_id / RECORD_FILE).write_text(json.dumps(document) + "\n")


def container_limits(resources: Mapping[str, int], host_cpus: int) -> dict[str, Any]:
    """The Docker SDK's limits for the SLA's ``resources``: ``mem_limit`` (``"<memory>m"``,
    with ``memswap_limit`` equal, so no swap beyond it) and ``nano_cpus`` (``vcpus`` x 10^9,
    Docker's ``--cpus``). ``storage`` is not limited (Docker's overlay2 driver limits a
    container's writable layer only on XFS with project quotas). Raises
    :class:`~flops_manager.model_delivery.ModelDeliveryError` when ``vcpus`` exceeds this
    machine's ``host_cpus`` (Docker refuses that)."""
    limits: dict[str, Any] = {}
    if memory_mb := resources.get("memory"):
        limits["mem_limit"] = limits["memswap_limit"] = f"{int(memory_mb)}m"
    if vcpus := resources.get("vcpus"):
        if vcpus > host_cpus:
            raise md.ModelDeliveryError(
                f"resource_constraints.vcpus is {vcpus}, but this machine has {host_cpus} "
                "CPU(s): the trained-model container cannot get more; lower vcpus."
            )
        limits["nano_cpus"] = int(vcpus) * 10**9
    return limits


def run_limited_container(
    engine: Any,
    image: str,
    host: str,
    port: int,
    limits: Mapping[str, Any],
    *,
    name: str,
    labels: Mapping[str, str],
) -> Any:
    """Run the trained-model ``image`` (pulled already) detached with ``limits``
    (:func:`container_limits`), its server on ``PORT`` ``port`` published on ``host:port``;
    the container. Raises :class:`~flops_manager.model_delivery.ModelDeliveryError`."""
    from docker.errors import DockerException

    try:
        return engine.containers.run(
            image, detach=True, name=name, labels=dict(labels),
            environment={"PORT": str(port)}, ports={f"{port}/tcp": (host, port)}, **limits,
        )  # fmt: skip
    except DockerException as exc:
        reason = " ".join(str(getattr(exc, "explanation", None) or exc).split())[:300]
        raise md.ModelDeliveryError(f"Running {image} failed: {reason}") from exc


def _read_record(path: Path) -> _Server | None:
    """The server a record names; ``None`` when there is no readable record."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    identity = ProcessIdentity.from_dict(document.get("process") or {})
    container = document.get("container_id")
    return _Server(
        str(document.get("url", "")),
        identity=identity,
        container_id=str(container) if container else None,
    )


def _stop(server: _Server) -> None:
    """Stop a server's process group or remove its container; never raises for one gone."""
    if server.process is not None:
        stop_process_groups([server.process], STOP_TIMEOUT_S)
    elif server.identity is not None:
        server.identity.stop_group(STOP_TIMEOUT_S)
    if server.container_id is not None:
        engine = md.docker_engine()
        if engine is None:
            logger.warning("no Docker engine to remove the model container %s", server.container_id)
            return
        try:
            engine.containers.get(server.container_id).remove(force=True)
        except Exception as exc:  # docker.errors.NotFound: gone already
            logger.info("model container %s: %s", server.container_id[:12], exc)


def _last_line(path: Path) -> str:
    from flops_manager.orchestrators.local import last_line

    return last_line(path)
