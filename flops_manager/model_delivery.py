"""Delivering a trained model on this machine: fetch the MLflow model, serve it, run its image.

- :func:`download_model_dir` fetches an MLflow model (``models:/<name>/<version>``,
  ``runs:/<run_id>/<path>``) from the tracking server with a given MLflow user, in a child
  process, so that the credential never enters this process's environment (MLflow reads it
  only from ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``).
- :class:`ModelEnvironments` makes the Python environment that serves a downloaded model: a uv
  virtualenv with the model's ``requirements.txt`` (MLflow's record of the environment it was
  logged from), ``numpy``, ``pandas`` and ``mlflow-skinny`` at the manager's version, with the
  manager's other versions as constraints: exactly what the model image installs
  (:mod:`image_builder.model_image`). Cached by the hash of what it installs.
- :func:`start_model_process` runs MLflow's scoring server (``POST /invocations``,
  ``GET /ping``) for a model directory in such an environment, bound to one address.
- :func:`docker_engine`, :func:`pull_image` and :func:`run_model_container` do the same with
  the trained-model image in the local Docker engine (the Docker SDK for Python).
- :func:`wait_until_serving` waits until a server answers ``GET /ping``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from packaging.utils import canonicalize_name

from flops_utils.errors import FlopsError
from flops_utils.logging import logger

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

LOOPBACK = "127.0.0.1"

ENV_FORMAT_VERSION = 1
"""Bumped when the layout of a model environment changes, so older ones are not reused."""

INSTALL_TIMEOUT_S = 900.0
"""Seconds one ``uv`` call making a model environment may take."""

DOWNLOAD_TIMEOUT_S = 300.0
"""Seconds fetching a model from the tracking server may take."""

READY_TIMEOUT_S = 180.0
"""Seconds a model server may take to answer ``GET /ping`` (MLflow's import and the model's
load take 3-10 s on 2 cores; a container's first start a little more)."""

CONTAINER_LABEL = "org.flops.project"
"""Docker label naming the project whose trained model a container serves."""

_ENV_MARKER = "flops-model-env.json"

SERVER_CODE = """\
import os, sys
import uvicorn
from mlflow.pyfunc import scoring_server
model_dir, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
command, environment = scoring_server.get_cmd(model_uri=model_dir, port=port, host=host,
                                              nworkers=1)
os.environ.update(environment)
print(f"serving {model_dir} on {host}:{port}", flush=True)
uvicorn.run(command.split()[-1], host=host, port=port, workers=1)
"""
"""What a model server process runs (``python -c``, arguments: model directory, host, port):
MLflow's scoring server as ``mlflow models serve --env-manager local`` starts it (uvicorn on
``mlflow.pyfunc.scoring_server.app`` with the model's path in its environment, see
``mlflow.pyfunc.scoring_server.get_cmd``), in one process, bound to ``host``."""

_DOWNLOAD_CODE = """\
import sys
from pathlib import Path
from image_builder.model_image import download_model, resolve_model
resolved = resolve_model(sys.argv[1], sys.argv[2])
download_model(resolved.uri, sys.argv[2], Path(sys.argv[3]))
print(resolved.uri)
"""


class ModelDeliveryError(FlopsError):
    """A trained model could not be fetched, installed or served (the message says why)."""

    code = "model_delivery_failed"


@dataclass(frozen=True)
class TrainedModel:
    """A project's trained model as a backend serves it: ``model_uri`` (``models:/<name>/
    <version>``) in the tracking server ``tracking_url``, read with ``credentials``
    (:func:`tracking_env` of the project's MLflow user), and its ``image`` (pinned reference)
    when one was built, else ``None``."""

    model_uri: str
    tracking_url: str
    credentials: Mapping[str, str] = field(default_factory=dict)
    image: str | None = None


@runtime_checkable
class ServesMlflowModels(Protocol):
    """An orchestrator that serves a trained model from its MLflow model when it has no image
    (the ``local`` backend)."""

    def deploy_model(
        self, project_id: str, model: TrainedModel, resources: Mapping[str, int] | None = None
    ) -> str:
        """Serve ``model`` for the project until ``stop_inference``; its base URL.
        ``resources``: the SLA's ``resource_constraints`` (``memory`` MB, ``vcpus``,
        ``storage`` MB), enforced where the server's runtime can."""
        ...


# -- fetching ------------------------------------------------------------------------------
def tracking_env(username: str | None, password: str | None) -> dict[str, str]:
    """``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` for an MLflow user (empty without one)."""
    if not username:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password or ""}


