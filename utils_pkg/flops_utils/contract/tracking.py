"""What the manager and the aggregators agree on about a project's MLflow record.

- The registered model: one per customer and repository, :func:`registered_model_name`
  (``flops-<customer>-<repository name>``); each project adds a version tagged
  :data:`PROJECT_ID_TAG`. The manager picks the name (and, in an MLflow server with
  authentication, creates the model and grants the project's user on it) and passes it in
  ``FLOPS_REGISTERED_MODEL``.
- The provenance (:class:`Provenance`): what only the manager knows about a project (the
  repository and commit, the environment or images, the data each learner's node holds, the
  project's URL), passed as JSON in ``FLOPS_PROVENANCE`` and recorded by the top aggregator
  as tags and parameters of its run.
- The experiment kind: :data:`EXPERIMENT_KIND_TAG` set to :data:`MODEL_TRAINING_KIND` where
  the experiment is created, so MLflow's GUI treats it as model training, not GenAI.
"""

import hashlib
import re
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow's experiment tag naming the kind of experiment (MLflow 3's GUI,
``ExperimentKind`` in ``mlflow/server/js``)."""

MODEL_TRAINING_KIND = "custom_model_development"
"""The :data:`EXPERIMENT_KIND_TAG` value of model training (``ExperimentKind.
CUSTOM_MODEL_DEVELOPMENT``; the other kinds are ``genai_development``, ``finetuning``,
``no_inferred_type`` and ``empty``)."""

MODEL_TRAINING_GUI_QUERY = "workflowType=machine_learning"
"""The query MLflow 3.17's GUI needs in a link (``#/experiments/<id>/runs/<run>?...``) to open
on the model-training view: its navigation follows a workflow type taken from the link's
``workflowType`` or else the user's last choice (kept in the browser, ``genai`` at first),
not the experiment's :data:`EXPERIMENT_KIND_TAG` (``mlflow/server/js``, the
``workflowType`` context)."""

PROJECT_ID_TAG = "flops.project_id"
"""Tag of the experiment, the runs and each model version: the project id."""

REPO_URL_TAG = "flops.repo_url"
"""Tag of the run and the registered model: the repository URL without credentials."""

CUSTOMER_TAG = "flops.customer_id"
"""Tag of the run and the registered model: the project's customer."""

MODEL_NAME_PREFIX = "flops"
MAX_MODEL_NAME_PART = 64
"""Each of the customer and repository parts of a registered model name is cut to this."""

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def without_credentials(url: str) -> str:
    """``url`` without any user-info (``https://tok@host/r`` → ``https://host/r``); other
    forms (paths, scp-like ``git@host:repo``) come back as they are."""
    return _USERINFO.sub(r"\g<scheme>", url.strip())


def repo_identity(url: str) -> str:
    """The repository ``url`` normalised so that its spellings compare equal: no
    credentials, no trailing ``/`` or ``.git``, lower-case scheme and host."""
    text = without_credentials(url).rstrip("/")
    text = text[: -len(".git")] if text.endswith(".git") else text
    if "://" not in text:
        return text.rstrip("/")
    parts = urlsplit(text)
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, "")
    )


def repo_name(url: str) -> str:
    """The repository's name: the last path segment of ``url`` without ``.git``
    (``https://github.com/org/mnist.git`` → ``mnist``; ``git@host:org/mnist`` → ``mnist``;
    ``/srv/repos/mnist/`` → ``mnist``); ``repo`` when there is none."""
    identity = repo_identity(url)
    path = urlsplit(identity).path if "://" in identity else identity
    last = re.split(r"[/:\\]", path.rstrip("/"))[-1]
    return last or "repo"


def _name_part(text: str) -> str:
    """``text`` when it is ``[A-Za-z0-9_.-]{1,64}``, else its safe characters (runs of others
    become ``_``) and ``-`` and the first 8 hex digits of its SHA-256, so that two texts
    never share a part."""
    if _SAFE.match(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    cleaned = _UNSAFE_CHARS.sub("_", text).strip("_")[: MAX_MODEL_NAME_PART - 9]
    return f"{cleaned}-{digest}" if cleaned else digest


def registered_model_name(customer_id: str, repo_url: str, distinct: bool = False) -> str:
    """The registered model of ``customer_id``'s projects of the repository ``repo_url``:
    ``flops-<customer>-<repository name>`` (each part ``[A-Za-z0-9_.-]``, see
    :func:`_name_part`). Two customers with the same repository name get two models.
    ``distinct`` adds ``-`` and the first 8 hex digits of the SHA-256 of
    :func:`repo_identity`: the name for a second repository of the customer with the same
    name as one that already has the plain name."""
    name = f"{MODEL_NAME_PREFIX}-{_name_part(customer_id)}-{_name_part(repo_name(repo_url))}"
    if not distinct:
        return name
    return f"{name}-{hashlib.sha256(repo_identity(repo_url).encode()).hexdigest()[:8]}"


class Provenance(BaseModel):
    """What the manager knows about a project and hands to its aggregators as JSON in
    ``FLOPS_PROVENANCE``; every field is optional (an unknown value is left out of the record).

    ``repo_url``: the repository without credentials; ``repo_ref``: the SLA's branch, tag or
    commit; ``commit``: the commit built (git SHA, or a content hash of a directory);
    ``environment_key``: the builder's environment or image key; ``images``: role → image
    reference pinned by digest (``oci`` builder); ``versions``: distribution → version of the
    repository's environment; ``data``: node id → data tag → rows, for the SLA's tags on each
    learner's node; ``learners``: the learner names (node ids) deployed; ``project_url``: the
    project in the manager's API; ``manager_version``: the manager's FLOps version.
    """

    model_config = ConfigDict(extra="ignore")

    repo_url: str | None = None
    repo_ref: str | None = None
    commit: str | None = None
    environment_key: str | None = None
    images: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    data: dict[str, dict[str, int]] = Field(default_factory=dict)
    learners: list[str] = Field(default_factory=list)
    project_url: str | None = None
    manager_version: str | None = None
