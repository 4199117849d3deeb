"""The FLOps SLA as pydantic models: every field of the original FLOps SLA, same defaults.

Unknown keys are rejected (``extra="forbid"``) so that a typo fails with the field's path.

The training configuration and the strategy models live in
:mod:`flops_utils.contract.training` (the aggregator reads them there, without this module);
they are re-exported here.
"""

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from flops_utils.contract.training import (
    DEFAULT_STRATEGY,
    STRATEGY_ADAPTER,
    STRATEGY_NAMES,
    TAG_PATTERN,
    DataTag,
    FedAdagradConfig,
    FedAdamConfig,
    FedAvgConfig,
    FedMedianConfig,
    FedProxConfig,
    FedTrimmedAvgConfig,
    FedYogiConfig,
    StrategyConfig,
    TrainingConfiguration,
)
from flops_utils.types import MLModelFlavor

__all__ = [
    "DEFAULT_STRATEGY",
    "REPO_URL_PATTERN",
    "STRATEGY_ADAPTER",
    "STRATEGY_NAMES",
    "TAG_PATTERN",
    "DataTag",
    "FedAdagradConfig",
    "FedAdamConfig",
    "FedAvgConfig",
    "FedMedianConfig",
    "FedProxConfig",
    "FedTrimmedAvgConfig",
    "FedYogiConfig",
    "Platform",
    "PostTrainingStep",
    "ProjectSLA",
    "ResourceConstraints",
    "StrategyConfig",
    "TrainingConfiguration",
]

_URL_CHAR = r"[^\s\x00-\x1f\x7f]"
REPO_URL_PATTERN = (
    rf"^(?:(?:https?|ssh|git|file)://{_URL_CHAR}+"
    rf"|[^\s\x00-\x1f\x7f:]+(?::[^\s\x00-\x1f\x7f/]{_URL_CHAR}*)?)$"
)
"""``ml_repo_url``: an https/http/ssh/git/file URL, an scp-like ``user@host:path``, or a local
path; no whitespace or control characters."""


class Platform(StrEnum):
    """Target platforms FLOps can build for."""

    LINUX_AMD64 = "linux/amd64"
    LINUX_ARM64 = "linux/arm64"


class PostTrainingStep(StrEnum):
    """Optional steps after training."""

    BUILD_IMAGE_FOR_TRAINED_MODEL = "build_image_for_trained_model"
    DEPLOY_TRAINED_MODEL_IMAGE = "deploy_trained_model_image"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourceConstraints(_Strict):
    """Per-service resources: ``memory`` and ``storage`` in MB, ``vcpus`` a count."""

    memory: int = Field(default=2000, gt=0, le=1_048_576)
    vcpus: int = Field(default=1, gt=0, le=256)
    storage: int = Field(default=2000, ge=0, le=10_485_760)


class ProjectSLA(_Strict):
    """The SLA a user POSTs to ``/api/flops/projects``."""

    customerID: str = Field(default="Admin", min_length=1, max_length=64)
    verbose: bool = False
    ml_repo_url: str = Field(pattern=REPO_URL_PATTERN, max_length=2048)
    ml_repo_ref: str | None = Field(default=None, max_length=256)
    ml_model_flavor: MLModelFlavor = MLModelFlavor.PYTORCH
    use_devel_base_images: bool = False
    supported_platforms: list[Platform] = Field(
        default_factory=lambda: [Platform.LINUX_AMD64], min_length=1
    )
    training_configuration: TrainingConfiguration = Field(default_factory=TrainingConfiguration)
    post_training_steps: list[PostTrainingStep] = Field(default_factory=list)
    resource_constraints: ResourceConstraints = Field(default_factory=ResourceConstraints)
