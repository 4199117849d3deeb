"""The runtime contract: the exit-code catalogue, the status message models and the
aggregator's reading of the SLA."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_testing import MqttRecorder
from pydantic import ValidationError

from flops_manager.broker import MosquittoBroker
from flops_utils import env_vars
from flops_utils.contract.entry import failure_of, run_command, run_role
from flops_utils.contract.exit_codes import (
    ERROR_EXIT_CODES,
    EXIT_CODES,
    ExitCode,
    Role,
    describe_exit,
    exit_code_for,
    role_named,
)
from flops_utils.contract.lifecycle import Stage
from flops_utils.contract.messages import (
    MESSAGE_VERSION,
    AggregatorStarted,
    BuilderSuccess,
    Failed,
    LearnerSuccess,
    MessageData,
    RoundProgress,
    StatusMessage,
    TrainingDone,
    data_model,
    parse_status_message,
    parse_status_payload,
)
from flops_utils.contract.training import AggregatorSLA, describe_validation_error
from flops_utils.errors import FlopsError
from flops_utils.notifications import StatusNotifier
from flops_utils.types import Component, ComponentStatus
from flops_utils.user_code import UserCodeError, call_user_code

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_PACKAGES = ["aggregator", "learner", "data_server", "image_builder", "observatory"]


# --- exit codes -------------------------------------------------------------------------


def test_the_catalogue_describes_every_code_once() -> None:
    # Execute / Assert: every code has a meaning, a fix unless there is nothing to fix, and
    # at least one role; no two codes share a number or a meaning.
    assert set(EXIT_CODES) == set(ExitCode)
    assert len({int(code) for code in ExitCode}) == len(ExitCode)
    assert len({entry.meaning for entry in EXIT_CODES.values()}) == len(EXIT_CODES)
    for code, entry in EXIT_CODES.items():
        assert entry.meaning.endswith("."), code
        assert entry.roles <= set(Role) and entry.roles, code
        assert entry.fix or code in (ExitCode.OK, ExitCode.TERMINATED), code
    for role in Role:
        assert {ExitCode.OK, ExitCode.CONFIG_ERROR, ExitCode.INTERNAL_ERROR} <= {
            code for code, entry in EXIT_CODES.items() if role in entry.roles
        }


def test_error_codes_map_to_catalogue_codes_through_the_class_hierarchy() -> None:
    # Prepare
    class BaseFailure(FlopsError):
        code = "training_failed"

    class Subclass(BaseFailure):
        code = "some_specific_failure"

    class Unmapped(FlopsError):
        code = "not_in_the_table"

    # Execute / Assert
    assert set(ERROR_EXIT_CODES.values()) <= set(ExitCode)
    assert exit_code_for(Subclass("x")) is ExitCode.TRAINING_FAILED
    assert exit_code_for(UserCodeError("x")) is ExitCode.USER_CODE_ERROR
    assert exit_code_for(Unmapped("x")) is ExitCode.INTERNAL_ERROR
    assert exit_code_for(KeyError("x")) is ExitCode.INTERNAL_ERROR


@pytest.mark.parametrize("code", list(ExitCode))
def test_describe_exit_quotes_the_catalogue(code: ExitCode) -> None:
    # Execute
    text = describe_exit("learner-node1", int(code))

    # Assert
    entry = EXIT_CODES[code]
    assert text.startswith(f"exited with code {int(code)} ({code.label}): {entry.meaning}")
    assert (f"Fix: {entry.fix}" in text) == bool(entry.fix)
    assert "\n" not in text


def test_describe_exit_names_signals_and_unknown_codes() -> None:
    # Execute / Assert
    assert describe_exit("aggregator", -signal.SIGKILL).startswith(
        "was killed by signal 9 (SIGKILL): it was stopped at once"
    )
    assert "out of memory" in describe_exit("learner", -9)
    assert describe_exit("learner", -signal.SIGSEGV).startswith(
        "was killed by signal 11 (SIGSEGV): it crashed in native code"
    )
    assert describe_exit("builder", 137).startswith(
        "exited with code 137 (killed by signal 9, SIGKILL)"
    )
    assert describe_exit("learner", -signal.SIGTERM).startswith(
        "was killed by signal 15 (SIGTERM): it was asked to stop"
    )
    assert describe_exit("learner", -62).startswith("was killed by signal 62 (")
    unknown = describe_exit("learner-node1", 42)
    assert unknown.startswith("exited with code 42, which FLOps does not define for the learner")
    assert "Fix:" in unknown
    assert "for the data server" in describe_exit("data_server", 77)


def test_role_names_cover_services_and_aliases() -> None:
    # Execute / Assert
    assert role_named("learner-node-1") is Role.LEARNER
    assert role_named("aggregator") is Role.AGGREGATOR
    assert role_named("image_builder") is Role.BUILDER
    assert role_named("builder") is Role.BUILDER
    assert role_named("data-server") is Role.DATA_SERVER
    assert role_named("inference") is None


def test_a_python_crash_and_a_kill_are_described_from_real_processes() -> None:
    # Execute: a process killed by SIGKILL, one that exits with an undefined code
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
        check=False,
    )
    odd = subprocess.run([sys.executable, "-c", "raise SystemExit(77)"], check=False)

    # Assert
    assert describe_exit("learner", killed.returncode).startswith("was killed by signal 9")
    assert "does not define" in describe_exit("learner", odd.returncode)


# --- status messages --------------------------------------------------------------------


def _payload(**fields: object) -> bytes:
    document = {
        "v": 1,
        "project_id": "p1",
        "component": "aggregator",
        "status": "progress",
        "instance": "aggregator",
        "message": "round 1/3",
        "data": {"stage": "round", "round": 1, "rounds": 3, "loss": 0.5, "accuracy": 0.8},
        "timestamp": 1700000000.5,
    }
    document.update(fields)
    return json.dumps(document).encode()


def test_a_message_round_trips_through_its_payload() -> None:
    # Prepare
    sent = StatusMessage.build(
        "p1",
        Component.AGGREGATOR,
        ComponentStatus.PROGRESS,
        instance="aggregator",
        message="round 1/3",
        data=RoundProgress(round=1, rounds=3, loss=0.5, accuracy=None, learners=2, seconds=1.5),
    )

    # Execute
    received = parse_status_message("flops/p1/aggregator/progress", sent.payload())

    # Assert
    assert received == sent
    assert received.v == MESSAGE_VERSION
    assert json.loads(sent.payload())["v"] == 1
    typed = received.typed_data()
    assert isinstance(typed, RoundProgress)
    assert (typed.stage, typed.round, typed.accuracy, typed.learners) == (Stage.ROUND, 1, None, 2)


@pytest.mark.parametrize(
    ("component", "status", "data", "model"),
    [
        (Component.AGGREGATOR, ComponentStatus.STARTED, {"address": "h:1"}, AggregatorStarted),
        (Component.AGGREGATOR, ComponentStatus.PROGRESS, {"round": 2}, RoundProgress),
        (Component.AGGREGATOR, ComponentStatus.PROGRESS, {"stage": "training_done"}, TrainingDone),
        (Component.LEARNER, ComponentStatus.SUCCESS, {"fit_rounds": 3}, LearnerSuccess),
        (Component.LEARNER, ComponentStatus.FAILED, {"error": "x", "exit_code": 1}, Failed),
        (Component.BUILDER, ComponentStatus.SUCCESS, {"key": "k", "images": {}}, BuilderSuccess),
        (Component.INFERENCE, ComponentStatus.STARTED, {"anything": [1]}, MessageData),
    ],
)
def test_each_message_has_its_data_model(
    component: Component, status: ComponentStatus, data: dict[str, object], model: type
) -> None:
    # Execute
    message = StatusMessage.build("p1", component, status, data=data)

    # Assert
    assert data_model(component, status, data) is model
    assert isinstance(message.typed_data(), model)
    assert message.data == data


def test_a_payload_without_a_version_is_version_1_and_other_fields_default() -> None:
    # Prepare: what a hand-written publisher might send
    payload = json.dumps({"message": "boom", "data": {"error": "x", "exit_code": 6}}).encode()

    # Execute
    message = parse_status_message("flops/p9/learner/failed", payload)

    # Assert
    assert (message.v, message.project_id, message.component, message.status) == (
        1,
        "p9",
        Component.LEARNER,
        ComponentStatus.FAILED,
    )
    assert message.typed_data() == Failed(error="x", exit_code=6)
    assert message.timestamp > 0


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("flops/p1/aggregator/progress", _payload(v=2), "message version 2 is not supported"),
        ("flops/p1/aggregator/progress", _payload(v="1"), "message version '1' is not supported"),
        ("flops/p1/aggregator/progress", b"{not json", "payload is not JSON"),
        ("flops/p1/aggregator/progress", b"[1, 2]", "payload is a JSON list, not an object"),
        ("flops/p1/aggregator/progress", b"\xff\xfe", "payload is not JSON"),
        ("flops/p1/nobody/progress", _payload(), "is not a FLOps status topic"),
        ("other/p1/aggregator/progress", _payload(), "is not a FLOps status topic"),
        ("flops/p1/aggregator/progress", _payload(project_id="p2"), "contradicts the topic"),
        ("flops/p1/aggregator/progress", _payload(timestamp="noon"), "timestamp: Input should"),
        ("flops/p1/aggregator/progress", _payload(data=[1]), "data: Input should be a valid"),
        (
            "flops/p1/aggregator/progress",
            _payload(data={"stage": "round", "round": "first"}),
            "data: round: Input should be a valid integer",
        ),
        (
            "flops/p1/aggregator/progress",
            _payload(data={"stage": "warmup"}),
            "unknown aggregator progress stage 'warmup'",
        ),
        (
            "flops/p1/learner/failed",
            _payload(component="learner", status="failed", data={"exit_code": "six"}),
            "data: exit_code: Input should be a valid integer",
        ),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(
    topic: str, payload: bytes, reason: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        parse_status_message(topic, payload)


def test_parse_status_payload_checks_a_decoded_object_too() -> None:
    # Execute / Assert
    message = parse_status_payload(json.loads(_payload()))
    assert message.project_id == "p1"
    with pytest.raises(ValueError, match="component: Input should be"):
        parse_status_payload({"project_id": "p", "component": "x", "status": "failed"})


def test_a_data_dict_that_does_not_fit_its_model_is_refused_when_sent() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="data: loss: Input should be a valid number"):
        StatusMessage.build("p1", Component.LEARNER, ComponentStatus.SUCCESS, data={"loss": "low"})


def test_the_notifier_publishes_the_versioned_envelope(
    mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str
) -> None:
    # Prepare
    notifier = StatusNotifier(mqtt_broker.url, project_id, Component.LEARNER, "node-1")

    # Execute
    try:
        notifier.notify(ComponentStatus.SUCCESS, "done", LearnerSuccess(fit_rounds=3, loss=0.1))
    finally:
        notifier.close()

    # Assert
    [payload] = recorder.wait_for("learner/success")
    message = parse_status_message(
        f"flops/{project_id}/learner/success", json.dumps(payload).encode()
    )
    assert payload["v"] == 1
    assert message.instance == "node-1"
    assert message.data == {"fit_rounds": 3, "loss": 0.1}


# --- entry wrapper ----------------------------------------------------------------------


class _ConfigProblem(FlopsError):
    code = "learner_config_error"


def test_run_role_reports_a_config_error_when_the_project_is_known(
    mqtt_broker: MosquittoBroker, recorder: MqttRecorder, project_id: str
) -> None:
    # Prepare
    env = {
        env_vars.PROJECT_ID: project_id,
        env_vars.MQTT_URL: mqtt_broker.url,
        env_vars.LEARNER_NAME: "node-7",
    }

    def read_config() -> None:
        raise _ConfigProblem("FLOPS_AGGREGATOR_ADDRESS is not set; set it.")

    # Execute
    code = run_role(Role.LEARNER, read_config, lambda config, notifier: None, env)

    # Assert
    assert code is ExitCode.CONFIG_ERROR
    [failed] = recorder.wait_for("learner/failed")
    assert failed["instance"] == "node-7"
    assert failed["message"] == "FLOPS_AGGREGATOR_ADDRESS is not set; set it."
    assert failed["data"] == {"error": "learner_config_error", "exit_code": 2}


def test_run_role_maps_what_run_raises_and_logs_the_error_last(
    mqtt_broker: MosquittoBroker,
    recorder: MqttRecorder,
    project_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    env = {env_vars.PROJECT_ID: project_id, env_vars.MQTT_URL: mqtt_broker.url}

    def run(config: str, notifier: StatusNotifier) -> None:
        notifier.notify(ComponentStatus.STARTED, f"started with {config}", {})
        raise KeyError("missing\nkey")

    # Execute
    code = run_role(Role.AGGREGATOR, lambda: "config", run, env)

    # Assert
    assert code is ExitCode.INTERNAL_ERROR
    recorder.wait_for("aggregator/started")
    [failed] = recorder.wait_for("aggregator/failed")
    assert failed["message"] == "Internal error: KeyError: 'missing\\nkey'"
    assert failed["data"] == {"error": "internal_error", "exit_code": 5}
    records = [r for r in caplog.records if r.name == "flops"]
    assert records[-2].exc_info is not None  # the traceback, before the one-line error
    assert "aggregator failed (exit 5, internal error)" in records[-1].getMessage()
    assert records[-1].exc_info is None


def test_run_command_returns_the_code_of_what_was_raised() -> None:
    # Prepare
    class Busy(FlopsError):
        code = "data_server_start_failed"

    def serve(config: int) -> None:
        raise Busy("port in use")

    # Execute / Assert
    assert run_command(Role.DATA_SERVER, lambda: 1, serve) is ExitCode.ADDRESS_UNAVAILABLE
    assert run_command(Role.DATA_SERVER, lambda: 1, lambda config: None) is ExitCode.OK
    assert failure_of(Busy("port\nin use")).message == "port in use"


# --- training configuration -------------------------------------------------------------


def test_the_aggregator_sla_ignores_the_other_sla_keys_and_keeps_defaults() -> None:
    # Execute
    sla = AggregatorSLA.model_validate(
        {"ml_repo_url": "x", "resource_constraints": {"memory": 1}, "customerID": "c1"}
    )

    # Assert
    assert sla.customerID == "c1"
    assert sla.training_configuration.training_rounds == 3
    assert sla.training_configuration.strategy.name == "FedAvg"


def test_the_runtime_packages_do_not_import_the_manager() -> None:
    # Execute: every import statement of the packages that run in images
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for package in [*RUNTIME_PACKAGES, "utils_pkg"]
        for path in (REPO_ROOT / package).rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.lstrip().startswith(("import flops_manager", "from flops_manager"))
    ]

    # Assert
    assert offenders == []


def test_sla_errors_name_the_field_path() -> None:
    # Execute
    with pytest.raises(ValidationError) as caught:
        AggregatorSLA.model_validate(
            {"training_configuration": {"strategy": {"name": "FedProx"}, "min_fit_clients": 0}}
        )

    # Assert
    text = describe_validation_error(caught.value)
    assert "training_configuration.min_fit_clients: Input should be greater than" in text
    assert "training_configuration.strategy.FedProx.proximal_mu: Field required" in text


def test_call_user_code_wraps_once() -> None:
    # Prepare
    def broken() -> None:
        raise ValueError("bad\nshape")

    # Execute
    with pytest.raises(UserCodeError) as first:
        call_user_code("ModelManager.fit_model", broken)
    with pytest.raises(UserCodeError) as again:
        call_user_code(
            "ModelManager.outer", lambda: call_user_code("ModelManager.fit_model", broken)
        )

    # Assert: the message names the method once; the original is the cause
    assert first.value.message == "ModelManager.fit_model raised ValueError: bad shape"
    assert again.value is not first.value
    assert again.value.message == first.value.message
    assert isinstance(again.value.__cause__, ValueError)
