"""The per-project credentials the manager issues to a project's services, and revokes when
the project ends (docs/security.md, "Credentials per project").

One :class:`ProjectCredentials` serves the manager: :meth:`ProjectCredentials.issue` gives a
deployment an :class:`IssuedCredentials`, which returns the environment variables of each
service (MQTT user and password; the Flower certificate authority, server certificate and
client token; the learner's data token and its data server's certificate). Each control is
off when ``FLOPS_INSECURE`` lists it; then the service gets no variable for it.
"""

import threading
from dataclasses import dataclass, field
from typing import Any

from flops_manager.data_access import DataAccess
from flops_manager.mlflow_access import MlflowAccessControl, NoMlflowAccess
from flops_manager.mqtt_access import MqttAccessControl, NoMqttAccess
from flops_manager.pki import FlowerCredentials, ProjectCA
from flops_utils.contract.services import experiment_name
from flops_utils.types import Component


@dataclass
class ProjectCredentials:
    """The manager's credential issuers; any may be absent (that control is off).

    Args:
        mqtt: grants per-service MQTT credentials (``NoMqttAccess`` with ``FLOPS_INSECURE=mqtt``).
        flower: the project CA (``None`` with ``FLOPS_INSECURE=flower``).
        data: the data-token issuer (``None`` with ``FLOPS_INSECURE=data``).
    """

    mqtt: MqttAccessControl
    flower: ProjectCA | None = None
    data: DataAccess | None = None
    mlflow: MlflowAccessControl = field(default_factory=NoMlflowAccess)
    _tracking: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)
    _issued: dict[str, FlowerCredentials] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _flower(self, project_id: str) -> FlowerCredentials | None:
        """The project's Flower credentials, issued at its first service: the aggregators'
        certificate and the learners' token must belong together."""
        if self.flower is None:
            return None
        with self._lock:
            issued = self._issued.get(project_id)
            if issued is None:
                issued = self._issued[project_id] = self.flower.issue_flower_credentials(project_id)
            return issued

    @classmethod
    def none(cls) -> "ProjectCredentials":
        """Every control off: services get no credential (component tests)."""
        return cls(NoMqttAccess())

    def learner(
        self, project_id: str, service: str, node: dict[str, Any], tags: list[str]
    ) -> dict[str, str]:
        """The environment variables of learner ``service`` on ``node`` (its stored node
        document) reading ``tags``. Raises the issuers' errors (``FlopsError``)."""
        env = self.mqtt.grant(project_id, service, Component.LEARNER)
        flower = self._flower(project_id)
        if flower is not None:
            env.update(flower.learner_env())
        if self.data is not None:
            env.update(self.data.learner_env(project_id, node, tags))
        return env

    def tracking(self, project_id: str, customer_id: str) -> dict[str, str]:
        """``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` of the project's MLflow user (EDIT on
        its experiment and registered model; the customer's user may READ both), created at
        the first call; empty with MLflow security off. After a manager restart the next call
        creates a new password (the old one stops working)."""
        with self._lock:
            env = self._tracking.get(project_id)
            if env is None:
                env = self.mlflow.project(project_id, experiment_name(project_id), customer_id)
                self._tracking[project_id] = env
            return dict(env)

    def aggregator(
        self, project_id: str, service: str, cluster: bool, customer_id: str
    ) -> dict[str, str]:
        """The environment variables of the aggregator ``service``: the classic or root one,
        or with ``cluster`` a cluster aggregator (a Flower server for its learners and a
        Flower client of the root), logging to MLflow as the project of ``customer_id``."""
        component = Component.CLUSTER_AGGREGATOR if cluster else Component.AGGREGATOR
        env = self.mqtt.grant(project_id, service, component)
        env.update(self.tracking(project_id, customer_id))
        flower = self._flower(project_id)
        if flower is not None:
            env.update(flower.aggregator_env())
        return env

    def builder(self, project_id: str, service: str) -> dict[str, str]:
        """The environment variables of an image builder run for ``project_id``."""
        return self.mqtt.grant(project_id, service, Component.BUILDER)

    def end_runs(self, project_id: str, status: str) -> list[str]:
        """End the project's MLflow runs still ``RUNNING`` with ``status`` (``FAILED`` or
        ``KILLED``); returns their ids."""
        return self.mlflow.end_runs(experiment_name(project_id), status)

    def revoke(self, project_id: str) -> None:
        """Withdraw every credential of ``project_id`` that can be withdrawn (MQTT, MLflow;
        the Flower certificate (7 days) and data tokens (24 h) expire on their own).
        Idempotent."""
        with self._lock:
            self._issued.pop(project_id, None)
            self._tracking.pop(project_id, None)
        self.mqtt.revoke(project_id)
        self.mlflow.revoke(project_id)
