"""The orchestrator interface: deploy a project's FL services, watch them, stop them, and find
them again after the manager restarted."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ServiceExitCallback = Callable[[str, str, int | None, str], None]
"""``(project_id, service_name, returncode, last_output_line)`` for a service that exited.

``returncode`` is ``None`` when it is unknown: a service re-attached after a manager restart
is no longer the manager's child (local backend), so only its disappearance is seen."""

ServiceHandle = dict[str, Any]
"""What a backend needs to find one started service again after a manager restart: a
JSON-serialisable dict with at least ``name`` (the service's name). The lifecycle persists it
in the project document. ``local``: ``{"name", "pid", "start_ticks", "boot", "log_path"}``;
an ``oakestra`` backend would keep its service and instance ids."""

ServiceStartedCallback = Callable[[ServiceHandle], None]
"""Called by :meth:`Orchestrator.deploy` with the handle of each service right after it
started, so that a manager that dies during a deployment still knows what it started."""


@dataclass(frozen=True)
class Placement:
    """The worker node a service must run on: its ``cluster`` and ``hostname`` (an Oakestra
    ``direct`` constraint) and its ``platform`` (``linux/amd64``, ``linux/arm64``)."""

    cluster: str
    hostname: str
    platform: str


@dataclass(frozen=True)
class ServiceSpec:
    """One FL service: ``name`` unique within the project, ``module`` run with ``python -m``
    (also the role: ``aggregator``, ``learner``), ``env`` the environment variables it gets
    (see ``flops_utils.env_vars``), ``placement`` the node it must run on (learners: the node
    holding the data) or ``None`` for anywhere."""

    name: str
    module: str
    env: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None


@dataclass(frozen=True)
class Deployment:
    """Everything an orchestrator needs to run a project.

    ``services``: the aggregator first, then one learner per eligible node. ``python``:
    interpreter of the built virtualenv (``venv`` builder), else ``None``. ``images``: role
    (``learner``, ``aggregator``) → pinned image reference (``oci`` builder), else empty.
    ``resources``: the SLA's per-service ``resource_constraints`` (``memory`` and ``storage``
    in MB, ``vcpus`` a count).
    """

    project_id: str
    services: tuple[ServiceSpec, ...]
    python: Path | None = None
    images: dict[str, str] = field(default_factory=dict)
    resources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceState:
    """A service as :meth:`Orchestrator.reattach` found it: ``running`` or gone, and
    ``last_output``, the last non-empty line of its output (empty when unknown)."""

    name: str
    running: bool
    last_output: str


class Orchestrator(ABC):
    """Runs FL services somewhere. Backends: ``local`` (child processes), ``oakestra``.

    ``on_service_exit`` is called from a background thread when a service ends on its own.
    """

    needs_images: bool = False
    """True when the backend pulls OCI images (then the ``oci`` builder is required)."""

    serves_models: bool = False
    """True when the backend can run a trained-model image (:meth:`deploy_inference`)."""

    def __init__(self, on_service_exit: ServiceExitCallback) -> None:
        self.on_service_exit = on_service_exit

    @abstractmethod
    def deploy(
        self, deployment: Deployment, on_started: ServiceStartedCallback | None = None
    ) -> None:
        """Start every service of ``deployment``, calling ``on_started`` with each one's
        :data:`ServiceHandle` as soon as it runs. Raises ``FlopsError`` when one can't start."""

    @abstractmethod
    def reattach(self, project_id: str, handles: Sequence[ServiceHandle]) -> list[ServiceState]:
        """Take over the services a previous manager process started for the project.

        ``handles`` are what :meth:`deploy` passed to ``on_started``. Services still running
        are watched again (their end reaches ``on_service_exit``, with ``returncode`` ``None``
        when the backend cannot know it) and :meth:`stop` stops them. Returns one
        :class:`ServiceState` per handle, in order; never raises for a service that is gone.
        """

    @abstractmethod
    def stop(self, project_id: str) -> None:
        """Stop and remove every service of the project; a no-op when none runs."""

    @abstractmethod
    def running_services(self, project_id: str) -> list[str]:
        """Names of the project's services that are still running."""

    def deploy_inference(
        self, project_id: str, image: str, port: int, resources: dict[str, int]
    ) -> str:
        """Run the trained-model image ``image`` (serving MLflow's scoring protocol on
        ``port``, its ``PORT``) for the project, apart from its FL services: it outlives the
        project's end and runs until :meth:`stop_inference`. Returns its base URL
        (``http://HOST:PORT``). Only backends with :attr:`serves_models` implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not run trained-model images")

    def stop_inference(self, project_id: str) -> bool:
        """Stop the project's trained-model server; ``False`` when none runs."""
        return False

    @abstractmethod
    def close(self, stop_services: bool = True) -> None:
        """Stop the background threads and, with ``stop_services`` (the default), every
        project's services; without it the services keep running for a later
        :meth:`reattach` by the next manager process."""
