"""The learner process against real Mosquitto, a real MLflow server and a real aggregator.

The ML repository here is a tiny NumPy "model" (no data server needed) whose methods fail
on demand (``FAIL_IN``), so these tests exercise the learner's error paths quickly; the
training path with MNIST and data servers is in ``tests/aggregator/test_training.py``.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mqtt_testing import MqttRecorder
from waiting import wait_until

from flops_manager.broker import MosquittoBroker
from flops_utils import env_vars
from flops_utils.contract.exit_codes import ExitCode
from flops_utils.net import find_free_port
from flops_utils.user_code import describe_exception
from learner.main import ConfigError, LearnerConfig
from observatory.mlflow_server import MlflowServer

PYTHON = str(Path(sys.executable))
PROCESS_TIMEOUT_S = 90

TINY_MODEL_MANAGER = """
import os
import time

import numpy as np
from flops_utils.ml_repo_templates import ModelManagerTemplate


def _maybe_fail(where):
    if os.environ.get("FAIL_IN") == where:
        raise ValueError(f"boom in {where}")


class ModelManager(ModelManagerTemplate):
    def __init__(self):
        _maybe_fail("init")
        self.weights = np.zeros(3)

    def set_model_data(self):
        _maybe_fail("data")

    def get_model(self):
        return self.weights

    def get_model_parameters(self):
        return [self.weights]

    def set_model_parameters(self, parameters):
        self.weights = np.asarray(parameters[0])

    def fit_model(self):
        _maybe_fail("fit")
        if marker := os.environ.get("SLOW_FIT_MARKER"):  # signal "in fit", then take a while
            open(marker, "w").close()
            time.sleep(3)
        self.weights = self.weights + 1.0
        return 10

    def evaluate_model(self):
        return 0.5, 0.9, 10
