"""Orchestrator backends, chosen by name (``FLOPS_ORCHESTRATOR``) from one explicit table.

Each entry is imported lazily so a backend's dependencies load only when it is used.
"""

import importlib
from pathlib import Path
from typing import Any

from flops_manager.errors import ConfigurationError
from flops_manager.orchestrators.base import Orchestrator, ServiceExitCallback

ORCHESTRATORS: dict[str, str] = {
    "local": "flops_manager.orchestrators.local",
    "oakestra": "flops_manager.orchestrators.oakestra",
}
"""Backend name → module; each module has ``from_config(config, workdir, on_service_exit)``."""


def make_orchestrator(
    config: Any, workdir: Path, on_service_exit: ServiceExitCallback
) -> Orchestrator:
    """Instantiate the backend ``config.orchestrator`` names (``config``: a
    :class:`~flops_manager.config.ManagerConfig`); ``workdir`` holds its files.

    Raises ``ConfigurationError`` listing the valid names when the name is unknown, or naming
    a missing setting of the backend.
    """
    name = config.orchestrator
    if name not in ORCHESTRATORS:
        raise ConfigurationError(
            f"Unknown orchestrator {name!r}; set FLOPS_ORCHESTRATOR to one of "
            f"{sorted(ORCHESTRATORS)}."
        )
    module = importlib.import_module(ORCHESTRATORS[name])
    orchestrator: Orchestrator = module.from_config(config, workdir, on_service_exit)
    return orchestrator
