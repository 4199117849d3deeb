"""The aggregator's configuration, exit codes, metric aggregation and MLflow tracking."""

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from aggregator.flower_client import RootUnreachable
from aggregator.flower_server import (
    DEFAULT_ROUND_TIMEOUT_S,
    AddressUnavailable,
    LearnersMissing,
    RoundFailed,
    weighted_accuracy,
)
from aggregator.main import AggregatorConfig, ConfigError
from aggregator.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    MlflowTracker,
    ModelLoggingError,
    TrackingError,
    flatten_params,
)
from flops_utils.contract.exit_codes import ExitCode, exit_code_for
from flops_utils.contract.training import AggregatorRole, FedAvgConfig, FedYogiConfig
from flops_utils.model_worker_client import ModelWorkerStartError
from flops_utils.net import find_free_port
from flops_utils.types import MLModelFlavor
from flops_utils.user_code import UserCodeError
from observatory.mlflow_server import MlflowServer

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"


def _env(**overrides: str) -> dict[str, str]:
    sla = json.loads((EXAMPLE_REPO / "sla.json").read_text())
    return {
        "FLOPS_PROJECT_ID": "abc",
        "FLOPS_MQTT_URL": "mqtt://127.0.0.1:1883",
        "FLOPS_AGGREGATOR_ADDRESS": "127.0.0.1:8080",
        "FLOPS_MLFLOW_URL": "http://127.0.0.1:5000",
        "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
        "FLOPS_SLA": json.dumps(sla),
        **overrides,
    }


def test_config_reads_the_sla_with_its_defaults() -> None:
    # Prepare
    sla = {"ml_repo_url": "x", "training_configuration": {"min_available_clients": 2}}

    # Execute
    example = AggregatorConfig.from_env(_env())
    minimal = AggregatorConfig.from_env(_env(FLOPS_SLA=json.dumps(sla)))

    # Assert
    assert (example.training_rounds, example.training.min_fit_clients) == (5, 2)
    assert example.flavor is MLModelFlavor.SKLEARN
    assert minimal.flavor is MLModelFlavor.PYTORCH
    assert (minimal.training_rounds, minimal.training.min_available_clients) == (3, 2)
    assert (minimal.training.min_fit_clients, minimal.training.min_evaluate_clients) == (1, 1)
    assert minimal.round_timeout_s == DEFAULT_ROUND_TIMEOUT_S
    settings = minimal.training_settings()
    assert (settings.address, settings.num_rounds) == ("127.0.0.1:8080", 3)


