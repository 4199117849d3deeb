"""The FLOps SLA as pydantic models: every field of the original FLOps SLA, same defaults.

Unknown keys are rejected (``extra="forbid"``) so that a typo fails with the field's path.

The training configuration and the strategy models live in
:mod:`flops_utils.contract.training` (the aggregator reads them there, without this module);
they are re-exported here.
"""

import re
import urllib.parse
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
from flops_utils.errors import FlopsError
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
    "LocalRepoNotAllowed",
    "Platform",
    "PostTrainingStep",
    "ProjectSLA",
    "ResourceConstraints",
    "StrategyConfig",
    "TrainingConfiguration",
    "check_repo_url",
    "is_local_repo_url",
    "repo_url_problem",
]

_URL_CHAR = r"[^\s\x00-\x1f\x7f]"
REPO_URL_PATTERN = (
    rf"^(?:(?:https?|ssh|git|file)://{_URL_CHAR}+"
    rf"|[^\s\x00-\x1f\x7f:]+(?::[^\s\x00-\x1f\x7f/]{_URL_CHAR}*)?)$"
)
"""``ml_repo_url``: an https/http/ssh/git/file URL, an scp-like ``user@host:path``, or a local
path; no whitespace or control characters."""


_REMOTE_SCHEMES = frozenset({"https", "http", "ssh", "git", "git+ssh", "ssh+git"})
_SCP_LIKE = re.compile(r"^(?:[\w.+-]+@)?[\w.-]+:(?!//)\S+$")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")


class LocalRepoNotAllowed(FlopsError):
    """``ml_repo_url`` names a directory of the manager's host (a path or ``file://`` URL),
    which only a caller allowed to read the host (an admin) may build from (HTTP 403, see
    :data:`flops_manager.errors.HTTP_STATUS`; this module imports no other manager module:
    the aggregator's image carries it)."""

    code = "ml_repo_url_not_allowed"


def repo_url_problem(url: str) -> str | None:
    """Why ``url`` (an ``ml_repo_url``) is malformed, or ``None``. Checked without touching
    the file system: URLs must parse (``https://[evil`` does not) and name a host, except
    ``file://``; a port must be a number in range."""
    text = url.strip()
    if "://" not in text:
        return None
    try:
        parsed = urllib.parse.urlsplit(text)
        parsed.port  # noqa: B018 - raises ValueError for a malformed or out-of-range port
    except ValueError as exc:
        return f"is not a well-formed URL ({exc})"
    scheme = parsed.scheme.lower()
    if scheme != "file" and not parsed.hostname:
        return "names no host"
    if scheme not in _REMOTE_SCHEMES and scheme != "file":
        return f"uses the unsupported scheme {scheme!r}"
    return None


_URL_AUTHORITY = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/]*)(?P<rest>.*)$"
)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` without the secret of its user-info, and that user-info: ``https://alice:tok@h/r``
    → ``("https://h/r", "alice:tok")``; a bare token of an http(s) URL (``https://tok@h/r``)
    too. URLs without a secret (``ssh://git@host/r``, ``git@host:r``, paths) come back as they
    are, with ``None``. The repository's credential is stored apart from the SLA, which views,
    logs and the aggregator's MLflow parameters show."""
    match = _URL_AUTHORITY.match(url)
    if match is None or "@" not in match["authority"]:
        return url, None
    userinfo, _, host = match["authority"].rpartition("@")
    is_http = match["scheme"].lower() in ("http://", "https://")
    if ":" not in userinfo and not is_http:
        return url, None
    return f"{match['scheme']}{host}{match['rest']}", userinfo


def with_userinfo(url: str, userinfo: str | None) -> str:
    """``url`` with ``userinfo`` put back (the inverse of :func:`split_userinfo`)."""
    match = _URL_AUTHORITY.match(url)
    if not userinfo or match is None:
        return url
    return f"{match['scheme']}{userinfo}@{match['authority']}{match['rest']}"


def is_local_repo_url(url: str) -> bool:
    """True when ``url`` names a directory of the manager's host: a ``file://`` URL or a path
    (anything that is neither a remote URL nor scp-like ``user@host:path``)."""
    text = url.strip()
    if "://" in text:
        return urllib.parse.urlsplit(text).scheme.lower() == "file"
    return text.startswith(("/", ".", "~")) or not _SCP_LIKE.match(text)


def check_repo_url(url: str, allow_local: bool) -> None:
    """Refuse an ``ml_repo_url`` on the manager's host unless ``allow_local``.

    Call it when accepting an SLA, with ``allow_local`` true for admins (and the embedded
    single-user manager): a customer could otherwise build from any directory the manager can
    read (``/proc/self/root/...``). Raises :class:`LocalRepoNotAllowed` (HTTP 403). The
    message carries the URL without credentials and nothing about the host's files.
    """
    if allow_local or not is_local_repo_url(url):
        return
    shown = _USERINFO.sub(r"\g<scheme>***@", url.strip())
    raise LocalRepoNotAllowed(
        f"ml_repo_url {shown!r} names a directory on the manager's host, which only an admin "
        "may build from; push the repository to a git server and give its https:// or "
        "ssh:// URL."
    )


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
        default_factory=lambda: [Platform.LINUX_AMD64], min_length=1, max_length=len(Platform)
    )
    training_configuration: TrainingConfiguration = Field(default_factory=TrainingConfiguration)
    post_training_steps: list[PostTrainingStep] = Field(
        default_factory=list, max_length=len(PostTrainingStep)
    )
    resource_constraints: ResourceConstraints = Field(default_factory=ResourceConstraints)

    @field_validator("ml_repo_url")
    @classmethod
    def _well_formed_repo_url(cls, value: str) -> str:
        """A URL that does not parse is a validation error (422), not a build failure."""
        problem = repo_url_problem(value)
        if problem is not None:
            raise ValueError(f"ml_repo_url {problem}")
        return value
