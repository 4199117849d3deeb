"""The orchestrator interface: deploy a project's FL services, watch them, stop them."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ServiceExitCallback = Callable[[str, str, int, str], None]
"""``(project_id, service_name, returncode, last_output_line)`` for a service that exited."""


@dataclass(frozen=True)
class ServiceSpec:
    """One FL service: ``name`` unique within the project, ``module`` run with ``python -m``,
    ``env`` the environment variables it gets (see ``flops_utils.env_vars``)."""

    name: str
    module: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Deployment:
    """Everything an orchestrator needs to run a project.

    ``python``: interpreter of the built environment (venv builder); ``services``: the
    aggregator first, then one learner per eligible node.
    """

    project_id: str
    python: Path
    services: tuple[ServiceSpec, ...]


class Orchestrator(ABC):
    """Runs FL services somewhere. Backends: ``local`` (child processes), ``oakestra``.

    ``on_service_exit`` is called from a background thread when a service ends on its own.
    """

    needs_images: bool = False
    """True when the backend pulls OCI images (then the ``oci`` builder is required)."""

    def __init__(self, on_service_exit: ServiceExitCallback) -> None:
        self.on_service_exit = on_service_exit

    @abstractmethod
    def deploy(self, deployment: Deployment) -> None:
        """Start every service of ``deployment``. Raises ``FlopsError`` when one can't start."""

    @abstractmethod
    def stop(self, project_id: str) -> None:
        """Stop and remove every service of the project; a no-op when none runs."""

    @abstractmethod
    def running_services(self, project_id: str) -> list[str]:
        """Names of the project's services that are still running."""

    @abstractmethod
    def close(self) -> None:
        """Stop every project's services and background threads."""