def test_config_reads_the_strategy_and_records_every_parameter() -> None:
    # Prepare
    sla = json.loads((EXAMPLE_REPO / "sla.json").read_text())
    sla["training_configuration"]["strategy"] = {"name": "FedYogi", "eta": 0.05}

    # Execute
    yogi = AggregatorConfig.from_env(_env(FLOPS_SLA=json.dumps(sla)))
    default = AggregatorConfig.from_env(_env())

    # Assert: the strategy reaches Flower, and MLflow gets it with Flower's defaults filled in.
    assert yogi.strategy == FedYogiConfig(name="FedYogi", eta=0.05)
    assert yogi.training_settings().strategy == yogi.strategy
    params = flatten_params(yogi.sla)
    assert params["training_configuration.strategy.name"] == "FedYogi"
    assert params["training_configuration.strategy.eta"] == "0.05"
    assert params["training_configuration.strategy.tau"] == "0.001"
    assert params["training_configuration.training_rounds"] == "5"
    assert default.strategy == FedAvgConfig(name="FedAvg")
    assert default.sla["training_configuration"]["strategy"] == {"name": "FedAvg"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"FLOPS_SLA": "{not json"}, "FLOPS_SLA is not valid JSON"),
        ({"FLOPS_SLA": "[1, 2]"}, "FLOPS_SLA must be a JSON object"),
        (
            {"FLOPS_SLA": '{"ml_model_flavor": "jax"}'},
            "SLA ml_model_flavor: Input should be 'sklearn', 'pytorch'",
        ),
        (
            {"FLOPS_SLA": '{"training_configuration": {"training_rounds": 0}}'},
            "SLA training_configuration.training_rounds: Input should be greater than or equal "
            "to 1",
        ),
        (
            {"FLOPS_SLA": '{"training_configuration": {"round_timeout_s": -1}}'},
            "SLA training_configuration.round_timeout_s: Input should be greater than 0",
        ),
        (
            {"FLOPS_SLA": '{"training_configuration": "five rounds"}'},
            "SLA training_configuration: Input should be a valid dictionary",
        ),
        (
            {"FLOPS_SLA": '{"training_configuration": {"strategy": {"name": "FedSGD"}}}'},
            "training_configuration.strategy: Input tag 'FedSGD' found using 'name' does not "
            "match any of the expected tags: 'FedAvg', 'FedProx'",
        ),
        (
            {
                "FLOPS_SLA": '{"training_configuration": {"strategy": {"name": "FedAdam", '
                '"beta_1": 2}}}'
            },
            "training_configuration.strategy.FedAdam.beta_1: Input should be less than 1",
        ),
        ({"FLOPS_MLFLOW_URL": ""}, "FLOPS_MLFLOW_URL is not set"),
        ({"FLOPS_MQTT_URL": "tcp://x:1"}, "FLOPS_MQTT_URL"),
        ({"FLOPS_ML_REPO_DIR": "/nonexistent"}, "has no model_manager.py"),
    ],
)
def test_config_errors_name_the_variable(overrides: dict[str, str], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AggregatorConfig.from_env(_env(**overrides))


def test_config_reads_each_roles_variables() -> None:
    # Execute
    root = AggregatorConfig.from_env(
        _env(FLOPS_AGGREGATOR_ROLE="root", FLOPS_CLUSTERS="a, b,c", FLOPS_CONNECT_TIMEOUT_S="7")
    )
    cluster = AggregatorConfig.from_env(
        _env(
            FLOPS_AGGREGATOR_ROLE="cluster",
            FLOPS_CLUSTER="a",
            FLOPS_ROOT_AGGREGATOR_ADDRESS="10.0.0.2:9000",
            FLOPS_LEARNERS="n1,n2",
            FLOPS_ML_REPO_DIR="/nonexistent",  # a cluster aggregator runs no user code
        )
    )
    classic = AggregatorConfig.from_env(_env())

    # Assert: the root waits for min(2, 3) clusters, a whole cycle (5 rounds) per call.
    assert (root.role, root.clusters) == (AggregatorRole.ROOT, ("a", "b", "c"))
    settings = root.root_settings()
    assert (settings.min_available_clients, settings.min_fit_clients) == (2, 2)
    assert settings.round_timeout_s == 5 * DEFAULT_ROUND_TIMEOUT_S + 7
    assert settings.num_rounds == root.training_cycles == 1
    assert (cluster.role, cluster.cluster, cluster.root_address) == (
        AggregatorRole.CLUSTER,
        "a",
        "10.0.0.2:9000",
    )
    assert (cluster.learners, cluster.repo_dir) == (("n1", "n2"), None)
    assert classic.role is AggregatorRole.CLASSIC


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"FLOPS_AGGREGATOR_ROLE": "leaf"}, "FLOPS_AGGREGATOR_ROLE='leaf' is not an aggregator"),
        ({"FLOPS_AGGREGATOR_ROLE": "root"}, "FLOPS_CLUSTERS is not set"),
        ({"FLOPS_AGGREGATOR_ROLE": "root", "FLOPS_CLUSTERS": " , "}, "FLOPS_CLUSTERS names no"),
        (
            {"FLOPS_AGGREGATOR_ROLE": "cluster", "FLOPS_ROOT_AGGREGATOR_ADDRESS": "r:1"},
            "FLOPS_CLUSTER is not set",
        ),
        (
            {"FLOPS_AGGREGATOR_ROLE": "cluster", "FLOPS_CLUSTER": "a"},
            "FLOPS_ROOT_AGGREGATOR_ADDRESS is not set",
        ),
    ],
)
def test_role_config_errors_name_the_variable(overrides: dict[str, str], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig.from_env(_env(**overrides))


def test_the_aggregators_errors_map_to_the_catalogues_codes() -> None:
    # Execute / Assert
    assert exit_code_for(ConfigError("x")) is ExitCode.CONFIG_ERROR
    assert exit_code_for(ModelWorkerStartError("x")) is ExitCode.CONFIG_ERROR
    assert exit_code_for(AddressUnavailable("x")) is ExitCode.ADDRESS_UNAVAILABLE
    assert exit_code_for(RoundFailed("x")) is ExitCode.TRAINING_FAILED
    assert exit_code_for(LearnersMissing("x")) is ExitCode.TRAINING_FAILED
    assert exit_code_for(RootUnreachable("x")) is ExitCode.AGGREGATOR_UNREACHABLE
    assert exit_code_for(UserCodeError("x")) is ExitCode.USER_CODE_ERROR
    assert exit_code_for(TrackingError("x")) is ExitCode.TRACKING_UNAVAILABLE
    assert exit_code_for(ModelLoggingError("x")) is ExitCode.MODEL_LOGGING_FAILED
    assert exit_code_for(KeyError("x")) is ExitCode.INTERNAL_ERROR


def test_accuracy_is_weighted_by_the_learners_sample_counts() -> None:
    # Execute
    result = weighted_accuracy([(100, {"accuracy": 0.9}), (300, {"accuracy": 0.5}), (50, {})])

    # Assert: (100 * 0.9 + 300 * 0.5) / 400
    assert result == {"accuracy": pytest.approx(0.6)}
    assert weighted_accuracy([]) == {}


def test_sla_is_flattened_within_mlflow_limits() -> None:
    # Prepare
    sla = {
        "customerID": "Admin",
        "training_configuration": {"data_tags": ["mnist", "b"], "round_timeout_s": None},
        "note": "x" * 7000,
    }

    # Execute
    params = flatten_params(sla)

    # Assert
    assert params["customerID"] == "Admin"
    assert params["training_configuration.data_tags"] == '["mnist", "b"]'
    assert "training_configuration.round_timeout_s" not in params  # unset: left out
    assert "None" not in params.values()
    assert len(params["note"]) == MAX_PARAM_VALUE_LENGTH
    assert params["note"].endswith("...")


def test_unreachable_tracking_server_is_a_tracking_error() -> None:
    # Prepare
    tracker = MlflowTracker(f"http://127.0.0.1:{find_free_port()}", "p")

    # Execute / Assert
    with pytest.raises(TrackingError, match=r"did not answer.*FLOPS_MLFLOW_URL"):
        tracker.check_reachable(timeout_s=2)


def test_a_model_directory_without_mlmodel_is_a_model_logging_error(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # Prepare: the worker "saved" a directory without MLflow's MLmodel file
    tracker = MlflowTracker(mlflow_server.url, uuid.uuid4().hex[:8])
    tracker.start_run({"ml_model_flavor": "pytorch", "training_configuration": {"x": 1}})
    (tmp_path / "model.pkl").write_bytes(b"not a model")

    # Execute
    with pytest.raises(ModelLoggingError, match="no MLmodel file"):
        tracker.log_saved_model(tmp_path, MLModelFlavor.PYTORCH)
    tracker.end_run("FAILED")
    tracker.end_run("FINISHED")  # a no-op: the run has ended

    # Assert: the run exists with the flattened SLA and is marked failed.
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_server.url).get_run(str(tracker.run_id))
    assert run.info.status == "FAILED"
    assert run.info.run_name == f"flops-{tracker.project_id}"
    assert run.data.params["training_configuration.x"] == "1"


def test_a_saved_model_is_uploaded_registered_and_loads_back(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # Prepare: a scikit-learn model saved the way the model worker saves it
    import mlflow.pyfunc
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    rows = np.random.default_rng(0).normal(size=(40, 3))
    labels = (rows[:, 0] > 0).astype(int)
    model = LogisticRegression().fit(rows, labels)
    mlflow.sklearn.save_model(model, tmp_path / "model")
    tracker = MlflowTracker(mlflow_server.url, uuid.uuid4().hex[:8])
    tracker.start_run({"ml_model_flavor": "sklearn"})

    # Execute
    logged = tracker.log_saved_model(
        tmp_path / "model", MLModelFlavor.SKLEARN, step=3, saved_with={"mlflow_version": "x"}
    )
    tracker.end_run("FINISHED")

    # Assert: a new version of the project's registered model, loadable by both URIs
    assert logged.registered_model == f"flops-{tracker.project_id}"
    assert logged.version == 1
    assert logged.registered_model_uri == f"models:/{logged.registered_model}/1"
    for uri in (logged.model_uri, logged.registered_model_uri):
        loaded = mlflow.pyfunc.load_model(uri)
        assert (np.asarray(loaded.predict(rows)) == labels).mean() > 0.9
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    logged_model = client.get_logged_model(logged.model_uri.removeprefix("models:/"))
    assert logged_model.source_run_id == tracker.run_id
    assert logged_model.tags["flops.saved_with.mlflow_version"] == "x"


def test_an_unanswered_request_names_the_server_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: nobody listens on the port; no retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = find_free_port()
    tracker = MlflowTracker(f"http://flops:s3cret@127.0.0.1:{port}", "p")

    # Execute
    with pytest.raises(TrackingError) as caught:
        tracker.start_run({"a": 1})

    # Assert
    assert caught.value.message.startswith(
        f"the MLflow tracking server at http://127.0.0.1:{port} did not answer: "
        "Connection refused (trying to start the run, retried for about 0s)"
    ), caught.value.message
    assert "s3cret" not in caught.value.message
    assert caught.value.cause == "tracking_server_unreachable"
