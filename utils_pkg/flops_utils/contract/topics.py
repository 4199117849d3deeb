"""MQTT topic layout: ``flops/<project_id>/<component>/<status>``."""

from dataclasses import dataclass

from flops_utils.types import Component, ComponentStatus

ROOT = "flops"
ALL_STATUS_TOPICS = f"{ROOT}/+/+/+"
"""Subscription filter matching every component status message of every project."""


def status_topic(project_id: str, component: Component, status: ComponentStatus) -> str:
    """Return the topic a component publishes a status on, e.g. ``flops/ab12/learner/failed``."""
    return f"{ROOT}/{project_id}/{component.value}/{status.value}"


@dataclass(frozen=True)
class ParsedTopic:
    """The three variable parts of a status topic."""

    project_id: str
    component: Component
    status: ComponentStatus


def parse_status_topic(topic: str) -> ParsedTopic | None:
    """Split a status topic into its parts; ``None`` when the topic is not a FLOps status topic."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != ROOT:
        return None
    try:
        return ParsedTopic(parts[1], Component(parts[2]), ComponentStatus(parts[3]))
    except ValueError:
        return None
