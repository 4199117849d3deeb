"""What an aggregator's MLflow run records beyond the aggregated ``loss``/``accuracy``: each
client's results per round, the participants and lost clients, and the project's provenance.

Per-client metrics are learner-prefixed metrics of the aggregator's own run, at ``step =
round`` (the global step in a cluster aggregator's run): ``learner.<name>/fit_examples``,
``learner.<name>/fit_seconds`` (and any other number the learner returns from ``fit``),
``learner.<name>/evaluate_examples``, ``learner.<name>/loss``, ``learner.<name>/accuracy``
(and any other number from ``evaluate``). The root aggregator's clients are the cluster
aggregators: ``cluster.<name>/...``. Prefixed metrics, not child runs: MLflow's GUI groups a
run's charts into sections by the part of the key before the first ``/``
(``mlflow/server/js``, the run page's auto-generated sections), so each learner gets its own
section of charts on the run's page; the run stays one run per project (cluster child runs
in hierarchical FL keep that meaning); and nothing is left ``RUNNING`` when a learner dies.

Per round, unprefixed: ``learners`` (clients that returned training results),
``lost_learners`` (expected clients without results), ``fit_examples``,
``evaluate_examples``, ``round_seconds``. The tags ``flops.participants`` and
``flops.lost_learners`` list (comma-separated, sorted) every client that took part in some
round, and every one lost in some round.

Provenance (:func:`provenance_tags`, :func:`provenance_params`): from the manager's
:class:`~flops_utils.contract.tracking.Provenance` and this process's versions. A value
nobody knows is left out (never the string ``"None"``).
"""

import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.flower_server import ClientRound, RoundResult
from flops_utils.contract.tracking import (
    CUSTOMER_TAG,
    REPO_URL_TAG,
    Provenance,
    without_credentials,
)

PARTICIPANTS_TAG = "flops.participants"
"""Run tag: every client that returned training results in some round, comma-separated."""

LOST_TAG = "flops.lost_learners"
"""Run tag: every expected client without results in some round, comma-separated."""

PROJECT_URL_TAG = "flops.project_url"
"""Run tag: the project in the manager's API."""

NOTE_TAG = "mlflow.note.content"
"""MLflow's run description (Markdown), shown at the top of the run's page."""

DISTRIBUTIONS = {"flops": "flops", "flower": "flwr", "mlflow": "mlflow"}
"""Tag/parameter name → the distribution whose version this process records."""

MAX_TAG_VALUE_LENGTH = 8000
"""MLflow's limit on tag values (``mlflow.utils.validation.MAX_TAG_VAL_LENGTH``)."""

_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-. :]+")


def client_prefix(clients_name: str) -> str:
    """The metric prefix of a server's clients: ``learner``, or ``cluster`` for the root's
    cluster aggregators (the first word of ``clients_name``, which is then the other one)."""
    return "learner" if clients_name == "learner" else clients_name.split()[0]


def metric_key(prefix: str, name: str, metric: str) -> str:
    """``<prefix>.<name>/<metric>``, with characters MLflow refuses in a metric key (it
    takes letters, digits, ``_ - . / : `` and space) in ``name`` and ``metric`` replaced by
    ``_``."""
    return f"{prefix}.{_UNSAFE_KEY.sub('_', name)}/{_UNSAFE_KEY.sub('_', metric)}"


def client_metrics(prefix: str, client: ClientRound) -> dict[str, float]:
    """The metrics of one client's round (see the module docstring); a fit metric whose
    name does not start with ``fit_`` gets that prefix (``fit_loss``)."""
    metrics: dict[str, float] = {}
    if client.fit_examples is not None:
        metrics[metric_key(prefix, client.name, "fit_examples")] = float(client.fit_examples)
    for key, value in client.fit_metrics.items():
        name = key if key.startswith("fit_") else f"fit_{key}"
        metrics[metric_key(prefix, client.name, name)] = value
    if client.evaluate_examples is not None:
        examples = float(client.evaluate_examples)
        metrics[metric_key(prefix, client.name, "evaluate_examples")] = examples
    if client.loss is not None:
        metrics[metric_key(prefix, client.name, "loss")] = client.loss
    for key, value in client.evaluate_metrics.items():
        metrics.setdefault(metric_key(prefix, client.name, key), value)
    return metrics


@dataclass
class Participation:
    """The clients of a training: ``expected`` (names that should take part, e.g. the
    deployed learners; empty: unknown), and, as rounds are recorded, ``participants`` and
    ``lost`` over all rounds."""

    expected: frozenset[str] = frozenset()
    participants: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)

    def record(self, result: RoundResult) -> list[str]:
        """Add ``result``'s clients; returns the round's lost clients (sorted): the expected
        ones without training results and the dropped ones."""
        took_part = {c.name for c in result.clients if c.fit_examples is not None}
        lost = (set(self.expected) - took_part) | set(result.dropped)
        self.participants |= took_part
        self.lost |= lost
        return sorted(lost)

    def tags(self) -> dict[str, str]:
        """:data:`PARTICIPANTS_TAG` and, once someone was lost, :data:`LOST_TAG`."""
        tags = {PARTICIPANTS_TAG: _joined(self.participants)}
        if self.lost:
            tags[LOST_TAG] = _joined(self.lost)
        return tags


