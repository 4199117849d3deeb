"""The aggregator's configuration, read from the ``FLOPS_*`` variables
(:mod:`flops_utils.env_vars`) for each of its three roles (classic, root, cluster)."""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aggregator.flower_server import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_ROUND_TIMEOUT_S,
    TrainingSettings,
)
from flops_utils import env_vars
from flops_utils.contract.tracking import Provenance
from flops_utils.contract.training import (
    AggregatorRole,
    AggregatorSLA,
    StrategyConfig,
    TrainingConfiguration,
    describe_validation_error,
    root_clusters_needed,
)
from flops_utils.env_config import EnvReader
from flops_utils.errors import FlopsError
from flops_utils.flower_security import ClientSecurity, SecurityConfigError, ServerSecurity
from flops_utils.types import MLModelFlavor

CYCLE_KEY = "flops_cycle"
"""Key of the cycle number (1-based) in the config the root sends with every instruction."""

STRAGGLER_NOTICE_ENV = env_vars.STRAGGLER_NOTICE_S
"""Seconds after which (and then every which) the aggregator reports a learner that has not
answered a round's instruction yet; default ``min(30, round_timeout_s / 2)``, 0 turns the
reports off (:attr:`~aggregator.flower_server.TrainingSettings.notice_s`)."""

PARENT_RUN_KEY = "flops_parent_run_id"
"""Key of the root's MLflow run id in the config the root sends with every instruction; a
cluster aggregator nests its own run under it."""


class ConfigError(FlopsError):
    """The aggregator's environment or SLA is incomplete or malformed."""

    code = "aggregator_config_error"


