"""Service naming: the orchestrator's name of each service of a project.

The top aggregator's service is ``aggregator`` (the classic aggregator, or the root aggregator
in hierarchical FL); a cluster aggregator's is ``cluster-aggregator-<cluster>``; a learner's is
``learner-<node_id>``. A status message's ``component`` and ``instance`` map back to the same
name (:func:`service_name`).
"""

from flops_utils.types import Component

AGGREGATOR_SERVICE = Component.AGGREGATOR.value
"""The top aggregator's service name (classic or root)."""


def learner_service(node_id: str) -> str:
    """The service name of the learner on node ``node_id``: ``learner-<node_id>``."""
    return f"{Component.LEARNER.value}-{node_id}"


def cluster_aggregator_service(cluster: str) -> str:
    """The service name of cluster ``cluster``'s aggregator: ``cluster-aggregator-<cluster>``."""
    return f"{Component.CLUSTER_AGGREGATOR.value}-{cluster}"


def service_name(component: Component, instance: str) -> str:
    """The service that publishes as ``component``/``instance``: ``aggregator`` for the
    aggregator, ``learner-<instance>`` for a learner, ``cluster-aggregator-<instance>`` for a
    cluster aggregator (``instance`` empty or equal to the component's name means the
    component itself)."""
    return component.value if instance in ("", component.value) else f"{component.value}-{instance}"


def role_of(service: str) -> Component:
    """The role of service ``service`` (``aggregator``, ``cluster-aggregator-…`` or
    ``learner-…``); raises ``ValueError`` for a name no FLOps service has."""
    for component in sorted(Component, key=lambda c: -len(c.value)):
        if service == component.value or service.startswith(f"{component.value}-"):
            return component
    raise ValueError(f"{service!r} is not a FLOps service name")


def instance_of(service: str) -> str:
    """The part of ``service`` after its role (the node id, the cluster); empty for the
    aggregator. Raises ``ValueError`` like :func:`role_of`."""
    return service[len(role_of(service).value) + 1 :]


def experiment_name(project_id: str) -> str:
    """The MLflow experiment (and registered model) name of a project: ``flops-<project_id>``."""
    return f"flops-{project_id}"
