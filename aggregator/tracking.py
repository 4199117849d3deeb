"""MLflow tracking for the aggregators: one run per project, metrics per round, the model.

Layout in the tracking server: experiment ``flops-<project_id>`` (tag ``mlflow.experimentKind
= custom_model_development``: MLflow's GUI shows it as model training), one run named
``flops-<project_id>`` holding the SLA flattened as parameters (``training_configuration.
training_rounds`` etc.) and the provenance (:mod:`aggregator.run_record`), the metrics
``loss`` and ``accuracy``, the round's counts and each learner's results with ``step =
round``, and the final global model logged with the repository's flavor and registered as a
new version (tagged ``flops.project_id``) of the registered model the manager chose
(``FLOPS_REGISTERED_MODEL``: one per customer and repository, default ``flops-<project_id>``).
In hierarchical FL that run is the root aggregator's (``step = cycle``), and each cluster
aggregator adds a child run ``flops-<project_id>-<cluster>`` (tag ``mlflow.parentRunId``) with
``step = (cycle - 1) * training_rounds + round``.

MLflow is imported lazily (it takes seconds). The aggregator talks to the tracking server
over HTTP only (the server proxies artifacts), and telemetry is switched off so MLflow never
tries the internet.
"""

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from flops_utils.contract.services import experiment_name
from flops_utils.contract.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    PROJECT_ID_TAG,
)
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.types import MLModelFlavor

HTTP_MAX_RETRIES = 5
HTTP_BACKOFF_FACTOR_S = 2
HTTP_BACKOFF_JITTER_S = 1.0
HTTP_TIMEOUT_S = 20
"""The MLflow client's retries of a request the tracking server does not answer (refused
connection, reset, read timeout, 5xx), as ``MLFLOW_HTTP_REQUEST_*`` defaults (a value set in
the environment wins). MLflow 3 hands them to urllib3 2's ``Retry``
(``mlflow.utils.request_utils``), which sleeps 0 s before the first retry and
``backoff_factor * 2 ** (n - 1)`` (+ up to ``backoff_jitter``, at most 120 s) before retry
``n >= 2``: 0, 4, 8, 16, 32 s here, so a request is tried for about a minute
(:func:`retry_window_s`: 60 s plus up to 5 s of jitter) before it fails. That rides out a
restart of the server (the manager restarts a crashed embedded server on its port within
about 30 s) and lets a dead server fail a project after about a minute, not the 4 minutes of
MLflow's defaults (7 retries, factor 2). A server that accepts connections but never answers
also costs ``HTTP_TIMEOUT_S`` (seconds without a byte, per attempt) for each of the 6
attempts: 3 minutes at most."""


def retry_window_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds of back-off before a request the server never answers fails (without
    jitter): ``factor * (2 ** retries - 2)`` with the ``MLFLOW_HTTP_REQUEST_*`` values in
    ``env`` (default ``os.environ``); 60 s with this module's defaults."""
    env = os.environ if env is None else env
    try:
        retries = int(env.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_MAX_RETRIES))
        factor = float(env.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", HTTP_BACKOFF_FACTOR_S))
    except ValueError:
        retries, factor = HTTP_MAX_RETRIES, HTTP_BACKOFF_FACTOR_S
    return float(factor * max(2**retries - 2, 0))


for _name, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(HTTP_MAX_RETRIES),
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(HTTP_BACKOFF_FACTOR_S),
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": str(HTTP_BACKOFF_JITTER_S),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S),
    # The aggregator's working directory may be any uv project (FLOps' own, in development);
    # its lock file has nothing to do with the user's model.
    "MLFLOW_UV_AUTO_DETECT": "false",
}.items():
    os.environ.setdefault(_name, _value)

MAX_PARAM_KEY_LENGTH = 250
"""MLflow's limit on parameter names (``mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH``)."""

MAX_PARAM_VALUE_LENGTH = 6000
"""MLflow's limit on parameter values (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``)."""

PARAMS_PER_BATCH = 100
"""MLflow accepts at most 100 parameters per ``log_batch`` call."""

METRICS_PER_BATCH = 1000
"""MLflow accepts at most 1000 metrics per ``log_batch`` call."""

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
"""How an MLflow run can end."""

