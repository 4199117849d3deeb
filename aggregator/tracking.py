"""MLflow tracking for the aggregator: one run per project, a metric per round, the model.

Layout in the tracking server (DESIGN.md §3): experiment ``flops-<project_id>``, one run named
``flops-<project_id>`` holding the SLA flattened as parameters (``training_configuration.
training_rounds`` etc.), the metrics ``loss`` and ``accuracy`` with ``step = round``, and the
final global model logged with the repository's flavor and registered as the model
``flops-<project_id>``.

MLflow is imported lazily (it takes seconds). The aggregator talks to the tracking server
over HTTP only (the server proxies artifacts), and telemetry is switched off so MLflow never
tries the internet.
"""

import importlib
import importlib.util
import inspect
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import numpy as np

from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.types import MLModelFlavor

for _name, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # Fail within about a minute instead of retrying for minutes when the server is down.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
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

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
"""How an MLflow run can end."""

MODEL_NAME = "model"
"""Name of the logged model inside the run."""


class TrackingError(FlopsError):
    """The MLflow tracking server is unreachable or rejected a request."""

    code = "tracking_error"


class ModelLoggingError(FlopsError):
    """The final model could not be logged with the SLA's flavor."""

    code = "model_logging_error"


@dataclass(frozen=True)
class FlavorSpec:
    """How to log one :class:`MLModelFlavor`: the MLflow module and the library it needs."""

    mlflow_module: str
    library: str
    pip_package: str


FLAVORS: dict[MLModelFlavor, FlavorSpec] = {
    MLModelFlavor.SKLEARN: FlavorSpec("mlflow.sklearn", "sklearn", "scikit-learn"),
    MLModelFlavor.PYTORCH: FlavorSpec("mlflow.pytorch", "torch", "torch"),
    MLModelFlavor.TENSORFLOW: FlavorSpec("mlflow.tensorflow", "tensorflow", "tensorflow"),
    MLModelFlavor.KERAS: FlavorSpec("mlflow.keras", "keras", "keras"),
}
"""SLA flavor → MLflow flavor module and the library that module imports."""


@dataclass(frozen=True)
class LoggedModel:
    """Where the final model went: ``model_uri`` (``models:/m-...``, loadable with
    ``mlflow.pyfunc.load_model``), the registered model's name and version, and
    ``registered_model_uri`` (``models:/<name>/<version>``)."""

    model_uri: str
    registered_model: str
    version: int
    registered_model_uri: str


def experiment_name(project_id: str) -> str:
    """The experiment (and registered model) name of a project: ``flops-<project_id>``."""
    return f"flops-{project_id}"


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into MLflow parameters.

    Nested keys are joined with ``.`` (``training_configuration.training_rounds``); lists
    become JSON strings; ``None`` becomes ``"None"``. Keys longer than
    :data:`MAX_PARAM_KEY_LENGTH` and values longer than :data:`MAX_PARAM_VALUE_LENGTH` are
    cut (values end with ``...`` then).
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
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


def sklearn_input_example(model: Any) -> Any:
    """A two-row all-zero ``pandas.DataFrame`` input for a scikit-learn model, or ``None``.

    The feature count comes from ``n_features_in_`` or, for linear models whose
    coefficients were set by hand (as FedAvg does), from ``coef_.shape[-1]``. MLflow derives
    the logged model's signature from it. A DataFrame gives a column-based signature
    (``double`` columns), which accepts NumPy arrays and DataFrames of any numeric dtype;
    a NumPy example would give a tensor signature that rejects every other dtype (a float64
    example rejects the float32 arrays most repositories train on).
    """
    import pandas as pd

    n_features = getattr(model, "n_features_in_", None)
    if n_features is None and getattr(model, "coef_", None) is not None:
        n_features = np.asarray(model.coef_).shape[-1]
    if n_features is None:
        return None
    return pd.DataFrame(np.zeros((2, int(n_features)), dtype=np.float64))