def _joined(names: Iterable[str]) -> str:
    return ",".join(sorted(names))[:MAX_TAG_VALUE_LENGTH]


def round_metrics(result: RoundResult, prefix: str, lost: list[str]) -> dict[str, float]:
    """Every metric of a finished round (step = the round): the aggregated ``loss`` and
    ``accuracy`` (when known), the round's counts (``learners``, ``lost_learners``,
    ``fit_examples``, ``evaluate_examples``), ``round_seconds``, and each client's
    :func:`client_metrics` under ``prefix``."""
    metrics: dict[str, float] = {"loss": float(result.loss)}
    if result.accuracy is not None:
        metrics["accuracy"] = float(result.accuracy)
    metrics.update(
        {
            "learners": float(sum(1 for c in result.clients if c.fit_examples is not None)),
            "lost_learners": float(len(lost)),
            "fit_examples": float(result.fit_examples),
            "evaluate_examples": float(result.evaluate_examples),
            "round_seconds": float(result.seconds),
        }
    )
    for client in result.clients:
        metrics.update(client_metrics(prefix, client))
    return metrics


def software_versions() -> dict[str, str]:
    """``{"flops": ..., "flower": ..., "mlflow": ...}``: the installed versions of this
    process's distributions (:data:`DISTRIBUTIONS`); one that is not installed is left out."""
    versions = {}
    for name, distribution in DISTRIBUTIONS.items():
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def provenance_tags(
    project_id: str,
    customer_id: str,
    provenance: Provenance,
    strategy: str,
    versions: Mapping[str, str],
) -> dict[str, str]:
    """The run's provenance tags: ``flops.customer_id``, ``flops.strategy``, ``flops.repo_url``
    (without credentials) and MLflow's ``mlflow.source.git.repoURL``, ``flops.commit`` and
    (for a git SHA, not a directory's content hash) ``mlflow.source.git.commit``,
    ``flops.repo_ref``, ``flops.environment_key``,
    ``flops.image.<role>``, ``flops.<name>_version`` for ``versions``,
    ``flops.manager_version``, :data:`PROJECT_URL_TAG` and a :data:`NOTE_TAG` describing the
    project; unknown values are left out."""
    tags = {CUSTOMER_TAG: customer_id, "flops.strategy": strategy}
    repo_url = without_credentials(provenance.repo_url) if provenance.repo_url else None
    known: dict[str, str | None] = {
        REPO_URL_TAG: repo_url,
        "mlflow.source.git.repoURL": repo_url,
        "flops.commit": provenance.commit,
        "mlflow.source.git.commit": provenance.commit if _is_git_sha(provenance.commit) else None,
        "flops.repo_ref": provenance.repo_ref,
        "flops.environment_key": provenance.environment_key,
        "flops.manager_version": provenance.manager_version,
        PROJECT_URL_TAG: provenance.project_url,
        **{f"flops.image.{role}": ref for role, ref in provenance.images.items()},
        **{f"flops.{name}_version": version for name, version in versions.items()},
    }
    tags.update({k: v for k, v in known.items() if v})
    tags[NOTE_TAG] = _note(project_id, repo_url, provenance)
    return tags


def _is_git_sha(commit: str | None) -> bool:
    """Whether ``commit`` is a git commit id (40 hex digits)."""
    return commit is not None and re.fullmatch(r"[0-9a-f]{40}", commit) is not None


def _note(project_id: str, repo_url: str | None, provenance: Provenance) -> str:
    """The run's description: the project (a link when its URL is known), the repository
    and the commit."""
    project = f"[{project_id}]({provenance.project_url})" if provenance.project_url else project_id
    lines = [f"FLOps project {project}."]
    if repo_url:
        at = f" at commit `{provenance.commit}`" if provenance.commit else ""
        lines.append(f"Repository `{repo_url}`{at}.")
    if provenance.data:
        rows = ", ".join(
            f"{node}: {sum(tags.values())} rows" for node, tags in sorted(provenance.data.items())
        )
        lines.append(f"Data: {rows}.")
    return "\n\n".join(lines)


def provenance_params(provenance: Provenance, versions: Mapping[str, str]) -> dict[str, Any]:
    """The run's provenance parameters: ``data.<tag>.<node>.rows`` per learner's node and
    data tag, ``data.rows`` (their sum), ``learners`` (comma-separated), ``environment.key``,
    ``environment.image.<role>``, ``environment.versions.<distribution>`` (the repository's
    environment), ``commit`` and ``<name>_version`` for ``versions``; unknown values are
    left out."""
    params: dict[str, Any] = {}
    for node, tags in sorted(provenance.data.items()):
        for tag, rows in sorted(tags.items()):
            params[f"data.{tag}.{node}.rows"] = rows
    if provenance.data:
        params["data.rows"] = sum(sum(t.values()) for t in provenance.data.values())
    if provenance.learners:
        params["learners"] = ",".join(sorted(provenance.learners))
    if provenance.commit:
        params["commit"] = provenance.commit
    if provenance.environment_key:
        params["environment.key"] = provenance.environment_key
    for role, ref in sorted(provenance.images.items()):
        params[f"environment.image.{role}"] = ref
    for distribution, version in sorted(provenance.versions.items()):
        params[f"environment.versions.{distribution}"] = version
    for name, version in versions.items():
        params[f"{name}_version"] = version
    return params