MODEL_NAME = "model"
"""Name of the logged model inside the run."""


TRACKING_UNREACHABLE_CAUSE = "tracking_server_unreachable"
"""``data.cause`` of the aggregator's ``failed`` message when the MLflow tracking server did
not answer (as opposed to rejecting a request)."""


class TrackingError(FlopsError):
    """The MLflow tracking server is unreachable or rejected a request; ``cause`` is
    :data:`TRACKING_UNREACHABLE_CAUSE` when it did not answer, else ``None``."""

    code = "tracking_error"
    cause: str | None = None


def public_url(url: str) -> str:
    """``url`` without a user name or password (safe for messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


_CREDENTIALS_IN_URL = re.compile(r"(\w+://)[^/\s@]+@")
_SOCKET_ERROR = re.compile(r"\[Errno -?\d+\] ([^'\"()]+)")
_READ_TIMEOUT = re.compile(r"Read timed out\. \(read timeout=[\d.]+\)")
_UNANSWERED_MARKERS = ("Max retries exceeded", "Connection aborted", "RemoteDisconnected")


def unanswered_reason(exc: BaseException) -> str | None:
    """Why the server did not answer, when ``exc`` (or its cause/context) says it did not:
    a socket error (``Connection refused``), a read timeout, or retries exhausted on 5xx
    answers. ``None`` when the server answered (it rejected the request, say)."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 5:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(texts)
    for pattern in (_SOCKET_ERROR, _READ_TIMEOUT):
        found = pattern.search(text)
        if found:
            return found.group(found.lastindex or 0).strip()
    if any(marker in text for marker in _UNANSWERED_MARKERS):
        return "no usable answer after every retry"
    return None


class ModelLoggingError(FlopsError):
    """The final model could not be logged with the SLA's flavor."""

    code = "model_logging_error"


@dataclass(frozen=True)
class LoggedModel:
    """Where the final model went: ``model_uri`` (``models:/m-...``, loadable with
    ``mlflow.pyfunc.load_model``), the registered model's name and version, and
    ``registered_model_uri`` (``models:/<name>/<version>``)."""

    model_uri: str
    registered_model: str
    version: int
    registered_model_uri: str


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into MLflow parameters.

    Nested keys are joined with ``.`` (``training_configuration.training_rounds``); lists
    become JSON strings; ``None`` values (unset) are left out. Keys longer than
    :data:`MAX_PARAM_KEY_LENGTH` and values longer than :data:`MAX_PARAM_VALUE_LENGTH` are
    cut (values end with ``...`` then).
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if value is None:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, list | tuple):
            text = json.dumps(list(value), default=str)
        elif isinstance(value, Enum):
            text = str(value.value)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        flat[name[:MAX_PARAM_KEY_LENGTH]] = text
    return flat


