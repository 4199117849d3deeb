"""The MQTT topic helpers, kept importable here; they live in :mod:`flops_utils.contract.topics`."""

from flops_utils.contract.topics import (
    ALL_STATUS_TOPICS,
    ROOT,
    ParsedTopic,
    parse_status_topic,
    status_topic,
)

__all__ = ["ALL_STATUS_TOPICS", "ROOT", "ParsedTopic", "parse_status_topic", "status_topic"]
