"""Reading a FLOps process's ``FLOPS_*`` variables (:mod:`flops_utils.env_vars`) with errors
that name the variable and the fix.

Each process (learner, aggregator, image builder) has its own configuration error class; an
:class:`EnvReader` raises that class, so each keeps its own error code (all of them exit with
:attr:`~flops_utils.contract.exit_codes.ExitCode.CONFIG_ERROR`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flops_utils import env_vars
from flops_utils.errors import FlopsError
from flops_utils.notifications import parse_mqtt_url


class EnvReader:
    """The variables of one process.

    Args:
        env: the environment (e.g. ``os.environ``).
        error: the ``FlopsError`` subclass every problem raises.
        starter: who sets the variables, for the "is not set" message, e.g. ``"the
            orchestrator sets it when it starts a learner"``.
    """

    def __init__(self, env: Mapping[str, str], error: type[FlopsError], starter: str) -> None:
        self.env = env
        self.error = error
        self.starter = starter

    def required(self, name: str) -> str:
        """The stripped value of ``name``; raises when it is unset or blank."""
        value = (self.env.get(name) or "").strip()
        if not value:
            raise self.error(f"{name} is not set; {self.starter}.")
        return value

    def status_target(self) -> tuple[str, str]:
        """``(FLOPS_PROJECT_ID, FLOPS_MQTT_URL)``: where a role's status messages go, both
        required, the URL checked."""
        return self.required(env_vars.PROJECT_ID), self.mqtt_url()

    def mqtt_url(self) -> str:
        """``FLOPS_MQTT_URL``, checked to be ``mqtt://HOST:PORT``."""
        url = self.required(env_vars.MQTT_URL)
        try:
            parse_mqtt_url(url)
        except ValueError as exc:
            raise self.error(f"{env_vars.MQTT_URL}: {exc}.") from exc
        return url

    def host_port(self, name: str, hint: str) -> str:
        """``name`` checked to be ``HOST:PORT``; ``hint`` ends the error message (what to set
        it to, with an example)."""
        address = self.required(name)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise self.error(f"{name}={address!r} is not HOST:PORT; set it to {hint}.")
        return address

    def seconds(self, name: str, default: float) -> float:
        """``name`` as a number of seconds, ``default`` when unset."""
        raw = self.env.get(name) or str(default)
        try:
            return float(raw)
        except ValueError as exc:
            raise self.error(f"{name}={raw!r} is not a number of seconds.") from exc

    def repo_dir(self) -> Path:
        """``FLOPS_ML_REPO_DIR`` (default: the working directory), checked to hold the ML
        repository's ``model_manager.py``."""
        repo_dir = Path(self.env.get(env_vars.ML_REPO_DIR) or os.getcwd())
        if not (repo_dir / "model_manager.py").is_file():
            raise self.error(
                f"{repo_dir} has no model_manager.py; point {env_vars.ML_REPO_DIR} at the ML "
                "repository's root."
            )
        return repo_dir