class MlflowTracker:
    """Logs one project's training to an MLflow tracking server.

    Args:
        tracking_url: ``http://HOST:PORT`` of the tracking server.
        project_id: the project; names the experiment and the run.
        registered_model: the registered model the final model becomes a version of;
            default (empty): the experiment's name.

    Call :meth:`check_reachable`, :meth:`start_run`, :meth:`log_round` (or
    :meth:`log_metrics`) per round, :meth:`log_saved_model`, then :meth:`end_run`. Every
    method raises :class:`TrackingError` when the server fails (the message names the URL).
    """

    def __init__(self, tracking_url: str, project_id: str, registered_model: str = "") -> None:
        self.tracking_url = tracking_url.rstrip("/")
        self.project_id = project_id
        self.name = experiment_name(project_id)
        self.registered_model = registered_model or self.name
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._ended = False
        self._unanswered = False
        self._client: Any = None

    def check_reachable(self, timeout_s: float = 10.0) -> None:
        """Check that ``GET /health`` answers within ``timeout_s`` seconds.

        Raises :class:`TrackingError` naming the URL otherwise.
        """
        try:
            with urllib.request.urlopen(f"{self.tracking_url}/health", timeout=timeout_s) as r:
                if int(r.status) == 200:
                    return
                problem = f"HTTP {r.status}"
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", exc)
            problem = str(getattr(reason, "strerror", None) or reason)
        error = TrackingError(
            f"the MLflow tracking server at {public_url(self.tracking_url)} did not answer: "
            f"{problem}; start it (flops-observatory) or fix FLOPS_MLFLOW_URL."
        )
        error.cause = TRACKING_UNREACHABLE_CAUSE
        raise error

    def _answers(self, timeout_s: float = 3.0) -> bool:
        """Whether ``GET /health`` answers 200 now (one try, no retries)."""
        try:
            self.check_reachable(timeout_s)
        except TrackingError:
            return False
        return True

    def prepare(self) -> None:
        """Import MLflow and create its client now (the import takes seconds), so that the
        first :meth:`start_run` does not pay for it."""
        self._mlflow_client()

    def _mlflow_client(self) -> Any:
        if self._client is None:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_url)
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_url)
        return self._client

    def start_run(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        run_name: str | None = None,
    ) -> str:
        """Create (or reuse) the experiment and start a run in it (default name: the
        experiment's, ``flops-<project_id>``).

        ``params`` (e.g. the SLA) is flattened with :func:`flatten_params`; ``tags`` are set
        on the run (``mlflow.parentRunId`` nests it under another run). A new experiment gets
        the tags ``flops.project_id`` and ``mlflow.experimentKind`` (model training). Returns
        the run id.
        """
        from mlflow.entities import Param

        client = self._mlflow_client()
        try:
            experiment = client.get_experiment_by_name(self.name)
            if experiment is None:
                self.experiment_id = client.create_experiment(
                    self.name,
                    tags={
                        PROJECT_ID_TAG: self.project_id,
                        EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
                    },
                )
            else:
                self.experiment_id = experiment.experiment_id
            run = client.create_run(
                self.experiment_id,
                run_name=run_name or self.name,
                tags={PROJECT_ID_TAG: self.project_id, **(tags or {})},
            )
            self.run_id = run.info.run_id
            flat = [Param(k, v) for k, v in flatten_params(params).items()]
            for start in range(0, len(flat), PARAMS_PER_BATCH):
                client.log_batch(self.run_id, params=flat[start : start + PARAMS_PER_BATCH])
        except Exception as exc:
            raise self._error("start the run", exc) from exc
        logger.info("MLflow run %s in experiment %s", self.run_id, self.name)
        return str(self.run_id)

    def log_round(self, server_round: int, loss: float, accuracy: float | None) -> None:
        """Log ``loss`` and ``accuracy`` (if known) with ``step = server_round``."""
        metrics = {"loss": float(loss)}
        if accuracy is not None:
            metrics["accuracy"] = float(accuracy)
        self.log_metrics(server_round, metrics)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log ``metrics`` (name to value) with ``step``, in batches of
        :data:`METRICS_PER_BATCH`."""
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        batch = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]
        try:
            run_id = self._require_run()
            for start in range(0, len(batch), METRICS_PER_BATCH):
                chunk = batch[start : start + METRICS_PER_BATCH]
                self._mlflow_client().log_batch(run_id, metrics=chunk)
        except TrackingError:
            raise
        except Exception as exc:
            raise self._error(f"log step {step}", exc) from exc

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) the run's ``tags``."""
        from mlflow.entities import RunTag

        try:
            run_id = self._require_run()
            batch = [RunTag(k, v) for k, v in tags.items()]
            if batch:
                self._mlflow_client().log_batch(run_id, tags=batch)
        except TrackingError:
            raise
        except Exception as exc:
            raise self._error("set the run's tags", exc) from exc

    def log_saved_model(
        self,
        model_dir: Path,
        flavor: MLModelFlavor,
        step: int = 0,
        saved_with: Mapping[str, Any] | None = None,
        model_tags: Mapping[str, str] | None = None,
    ) -> LoggedModel:
        """Upload a model directory saved by MLflow and register it as a new version of
        :attr:`registered_model`, tagged ``flops.project_id`` and ``flops.run_id``.

        The model worker saved ``model_dir`` (an ``MLmodel`` file and the flavor's files) with
        the MLflow of the repository's environment; this uploads it as a logged model of the
        run (MLflow 3's ``LoggedModel``: created with the run as its source, artifacts
        uploaded, finalized ``READY``, the way ``mlflow.<flavor>.log_model`` does it) and
        registers a new version of the registered model.

        Args:
            model_dir: the saved model directory.
            flavor: the SLA's ``ml_model_flavor`` (a tag of the logged model).
            step: the round the model belongs to (a tag, linking it to that round's metrics).
            saved_with: what the worker reported (e.g. ``{"mlflow_version": "2.12.1"}``),
                kept as ``flops.saved_with.*`` tags.
            model_tags: tags set on the registered model itself (e.g. the repository).

        Returns the :class:`LoggedModel`. Raises :class:`ModelLoggingError` when
        ``model_dir`` holds no ``MLmodel`` and :class:`TrackingError` when the server fails.
        """
        if not (model_dir / "MLmodel").is_file():
            raise ModelLoggingError(
                "The model worker reported the model saved, but it wrote no MLmodel file; "
                "check the MLflow installed in the repository's environment."
            )
        run_id = self._require_run()
        client = self._mlflow_client()
        tags = {
            "flops.flavor": flavor.value,
            "flops.round": str(step),
            **{f"flops.saved_with.{k}": str(v) for k, v in (saved_with or {}).items()},
        }
        try:
            import mlflow

            model = client.create_logged_model(
                str(self.experiment_id), name=MODEL_NAME, source_run_id=run_id, tags=tags
            )
            try:
                client.log_model_artifacts(model.model_id, str(model_dir))
            except Exception:
                client.finalize_logged_model(model.model_id, "FAILED")
                raise
            client.finalize_logged_model(model.model_id, "READY")
            model_uri = f"models:/{model.model_id}"
            name = self.registered_model
            version_tags = {PROJECT_ID_TAG: self.project_id, "flops.run_id": run_id}
            version = mlflow.register_model(
                model_uri, name, await_registration_for=60, tags=version_tags
            )
            for key, value in (model_tags or {}).items():
                client.set_registered_model_tag(name, key, value)
        except Exception as exc:
            raise self._error("log the model", exc) from exc
        logged = LoggedModel(
            model_uri=model_uri,
            registered_model=name,
            version=int(version.version),
            registered_model_uri=f"models:/{name}/{version.version}",
        )
        logger.info(
            "model logged as %s, registered %s", logged.model_uri, logged.registered_model_uri
        )
        return logged

    def end_run(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``status``; a no-op without a run or when already ended.

        After a request the server did not answer, it tries only if ``/health`` answers now
        (instead of retrying for another minute). Never raises (a failure is logged).
        """
        run_id = self.run_id
        if run_id is None or self._ended:
            return
        self._ended = True
        if self._unanswered and not self._answers():
            logger.warning(
                "MLflow run %s not ended (%s): the tracking server does not answer; the "
                "manager ends the runs of failed projects",
                run_id,
                status,
            )
            return
        try:
            self._mlflow_client().set_terminated(run_id, status=status)
        except Exception as exc:
            logger.warning("could not end MLflow run %s: %s", run_id, exc)

    def _require_run(self) -> str:
        if self.run_id is None:
            raise TrackingError("No MLflow run was started; call start_run first.")
        return self.run_id

    def _error(self, action: str, exc: Exception) -> TrackingError:
        """The :class:`TrackingError` of ``exc`` raised while trying to ``action``; its
        message names the server (without credentials) and, when it did not answer, the
        reason and how long it was retried."""
        url = public_url(self.tracking_url)
        reason = unanswered_reason(exc)
        if reason is not None:
            error = TrackingError(
                f"the MLflow tracking server at {url} did not answer: {reason} (trying to "
                f"{action}, retried for about {retry_window_s():g}s); check that it runs and is "
                "reachable."
            )
            error.cause = TRACKING_UNREACHABLE_CAUSE
            self._unanswered = True
            return error
        detail = _CREDENTIALS_IN_URL.sub(r"\1", " ".join(str(exc).split()))[:300]
        return TrackingError(
            f"Could not {action} on the MLflow tracking server {url} "
            f"({type(exc).__name__}: {detail}); check that the server runs and is reachable."
        )
