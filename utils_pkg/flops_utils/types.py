"""Shared enumerations: ML model flavors, FL modes, component names and statuses."""

from enum import StrEnum


class MLModelFlavor(StrEnum):
    """The ML library a repository's model is written with; selects the MLflow flavor."""

    SKLEARN = "sklearn"
    PYTORCH = "pytorch"
    TENSORFLOW = "tensorflow"
    KERAS = "keras"


class FLOpsMode(StrEnum):
    """Classic FL (one aggregator) or hierarchical FL (root + cluster aggregators)."""

    CLASSIC = "classic"
    HIERARCHICAL = "hierarchical"


class Component(StrEnum):
    """A FLOps runtime component that reports its status over MQTT."""

    BUILDER = "builder"
    AGGREGATOR = "aggregator"
    LEARNER = "learner"
    INFERENCE = "inference"


class ComponentStatus(StrEnum):
    """What a component reports about itself on ``flops/<project_id>/<component>/<status>``."""

    STARTED = "started"
    PROGRESS = "progress"
    SUCCESS = "success"
    FAILED = "failed"