@dataclass(frozen=True)
class AggregatorConfig:
    """The aggregator's settings, read from the environment by :meth:`from_env`.

    ``sla`` is the SLA as parsed JSON (logged to MLflow as parameters) with
    ``training_configuration.strategy`` replaced by ``strategy`` in full, so that the run
    records the strategy's name and every parameter in effect; ``training``, ``flavor`` and
    ``customer_id`` are read from it by :class:`~flops_utils.contract.training.AggregatorSLA`,
    with the SLA's defaults (rounds 3, client minimums 1, flavor pytorch, strategy FedAvg,
    customer ``Admin``). ``role`` is ``FLOPS_AGGREGATOR_ROLE``; ``clusters`` (root),
    ``cluster``, ``root_address`` and ``learners`` (cluster) are empty for the other roles;
    ``repo_dir`` is ``None`` for a cluster aggregator (it runs no user code).
    ``server_security`` (``FLOPS_TLS_CA_CERT``, ``FLOPS_TLS_CERT``, ``FLOPS_TLS_KEY``,
    ``FLOPS_FLOWER_TOKEN``) is how its Flower server serves; ``root_security`` (the CA and the
    token) how a cluster aggregator connects to the root (unset for the other roles).
    ``straggler_notice_s`` is ``FLOPS_STRAGGLER_NOTICE_S`` (``None``: the default).
    ``registered_model`` is ``FLOPS_REGISTERED_MODEL`` (empty: the experiment's name) and
    ``provenance`` is ``FLOPS_PROVENANCE`` (empty when unset), both recorded in MLflow.
    """

    project_id: str
    mqtt_url: str
    address: str
    mlflow_url: str
    repo_dir: Path | None
    sla: dict[str, Any]
    customer_id: str
    flavor: MLModelFlavor
    training: TrainingConfiguration
    connect_timeout_s: float
    role: AggregatorRole = AggregatorRole.CLASSIC
    clusters: tuple[str, ...] = ()
    cluster: str = ""
    root_address: str = ""
    learners: tuple[str, ...] = ()
    server_security: ServerSecurity = field(default_factory=ServerSecurity, repr=False)
    root_security: ClientSecurity = field(default_factory=ClientSecurity, repr=False)
    straggler_notice_s: float | None = None
    registered_model: str = ""
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def training_rounds(self) -> int:
        """Flower rounds to run (per cycle in hierarchical FL)."""
        return self.training.training_rounds

    @property
    def training_cycles(self) -> int:
        """Hierarchical FL: the root's rounds (cycles)."""
        return self.training.training_cycles

    @property
    def strategy(self) -> StrategyConfig:
        """The Flower strategy with every parameter in effect."""
        return self.training.strategy

    @property
    def round_timeout_s(self) -> float:
        """Seconds a round may take: the SLA's, else :data:`DEFAULT_ROUND_TIMEOUT_S`."""
        return float(self.training.round_timeout_s or DEFAULT_ROUND_TIMEOUT_S)

    @property
    def cycle_timeout_s(self) -> float:
        """Seconds the root gives a cluster aggregator per fit or evaluate call: a whole
        cycle, ``training_rounds * round_timeout_s + connect_timeout_s`` (every round at its
        timeout, plus the first cycle's wait for the cluster's learners)."""
        return self.training_rounds * self.round_timeout_s + self.connect_timeout_s

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "AggregatorConfig":
        """Read and check the ``FLOPS_*`` variables and the SLA. Raises :class:`ConfigError`."""
        read = EnvReader(env, ConfigError, "the orchestrator sets it when it starts an aggregator")
        role = _read_role(env)
        project_id, mqtt_url = read.status_target()
        address = read.host_port(
            env_vars.AGGREGATOR_ADDRESS,
            "the address the Flower server should bind, e.g. 0.0.0.0:8080",
        )
        mlflow_url = read.required(env_vars.MLFLOW_URL)
        if not mlflow_url.startswith(("http://", "https://")):
            raise ConfigError(f"{env_vars.MLFLOW_URL}={mlflow_url!r} is not http://HOST:PORT.")
        repo_dir = None if role is AggregatorRole.CLUSTER else read.repo_dir()
        document, sla = _read_sla(read.required(env_vars.SLA))
        logged_training = {
            **document.get("training_configuration", {}),
            "strategy": sla.training_configuration.strategy.model_dump(mode="json"),
        }
        return cls(
            project_id=project_id,
            mqtt_url=mqtt_url,
            address=address,
            mlflow_url=mlflow_url,
            repo_dir=repo_dir,
            sla={**document, "training_configuration": logged_training},
            customer_id=sla.customerID,
            flavor=sla.ml_model_flavor,
            training=sla.training_configuration,
            connect_timeout_s=read.seconds(env_vars.CONNECT_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S),
            straggler_notice_s=_notice_s(read),
            registered_model=(env.get(env_vars.REGISTERED_MODEL) or "").strip(),
            provenance=_read_provenance(env.get(env_vars.PROVENANCE)),
            role=role,
            **_role_fields(role, read),
            **_security_fields(role, env, project_id),
        )

    def training_settings(self) -> TrainingSettings:
        """The Flower server settings of a classic or a cluster aggregator (over learners,
        ``training_rounds`` rounds)."""
        return TrainingSettings(
            address=self.address,
            num_rounds=self.training_rounds,
            min_available_clients=self.training.min_available_clients,
            min_fit_clients=self.training.min_fit_clients,
            min_evaluate_clients=self.training.min_evaluate_clients,
            round_timeout_s=self.round_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            strategy=self.strategy,
            security=self.server_security,
            straggler_notice_s=self.straggler_notice_s,
        )

    def root_settings(self) -> TrainingSettings:
        """The Flower server settings of the root aggregator: ``training_cycles`` rounds
        over the cluster aggregators, every minimum :func:`root_clusters_needed`, and
        :attr:`cycle_timeout_s` per call; no straggler reports (a cluster aggregator answers
        only after its whole cycle; its own learners are reported by it)."""
        needed = root_clusters_needed(self.training, len(self.clusters))
        return TrainingSettings(
            address=self.address,
            num_rounds=self.training_cycles,
            min_available_clients=needed,
            min_fit_clients=needed,
            min_evaluate_clients=needed,
            round_timeout_s=self.cycle_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            strategy=self.strategy,
            security=self.server_security,
            clients_name="cluster aggregator",
            timeout_name="the cycle timeout",
            timeout_hint=(
                "a cycle may take training_rounds * round_timeout_s + FLOPS_CONNECT_TIMEOUT_S; "
                "raise round_timeout_s in the SLA if the clusters need longer"
            ),
            straggler_notice_s=0,
        )


