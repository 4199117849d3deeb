"""The FLOps SLA as pydantic models: every field of the original FLOps SLA, same defaults.

Unknown keys are rejected (``extra="forbid"``) so that a typo fails with the field's path.
"""

from enum import StrEnum
from typing import Annotated, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from flops_utils.types import FLOpsMode, MLModelFlavor

TAG_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
"""Data tags: the rule the data servers enforce (lower case, digits, ``_.-``; 1-63 chars)."""

DataTag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]

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


class TrainingConfiguration(_Strict):
    """How training runs. ``training_rounds``: Flower rounds; ``training_cycles``: rounds of
    the root aggregator in hierarchical mode (each cycle runs ``training_rounds`` at the
    cluster aggregators)."""

    mode: FLOpsMode = FLOpsMode.CLASSIC
    data_tags: list[DataTag] = Field(default_factory=lambda: ["mnist"], min_length=1, max_length=64)
    training_cycles: int = Field(default=1, ge=1, le=1000)
    training_rounds: int = Field(default=3, ge=1, le=10000)
    min_available_clients: int = Field(default=1, ge=1, le=10000)
    min_fit_clients: int = Field(default=1, ge=1, le=10000)
    min_evaluate_clients: int = Field(default=1, ge=1, le=10000)
    round_timeout_s: float | None = Field(default=None, gt=0, le=86400)

    @model_validator(mode="after")
    def _client_counts(self) -> Self:
        for name in ("min_fit_clients", "min_evaluate_clients"):
            if getattr(self, name) > self.min_available_clients:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) exceeds min_available_clients "
                    f"({self.min_available_clients}); raise min_available_clients or lower it"
                )
        return self


class ResourceConstraints(_Strict):
    """Per-service resources: ``memory`` and ``storage`` in MB, ``vcpus`` a count."""

    memory: int = Field(default=2000, gt=0, le=1_048_576)
    vcpus: int = Field(default=1, gt=0, le=256)
    storage: int = Field(default=2000, ge=0, le=10_485_760)


class ProjectSLA(_Strict):
    """The SLA a user POSTs to ``/api/flops/projects`` (DESIGN.md §3)."""

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