def download_model_dir(
    model_uri: str,
    tracking_url: str,
    destination: Path,
    credentials: Mapping[str, str] | None = None,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> str:
    """Download the MLflow model ``model_uri`` from the tracking server ``tracking_url``
    (``http://HOST:PORT``) into the new directory ``destination`` (its parent must exist).

    ``credentials``: :func:`tracking_env` of the MLflow user to read it as. Returns the
    version-pinned URI it fetched (``models:/<name>/<version>``). Raises
    :class:`ModelDeliveryError` with the tracking server's reason (unreachable, not found,
    refused) or after ``timeout_s`` seconds.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(credentials or {})
    try:
        result = subprocess.run(
            [sys.executable, "-c", _DOWNLOAD_CODE, model_uri, tracking_url, str(destination)],
            env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ModelDeliveryError(
            f"Fetching the model {model_uri} from {tracking_url} took over {timeout_s:.0f} s; "
            "check the tracking server and retry."
        ) from None
    if result.returncode != 0:
        raise ModelDeliveryError(_last_error_line(result.stderr, model_uri))
    return result.stdout.strip().splitlines()[-1]


def _last_error_line(stderr: str, model_uri: str) -> str:
    """The message of the exception a download process died of (the builder's errors name
    the cause and the fix)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "it ended without a message"
    _, colon, message = last.partition(": ")
    return (
        message if colon and "Error" in last.split(":")[0] else f"Cannot fetch {model_uri}: {last}"
    )


# -- the model's environment ---------------------------------------------------------------
@dataclass(frozen=True)
class InstallPlan:
    """What a model's environment installs: ``requirements`` (the model's own, the serving
    extras and the ``mlflow-skinny`` pin) and ``constraints`` (the manager's versions)."""

    requirements: tuple[str, ...]
    constraints: tuple[str, ...]

    def key(self, python_tag: str) -> str:
        """32-hex cache key of the plan for the interpreter ``python_tag``."""
        material = {
            "format": ENV_FORMAT_VERSION,
            "requirements": self.requirements,
            "constraints": self.constraints,
            "python": python_tag,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def install_plan(model_dir: Path, installed: Mapping[str, str]) -> InstallPlan:
    """The :class:`InstallPlan` of the MLflow model in ``model_dir``: as the model image
    installs it (:meth:`image_builder.model_image.ModelImageBuilder._stage_context`): the
    model's requirements without MLflow, ``numpy`` and ``pandas`` unless it names them,
    ``mlflow-skinny`` pinned to the manager's version; ``installed``: the manager's versions
    (:func:`image_builder.python_env.manager_versions`), the constraints. Requirements naming
    files of the model are made absolute. Raises ``ModelNotServableError`` for a directory
    that is no servable MLflow model."""
    from image_builder.dependencies import requirement_name, resolve_local_paths
    from image_builder.model_image import (
        SERVING_EXTRAS,
        SERVING_PACKAGES,
        check_servable,
        model_requirements,
    )
    from image_builder.python_env import plan_install, runtime_pins

    check_servable(model_dir)
    lines = model_requirements(model_dir)
    named = {requirement_name(line) for line in lines}
    extras = [name for name in SERVING_EXTRAS if canonicalize_name(name) not in named]
    user_lines, constraints = plan_install([*lines, *extras], SERVING_PACKAGES, dict(installed))
    install = resolve_local_paths(user_lines, model_dir)
    return InstallPlan((*install, *runtime_pins(SERVING_PACKAGES)), tuple(constraints))


class ModelEnvironments:
    """Virtualenvs that serve MLflow models, cached under ``cache_dir`` by
    :meth:`InstallPlan.key`.

    ``install_timeout_s``: seconds per ``uv`` call. uv installs offline first (its cache), then
    online with the manager's versions as constraints, then without them
    (:func:`image_builder.python_env.run_uv_with_fallbacks`).
    """

    def __init__(self, cache_dir: Path, install_timeout_s: float = INSTALL_TIMEOUT_S) -> None:
        self.cache_dir = Path(cache_dir)
        self.install_timeout_s = install_timeout_s

    @cached_property
    def installed(self) -> dict[str, str]:
        """The manager environment's distribution versions (the constraints)."""
        from image_builder.python_env import manager_versions

        return manager_versions()

    @cached_property
    def python_tag(self) -> str:
        """The base interpreter and its version, part of every key."""
        from image_builder.python_env import base_interpreter

        return f"{sys.implementation.name}-{sys.version.split()[0]}-{base_interpreter()}"

    def python_for(self, model_dir: Path) -> Path:
        """The interpreter of the environment serving the model in ``model_dir``, made if
        missing (under a lock per key). Raises ``ModelNotServableError`` and
        :class:`ModelDeliveryError` with uv's condensed message."""
        from image_builder.python_env import file_lock

        plan = install_plan(model_dir, self.installed)
        key = plan.key(self.python_tag)
        final = self.cache_dir / key
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.cache_dir / f"{key}.lock", self.install_timeout_s * 2):
            if not (final / _ENV_MARKER).is_file():
                self._make(final, plan)
        return final / "bin" / "python"

    def _make(self, final: Path, plan: InstallPlan) -> None:
        """Install ``plan`` into a staging virtualenv and rename it to ``final``."""
        from image_builder.python_env import (
            base_interpreter,
            condense_uv_error,
            pick_error,
            run_uv,
            run_uv_with_fallbacks,
            uv_command,
        )

        shutil.rmtree(final, ignore_errors=True)
        staging = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
        started = time.monotonic()

        def uv(args: list[str]) -> tuple[int, str]:
            result = run_uv(
                uv_command(), args, timeout_s=self.install_timeout_s,
                timeout_error=lambda: ModelDeliveryError(
                    f"uv {args[0]} did not finish within {self.install_timeout_s:.0f} s"
                ),
            )  # fmt: skip
            return result.returncode, str(result.stderr)

        try:
            venv = ["venv", "--relocatable", "--no-project", "--python", base_interpreter()]
            code, stderr = uv([*venv, str(staging)])
            if code != 0:
                raise ModelDeliveryError(f"uv venv failed: {stderr.strip()[-300:]}")
            (staging / "requirements.txt").write_text("\n".join(plan.requirements) + "\n")
            (staging / "constraints.txt").write_text("\n".join(plan.constraints) + "\n")
            install = ["pip", "install", "--python", str(staging / "bin" / "python"),
                       "-r", str(staging / "requirements.txt")]  # fmt: skip
            mode, errors = run_uv_with_fallbacks(uv, install, staging / "constraints.txt")
            if mode is None:
                _, stderr = pick_error(errors)
                raise ModelDeliveryError(
                    f"Cannot install the trained model's requirements: {condense_uv_error(stderr)}"
                    ". Fix the model's pip requirements (its requirements.txt) and log it again."
                )
            marker = {"requirements": plan.requirements, "install_mode": mode,
                      "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
            (staging / _ENV_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            os.rename(staging, final)
            logger.info("model environment %s made in %.1f s", final.name, marker["seconds"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# -- serving -------------------------------------------------------------------------------
def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def start_model_process(
    python: Path, model_dir: Path, host: str, port: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start MLflow's scoring server (:data:`SERVER_CODE`) for ``model_dir`` with the
    environment's ``python``, bound to ``host:port``, in its own session, output to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    return subprocess.Popen(
        [str(python), "-c", SERVER_CODE, str(model_dir), host, str(port)],
        env=env, cwd=str(model_dir), stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def wait_until_serving(
    url: str,
    timeout_s: float = READY_TIMEOUT_S,
    ended: Callable[[], str | None] = lambda: None,
) -> None:
    """Wait until ``GET {url}/ping`` answers 200.

    ``ended()`` returns why the server is gone (its last log line), ``None`` while it runs.
    Raises :class:`ModelDeliveryError` when it ended or after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = ended()
        if reason is not None:
            raise ModelDeliveryError(f"The trained-model server ended before serving: {reason}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if int(response.status) == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    raise ModelDeliveryError(
        f"The trained-model server at {url} did not answer /ping within {timeout_s:.0f} s."
    )


# -- Docker --------------------------------------------------------------------------------
def docker_engine() -> docker.DockerClient | None:
    """A client of the local Docker engine (``DOCKER_HOST`` or ``/var/run/docker.sock``) that
    answers ``ping``, else ``None``."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except (DockerException, OSError):
        return None
    return client


@dataclass
class PullProgress:
    """Per-layer pull progress from the engine's status stream: ``layers`` maps a layer id to
    its last status (``Downloading``, ``Pull complete``, ...)."""

    layers: dict[str, str] = field(default_factory=dict)
    last_status: str = ""

    def update(self, message: Mapping[str, Any]) -> str:
        """Record one decoded status message; returns a one-line summary."""
        status = str(message.get("status") or "")
        layer = str(message.get("id") or "")
        if layer and status and ":" not in layer:
            self.layers[layer] = status
        self.last_status = status
        done = sum(1 for s in self.layers.values() if s in ("Pull complete", "Already exists"))
        return f"{done}/{len(self.layers)} layers" + (f" - {status}" if status else "")


PULL_MILESTONES = ("Pull complete", "Already exists", "Digest:", "Status:")
"""Status messages of a pull worth a line of their own (a layer done, the outcome)."""


def pull_image(
    client: docker.DockerClient, ref: str, on_progress: Callable[[str], None] | None = None
) -> str:
    """Pull ``ref`` (``registry/namespace/model@sha256:...`` or ``...:tag``) into the engine;
    ``on_progress`` gets a one-line summary at each :data:`PULL_MILESTONES` message. Returns
    the image id. Raises :class:`ModelDeliveryError` with the engine's message."""
    from docker.errors import DockerException

    progress = PullProgress()
    try:
        for message in client.api.pull(ref, stream=True, decode=True):
            if "error" in message:
                raise ModelDeliveryError(f"Pulling {ref} failed: {message['error']}")
            summary = progress.update(message)
            if on_progress is not None and progress.last_status.startswith(PULL_MILESTONES):
                on_progress(summary)
        image_id: str = client.images.get(ref).id
    except DockerException as exc:
        raise ModelDeliveryError(f"Pulling {ref} failed: {_docker_reason(exc)}") from exc
    return image_id


def run_model_container(
    client: docker.DockerClient,
    ref: str,
    host: str,
    port: int,
    *,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Container:
    """Run the trained-model image ``ref`` (pulled already) detached, its server on ``PORT``
    ``port`` published on ``host:port``. Raises :class:`ModelDeliveryError`."""
    from docker.errors import DockerException

    try:
        return client.containers.run(
            ref, detach=True, name=name, labels=dict(labels or {}),
            environment={"PORT": str(port)}, ports={f"{port}/tcp": (host, port)},
        )  # fmt: skip
    except DockerException as exc:
        raise ModelDeliveryError(f"Running {ref} failed: {_docker_reason(exc)}") from exc


def container_ended(container: Container) -> str | None:
    """Why ``container`` stopped (its exit code and last log line), ``None`` while it runs."""
    from docker.errors import DockerException

    try:
        container.reload()
    except DockerException as exc:
        return f"it is gone ({_docker_reason(exc)})"
    if container.status in ("created", "running", "restarting"):
        return None
    code = container.attrs.get("State", {}).get("ExitCode")
    tail = container.logs(tail=5).decode(errors="replace").strip().splitlines()
    return f"exit code {code}" + (f"; last log line: {tail[-1]}" if tail else "")


def remove_containers(client: docker.DockerClient, labels: Mapping[str, str]) -> int:
    """Stop and remove every container with all of ``labels``; returns how many."""
    filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
    containers = client.containers.list(all=True, filters=filters)
    for container in containers:
        container.remove(force=True)
    return len(containers)


def _docker_reason(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return " ".join(str(explanation or exc).split())[:300]
