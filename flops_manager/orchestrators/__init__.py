"""Orchestrator backends, chosen by name (``FLOPS_ORCHESTRATOR``) from one explicit table.

Each entry is imported lazily so a backend's dependencies load only when it is used.
"""

import importlib
from pathlib import Path

from flops_manager.errors import ConfigurationError
from flops_manager.orchestrators.base import Orchestrator, ServiceExitCallback

ORCHESTRATORS: dict[str, str] = {
    "local": "flops_manager.orchestrators.local:LocalOrchestrator",
}
"""Backend name → ``module:class`` of its :class:`Orchestrator` implementation."""


def make_orchestrator(
    name: str, workdir: Path, on_service_exit: ServiceExitCallback
) -> Orchestrator:
    """Instantiate the backend called ``name``.

    Raises ``ConfigurationError`` listing the valid names when ``name`` is unknown.
    """
    if name not in ORCHESTRATORS:
        raise ConfigurationError(
            f"Unknown orchestrator {name!r}; set FLOPS_ORCHESTRATOR to one of "
            f"{sorted(ORCHESTRATORS)}."
        )
    module_name, class_name = ORCHESTRATORS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    orchestrator: Orchestrator = cls(workdir=workdir, on_service_exit=on_service_exit)
    return orchestrator