"""


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "tiny_repo"
    repo.mkdir()
    (repo / "model_manager.py").write_text(TINY_MODEL_MANAGER)
    return repo


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
    env.pop("FAIL_IN", None)
    return {**env, **values}


def _start(module: str, env: dict[str, str]) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [PYTHON, "-m", module],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: "subprocess.Popen[str]") -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate(timeout=10)
        raise AssertionError(f"process did not end in time:\n{output[-3000:]}") from None
    return process.returncode, output


def test_config_rejects_a_malformed_aggregator_address(tiny_repo: Path) -> None:
    # Prepare
    env = {
        env_vars.PROJECT_ID: "p",
        env_vars.MQTT_URL: "mqtt://127.0.0.1:1883",
        env_vars.AGGREGATOR_ADDRESS: "no-port",
        env_vars.ML_REPO_DIR: str(tiny_repo),
    }

    # Execute / Assert
    with pytest.raises(ConfigError, match="FLOPS_AGGREGATOR_ADDRESS='no-port' is not HOST:PORT"):
        LearnerConfig.from_env(env)
    env[env_vars.AGGREGATOR_ADDRESS] = "127.0.0.1:8080"
    config = LearnerConfig.from_env({**env, env_vars.DATA_TAGS: "mnist, extra"})
    assert config.data_tags == ("mnist", "extra")
    assert config.name == "learner"


def test_describe_exception_is_one_line() -> None:
    # Execute
    text = describe_exception(ValueError("first line\n  second line"))

    # Assert
    assert text == "ValueError: first line second line"


def test_missing_variable_exits_2_and_publishes_failed(
    mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str, tiny_repo: Path
) -> None:
    # Prepare: no FLOPS_AGGREGATOR_ADDRESS.
    env = _env(
        FLOPS_PROJECT_ID=project_id,
        FLOPS_MQTT_URL=mqtt_broker.url,
        FLOPS_ML_REPO_DIR=str(tiny_repo),
        FLOPS_LEARNER_NAME="node-a",
    )

    # Execute
    code, output = _finish(_start("learner", env))

    # Assert
    assert code == ExitCode.CONFIG_ERROR, output
    failed = recorder.wait_for("learner/failed")[0]
    assert failed["instance"] == "node-a"
    assert "FLOPS_AGGREGATOR_ADDRESS is not set" in failed["message"]
    assert failed["data"] == {"error": "learner_config_error", "exit_code": 2}


def test_constructor_error_exits_1_with_the_exception_in_one_line(
    mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str, tiny_repo: Path
) -> None:
    # Prepare
    env = _env(
        FLOPS_PROJECT_ID=project_id,
        FLOPS_MQTT_URL=mqtt_broker.url,
        FLOPS_ML_REPO_DIR=str(tiny_repo),
        FLOPS_AGGREGATOR_ADDRESS=f"127.0.0.1:{find_free_port()}",
        FAIL_IN="init",
    )

    # Execute
    code, output = _finish(_start("learner", env))

    # Assert
    assert code == ExitCode.USER_CODE_ERROR, output
    assert recorder.wait_for("learner/started")
    failed = recorder.wait_for("learner/failed")[0]
    assert "ValueError: boom in init" in failed["message"]
    assert "\n" not in failed["message"]
    assert failed["data"] == {"error": "user_code_error", "exit_code": 1}
    last_line = output.strip().splitlines()[-1]
    assert "learner failed (exit 1, user code error)" in last_line, output


def test_unreachable_aggregator_exits_3_after_the_connect_timeout(
    mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str, tiny_repo: Path
) -> None:
    # Prepare: nobody listens on the aggregator's port.
    port = find_free_port()
    env = _env(
        FLOPS_PROJECT_ID=project_id,
        FLOPS_MQTT_URL=mqtt_broker.url,
        FLOPS_ML_REPO_DIR=str(tiny_repo),
        FLOPS_AGGREGATOR_ADDRESS=f"127.0.0.1:{port}",
        FLOPS_CONNECT_TIMEOUT_S="1",
    )

    # Execute
    code, output = _finish(_start("learner", env))

    # Assert
    assert code == ExitCode.AGGREGATOR_UNREACHABLE, output
    failed = recorder.wait_for("learner/failed")[0]
    assert f"Could not reach the aggregator at 127.0.0.1:{port} within 1s" in failed["message"]


def test_failing_fit_fails_the_learner_and_the_aggregator(
    mqtt_broker: MosquittoBroker,
    mlflow_server: MlflowServer,
    recorder: MqttRecorder,
    project_id: str,
    tiny_repo: Path,
) -> None:
    # Prepare: one learner whose fit_model raises; the aggregator needs one learner.
    address = f"127.0.0.1:{find_free_port()}"
    common = {
        "FLOPS_PROJECT_ID": project_id,
        "FLOPS_MQTT_URL": mqtt_broker.url,
        "FLOPS_ML_REPO_DIR": str(tiny_repo),
        "FLOPS_AGGREGATOR_ADDRESS": address,
    }
    sla = {"ml_model_flavor": "sklearn", "training_configuration": {"training_rounds": 2}}
    aggregator = _start(
        "aggregator",
        _env(**common, FLOPS_MLFLOW_URL=mlflow_server.url, FLOPS_SLA=json.dumps(sla)),
    )
    learner = _start("learner", _env(**common, FLOPS_LEARNER_NAME="node-b", FAIL_IN="fit"))

    # Execute
    learner_code, learner_output = _finish(learner)
    aggregator_code, aggregator_output = _finish(aggregator)

    # Assert: the learner names the user's exception; the aggregator ends the round failed.
    assert learner_code == ExitCode.USER_CODE_ERROR, learner_output
    assert aggregator_code == ExitCode.TRAINING_FAILED, aggregator_output
    learner_failed = recorder.wait_for("learner/failed")[0]
    assert learner_failed["message"] == "ModelManager.fit_model raised ValueError: boom in fit"
    aggregator_failed = recorder.wait_for("aggregator/failed")[0]
    assert aggregator_failed["message"].startswith("Round 1 training: 1 of 1 learner(s) failed")
    assert aggregator_failed["data"] == {"error": "round_failed", "exit_code": 6}
    assert recorder.find("aggregator/started")[0]["data"]["address"] == address
    # No round ended; the one progress message names the learner the round lost.
    dropped = [p["data"] for p in recorder.find("aggregator/progress")]
    assert [(d["stage"], d["learners"], d["going_on"]) for d in dropped] == [
        ("learners_dropped", ["node-b"], False)
    ]
    _assert_run_status(mlflow_server, project_id, "FAILED")


def _assert_run_status(server: MlflowServer, project_id: str, status: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name(f"flops-{project_id}")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == [status]


def test_stopping_the_aggregator_mid_round_fails_both_cleanly(
    mqtt_broker: MosquittoBroker,
    mlflow_server: MlflowServer,
    recorder: MqttRecorder,
    project_id: str,
    tiny_repo: Path,
    tmp_path: Path,
) -> None:
    # Prepare: a learner busy in fit_model when the aggregator gets SIGTERM.
    marker = tmp_path / "in-fit"
    common = {
        "FLOPS_PROJECT_ID": project_id,
        "FLOPS_MQTT_URL": mqtt_broker.url,
        "FLOPS_ML_REPO_DIR": str(tiny_repo),
        "FLOPS_AGGREGATOR_ADDRESS": f"127.0.0.1:{find_free_port()}",
    }
    sla = {"ml_model_flavor": "sklearn", "training_configuration": {"training_rounds": 2}}
    aggregator = _start(
        "aggregator",
        _env(**common, FLOPS_MLFLOW_URL=mlflow_server.url, FLOPS_SLA=json.dumps(sla)),
    )
    learner = _start("learner", _env(**common, SLOW_FIT_MARKER=str(marker)))
    wait_until(marker.exists, PROCESS_TIMEOUT_S, "the learner never reached fit_model")

    # Execute
    aggregator.terminate()
    aggregator_code, aggregator_output = _finish(aggregator)
    learner_code, learner_output = _finish(learner)

    # Assert: the aggregator reports the stop and kills its run; the learner names the loss.
    assert aggregator_code == ExitCode.TERMINATED, aggregator_output
    assert learner_code == ExitCode.AGGREGATOR_UNREACHABLE, learner_output
    aggregator_failed = recorder.wait_for("aggregator/failed")
    assert [m["data"] for m in aggregator_failed] == [{"error": "terminated", "exit_code": 143}]
    learner_failed = recorder.wait_for("learner/failed")[0]
    assert "Lost the connection to the aggregator" in learner_failed["message"]
    _assert_run_status(mlflow_server, project_id, "KILLED")


def test_round_timeout_ends_training_instead_of_waiting(
    mqtt_broker: MosquittoBroker,
    mlflow_server: MlflowServer,
    recorder: MqttRecorder,
    project_id: str,
    tiny_repo: Path,
    tmp_path: Path,
) -> None:
    # Prepare: fit_model takes 3 s, the SLA allows 1 s per round.
    common = {
        "FLOPS_PROJECT_ID": project_id,
        "FLOPS_MQTT_URL": mqtt_broker.url,
        "FLOPS_ML_REPO_DIR": str(tiny_repo),
        "FLOPS_AGGREGATOR_ADDRESS": f"127.0.0.1:{find_free_port()}",
    }
    sla = {
        "ml_model_flavor": "sklearn",
        "training_configuration": {"training_rounds": 2, "round_timeout_s": 1},
    }
    aggregator = _start(
        "aggregator",
        _env(**common, FLOPS_MLFLOW_URL=mlflow_server.url, FLOPS_SLA=json.dumps(sla)),
    )
    learner = _start("learner", _env(**common, SLOW_FIT_MARKER=str(tmp_path / "in-fit")))

    # Execute
    began = time.monotonic()
    aggregator_code, aggregator_output = _finish(aggregator)
    waited = time.monotonic() - began
    learner_code, learner_output = _finish(learner)

    # Assert
    assert aggregator_code == ExitCode.TRAINING_FAILED, aggregator_output
    failed = recorder.wait_for("aggregator/failed")[0]
    assert failed["message"].startswith("Round 1 training: 1 of 1 learner(s) failed or timed out")
    assert "round_timeout_s (1s) was exceeded" in failed["message"]
    assert learner_code == ExitCode.AGGREGATOR_UNREACHABLE, learner_output
    assert waited < PROCESS_TIMEOUT_S
    _assert_run_status(mlflow_server, project_id, "FAILED")


def test_missing_data_tags_exit_4_naming_what_the_node_has(
    mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str, tmp_path: Path
) -> None:
    # Prepare: the node's data server holds no data at all.
    from data_server.server import DataServer

    example = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
    with DataServer(tmp_path / "empty-node") as data_server:
        env = _env(
            FLOPS_PROJECT_ID=project_id,
            FLOPS_MQTT_URL=mqtt_broker.url,
            FLOPS_ML_REPO_DIR=str(example),
            FLOPS_AGGREGATOR_ADDRESS=f"127.0.0.1:{find_free_port()}",
            FLOPS_DATA_SERVER=data_server.location,
            FLOPS_DATA_TAGS="mnist",
        )

        # Execute
        code, output = _finish(_start("learner", env))

    # Assert
    assert code == ExitCode.DATA_UNAVAILABLE, output
    failed = recorder.wait_for("learner/failed")[0]
    assert failed["message"].startswith("Loading the local data failed:")
    assert "mnist" in failed["message"]
    assert failed["data"]["exit_code"] == 4
