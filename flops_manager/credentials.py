"""The per-project credentials the manager issues to a project's services, and revokes when
the project ends (docs/security.md, "Credentials per project").

One :class:`ProjectCredentials` serves the manager: :meth:`ProjectCredentials.issue` gives a
deployment an :class:`IssuedCredentials`, which returns the environment variables of each
service (MQTT user and password; the Flower certificate authority, server certificate and
client token; the learner's data token and its data server's certificate). Each control is
off when ``FLOPS_INSECURE`` lists it; then the service gets no variable for it.
"""

from dataclasses import dataclass
from typing import Any, Protocol

from flops_manager.data_access import DataAccess
from flops_manager.mqtt_access import MqttAccessControl, NoMqttAccess
from flops_utils.types import Component


class FlowerIssuer(Protocol):
    """Issues a project's Flower credentials (:mod:`flops_manager.pki`)."""

    def aggregator_env(self, project_id: str) -> dict[str, str]: ...  # pragma: no cover

    def learner_env(self, project_id: str) -> dict[str, str]: ...  # pragma: no cover


@dataclass
class ProjectCredentials:
    """The manager's credential issuers; any may be absent (that control is off).

    Args:
        mqtt: grants per-service MQTT credentials (``NoMqttAccess`` with ``FLOPS_INSECURE=mqtt``).
        flower: the project CA (``None`` with ``FLOPS_INSECURE=flower``).
        data: the data-token issuer (``None`` with ``FLOPS_INSECURE=data``).
    """

    mqtt: MqttAccessControl
    flower: FlowerIssuer | None = None
    data: DataAccess | None = None

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
        if self.flower is not None:
            env.update(self.flower.learner_env(project_id))
        if self.data is not None:
            env.update(self.data.learner_env(project_id, node, tags))
        return env

    def aggregator(self, project_id: str, service: str, cluster: bool) -> dict[str, str]:
        """The environment variables of the aggregator ``service``: the classic or root one,
        or with ``cluster`` a cluster aggregator (a Flower server for its learners and a
        Flower client of the root)."""
        component = Component.CLUSTER_AGGREGATOR if cluster else Component.AGGREGATOR
        env = self.mqtt.grant(project_id, service, component)
        if self.flower is not None:
            env.update(self.flower.aggregator_env(project_id))
        return env

    def builder(self, project_id: str, service: str) -> dict[str, str]:
        """The environment variables of an image builder run for ``project_id``."""
        return self.mqtt.grant(project_id, service, Component.BUILDER)

    def revoke(self, project_id: str) -> None:
        """Withdraw every credential of ``project_id`` that can be withdrawn (MQTT; the
        Flower and data credentials expire on their own). Idempotent."""
        self.mqtt.revoke(project_id)