def _notice_s(read: EnvReader) -> float | None:
    """``FLOPS_STRAGGLER_NOTICE_S`` (``None`` when unset). Raises :class:`ConfigError` for a
    negative value or not a number."""
    if not (read.env.get(STRAGGLER_NOTICE_ENV) or "").strip():
        return None
    seconds = read.seconds(STRAGGLER_NOTICE_ENV, 0.0)
    if seconds < 0:
        raise ConfigError(f"{STRAGGLER_NOTICE_ENV}={seconds:g} is negative; use 0 to turn off.")
    return seconds


def _read_provenance(raw: str | None) -> Provenance:
    """``FLOPS_PROVENANCE`` (empty when unset). Raises :class:`ConfigError` when it is not
    the JSON of a :class:`~flops_utils.contract.tracking.Provenance`."""
    if not (raw or "").strip():
        return Provenance()
    try:
        return Provenance.model_validate_json(str(raw))
    except ValidationError as exc:
        raise ConfigError(
            f"{env_vars.PROVENANCE} is not the manager's provenance JSON "
            f"({describe_validation_error(exc)})."
        ) from None


def _read_role(env: Mapping[str, str]) -> AggregatorRole:
    raw = (env.get(env_vars.AGGREGATOR_ROLE) or AggregatorRole.CLASSIC.value).strip().lower()
    try:
        return AggregatorRole(raw)
    except ValueError:
        choices = ", ".join(r.value for r in AggregatorRole)
        raise ConfigError(
            f"{env_vars.AGGREGATOR_ROLE}={raw!r} is not an aggregator role; use one of {choices}."
        ) from None


def _names(raw: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (raw or "").split(",") if name.strip())


def _role_fields(role: AggregatorRole, read: EnvReader) -> dict[str, Any]:
    """The role's own variables: ``FLOPS_CLUSTERS`` (root); ``FLOPS_CLUSTER``,
    ``FLOPS_ROOT_AGGREGATOR_ADDRESS`` and ``FLOPS_LEARNERS`` (cluster)."""
    if role is AggregatorRole.ROOT:
        clusters = _names(read.required(env_vars.CLUSTERS))
        if not clusters:
            raise ConfigError(f"{env_vars.CLUSTERS} names no cluster; e.g. cluster-a,cluster-b.")
        return {"clusters": clusters}
    if role is AggregatorRole.CLUSTER:
        return {
            "cluster": read.required(env_vars.CLUSTER),
            "root_address": read.host_port(
                env_vars.ROOT_AGGREGATOR_ADDRESS,
                "the root aggregator's Flower server address, e.g. 10.0.0.2:8080",
            ),
            "learners": _names(read.env.get(env_vars.LEARNERS)),
        }
    return {}


def _security_fields(
    role: AggregatorRole, env: Mapping[str, str], project_id: str
) -> dict[str, Any]:
    """``server_security`` for every role, ``root_security`` for a cluster aggregator (a
    client of the root, with the same CA and token). Raises :class:`ConfigError`."""
    try:
        fields: dict[str, Any] = {"server_security": ServerSecurity.from_env(env)}
        if role is AggregatorRole.CLUSTER:
            fields["root_security"] = ClientSecurity.from_env(env, project_id)
    except SecurityConfigError as exc:
        raise ConfigError(str(exc)) from None
    return fields


def _read_sla(raw: str) -> tuple[dict[str, Any], AggregatorSLA]:
    """``FLOPS_SLA`` as parsed JSON and as :class:`AggregatorSLA`. Raises
    :class:`ConfigError` naming the field path of every problem."""
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{env_vars.SLA} is not valid JSON ({exc}).") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{env_vars.SLA} must be a JSON object (the project's SLA).")
    try:
        return document, AggregatorSLA.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"SLA {describe_validation_error(exc)}.") from None
