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
    """The project's top aggregator: the classic aggregator, or the root in hierarchical FL."""
    CLUSTER_AGGREGATOR = "cluster-aggregator"
    """Hierarchical FL: the aggregator of one cluster's learners (a client of the root)."""
    LEARNER = "learner"
    INFERENCE = "inference"


class ComponentStatus(StrEnum):
    """What a component reports about itself on ``flops/<project_id>/<component>/<status>``."""

    STARTED = "started"
    PROGRESS = "progress"
    SUCCESS = "success"
    FAILED = "failed"
