"""Service naming: the orchestrator's name of each service of a project.

The aggregator's service is ``aggregator``; a learner's is ``learner-<node_id>``. A status
message's ``component`` and ``instance`` map back to the same name (:func:`service_name`).
"""

from flops_utils.types import Component

AGGREGATOR_SERVICE = Component.AGGREGATOR.value
"""The aggregator's service name."""


def learner_service(node_id: str) -> str:
    """The service name of the learner on node ``node_id``: ``learner-<node_id>``."""
    return f"{Component.LEARNER.value}-{node_id}"


def service_name(component: Component, instance: str) -> str:
    """The service that publishes as ``component``/``instance``: ``aggregator`` for the
    aggregator, ``learner-<instance>`` for a learner (``instance`` empty or equal to the
    component's name means the component itself)."""
    return component.value if instance in ("", component.value) else f"{component.value}-{instance}"


def role_of(service: str) -> Component:
    """The role of service ``service`` (``aggregator`` or ``learner-…``); raises
    ``ValueError`` for a name no FLOps service has."""
    head = service.split("-", 1)[0]
    return Component(head)