class MlflowTracker:
    """Logs one project's training to an MLflow tracking server.

    Args:
        tracking_url: ``http://HOST:PORT`` of the tracking server.
        project_id: the project; names the experiment, the run and the registered model.

    Call :meth:`check_reachable`, :meth:`start_run`, :meth:`log_round` per round,
    :meth:`log_model`, then :meth:`end_run`. Every method raises :class:`TrackingError` when
    the server fails (the message names the URL).
    """

    def __init__(self, tracking_url: str, project_id: str) -> None:
        self.tracking_url = tracking_url.rstrip("/")
        self.project_id = project_id
        self.name = experiment_name(project_id)
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._ended = False
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
            problem = str(exc)
        raise TrackingError(
            f"The MLflow tracking server at {self.tracking_url} does not answer ({problem}); "
            "start it (flops-observatory) or fix FLOPS_MLFLOW_URL."
        )

    def _mlflow_client(self) -> Any:
        if self._client is None:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_url)
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_url)
        return self._client

    def start_run(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
        """Create (or reuse) the experiment and start the project's run.

        ``params`` (e.g. the SLA) is flattened with :func:`flatten_params`. Returns the run id.
        """
        from mlflow.entities import Param

        client = self._mlflow_client()
        try:
            experiment = client.get_experiment_by_name(self.name)
            if experiment is None:
                self.experiment_id = client.create_experiment(
                    self.name, tags={"flops.project_id": self.project_id}
                )
            else:
                self.experiment_id = experiment.experiment_id
            run = client.create_run(
                self.experiment_id,
                run_name=self.name,
                tags={"flops.project_id": self.project_id, **(tags or {})},
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
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        metrics = [Metric("loss", float(loss), timestamp_ms, server_round)]
        if accuracy is not None:
            metrics.append(Metric("accuracy", float(accuracy), timestamp_ms, server_round))
        try:
            self._mlflow_client().log_batch(self._require_run(), metrics=metrics)
        except Exception as exc:
            raise self._error(f"log round {server_round}", exc) from exc

    def log_model(
        self,
        model: Any,
        flavor: MLModelFlavor,
        step: int = 0,
        input_example: Any = None,
    ) -> LoggedModel:
        """Log ``model`` with ``flavor``'s MLflow module and register it as ``flops-<id>``.

        Args:
            model: the trained model object (``ModelManager.get_model()``).
            flavor: the SLA's ``ml_model_flavor``.
            step: the round the model belongs to (links the model to that round's metrics).
            input_example: a small model input; MLflow stores it and derives the signature.
                For sklearn it defaults to :func:`sklearn_input_example`.

        Returns the :class:`LoggedModel`. Pip requirements are the flavor's defaults (no
        requirement inference). A flavor whose ``log_model`` takes no ``run_id`` (Keras 3) is
        logged inside the run as the active run, which ends the run as ``FINISHED``.

        Raises :class:`ModelLoggingError` when the flavor's library is not installed (the
        message has the ``pip install`` line) or the model cannot be saved, and
        :class:`TrackingError` when the server fails.
        """
        spec = FLAVORS[flavor]
        if importlib.util.find_spec(spec.library) is None:
            raise ModelLoggingError(
                f"ml_model_flavor {flavor.value!r} needs the {spec.pip_package} library, which "
                f"is not installed here; add it to the repository's dependencies (pip install "
                f"{spec.pip_package}) or fix ml_model_flavor in the SLA."
            )
        run_id = self._require_run()
        self._mlflow_client()
        module: Any = importlib.import_module(spec.mlflow_module)
        kwargs: dict[str, Any] = {}
        if flavor is MLModelFlavor.SKLEARN:
            if input_example is None:
                input_example = sklearn_input_example(model)
            # Explicit requirements skip MLflow's slow import-tracing requirement inference.
            kwargs["pip_requirements"] = module.get_default_pip_requirements(include_skops=True)
        else:
            kwargs["pip_requirements"] = module.get_default_pip_requirements()
        if input_example is not None:
            kwargs["input_example"] = input_example
        kwargs.update(name=MODEL_NAME, registered_model_name=self.name, step=step)
        try:
            if _accepts_run_id(module.log_model):
                info = module.log_model(model, run_id=run_id, **kwargs)
            else:  # e.g. mlflow.keras: attach through the active run (ended on exit)
                import mlflow

                with mlflow.start_run(run_id=run_id):
                    info = module.log_model(model, **kwargs)
        except Exception as exc:
            if _is_server_error(exc):
                raise self._error("log the model", exc) from exc
            raise ModelLoggingError(
                f"Logging the model with the {flavor.value} flavor failed "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); check that "
                "ModelManager.get_model() returns a model of the SLA's ml_model_flavor."
            ) from exc
        version = int(info.registered_model_version or 0)
        logged = LoggedModel(
            model_uri=str(info.model_uri),
            registered_model=self.name,
            version=version,
            registered_model_uri=f"models:/{self.name}/{version}",
        )
        logger.info(
            "model logged as %s, registered %s", logged.model_uri, logged.registered_model_uri
        )
        return logged

    def end_run(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``status``; a no-op without a run or when already ended.

        Never raises (a failure is logged).
        """
        run_id = self.run_id
        if run_id is None or self._ended:
            return
        self._ended = True
        try:
            self._mlflow_client().set_terminated(run_id, status=status)
        except Exception as exc:
            logger.warning("could not end MLflow run %s: %s", run_id, exc)

    def _require_run(self) -> str:
        if self.run_id is None:
            raise TrackingError("No MLflow run was started; call start_run first.")
        return self.run_id

    def _error(self, action: str, exc: Exception) -> TrackingError:
        detail = " ".join(str(exc).split())[:300]
        return TrackingError(
            f"Could not {action} on the MLflow tracking server {self.tracking_url} "
            f"({type(exc).__name__}: {detail}); check that the server runs and is reachable."
        )


def _accepts_run_id(log_model: Any) -> bool:
    """Whether a flavor's ``log_model`` takes ``run_id`` (directly or via ``**kwargs``)."""
    parameters = inspect.signature(log_model).parameters.values()
    return any(p.name == "run_id" or p.kind is p.VAR_KEYWORD for p in parameters)


def _is_server_error(exc: Exception) -> bool:
    """Whether ``exc`` came from talking to the tracking server (not from saving the model)."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RestException):
        return True
    if isinstance(exc, MlflowException) and "API request" in str(exc):
        return True
    return isinstance(exc, ConnectionError | TimeoutError)
