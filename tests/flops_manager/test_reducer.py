"""The pure lifecycle reducer: every (project status, event) pair, then the finer rules."""

from typing import Any

import pytest

from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.actions import ActionKind, Hold
from flops_manager.lifecycle.reducer import transition
from flops_manager.records import Phase, ProjectRecord
from flops_utils.contract.exit_codes import UNKNOWN_EXIT
from flops_utils.contract.lifecycle import TERMINAL, Component, ComponentStatus, ProjectStatus

NOW_S = 1000.0
L, A = Component.LEARNER, Component.AGGREGATOR
SERVICES = ["aggregator", "learner-n1", "learner-n2"]

EVENTS: dict[str, ev.LifecycleEvent] = {
    "build": ev.BuildRequested(),
    "build_resumed": ev.BuildRequested(resumed=True),
    "build_finished": ev.BuildFinished({"key": "k" * 32}, ("Python 3.11 used",), "environment k"),
    "pipeline_failed": ev.PipelineFailed("git clone failed"),
    "service_started": ev.ServiceStarted({"name": "aggregator"}),
    "deployment_finished": ev.DeploymentFinished("127.0.0.1:9000"),
    "learner_started": ev.StatusReceived(L, ComponentStatus.STARTED, "n1"),
    "round": ev.StatusReceived(A, ComponentStatus.PROGRESS, data={"round": 1, "loss": 0.5}),
    "training_done": ev.StatusReceived(
        A, ComponentStatus.PROGRESS, data={"stage": "training_done"}
    ),
    "aggregator_success": ev.StatusReceived(
        A, ComponentStatus.SUCCESS, data={"run_id": "r1", "model_uri": "runs:/r1/model"}
    ),
    "learner_failed": ev.StatusReceived(L, ComponentStatus.FAILED, "n1", "ValueError: shape"),
    "aggregator_failed": ev.StatusReceived(A, ComponentStatus.FAILED, message="too few learners"),
    "learner_exit_error": ev.ServiceExited("learner-n1", 1, "ValueError: shape"),
    "learner_exit_aggregator_lost": ev.ServiceExited("learner-n1", 3, "connection refused"),
    "learner_failed_aggregator_lost": ev.StatusReceived(
        L, ComponentStatus.FAILED, "n1", "Lost the connection", {"cause": "aggregator_unreachable"}
    ),
    "aggregator_exit_0": ev.ServiceExited("aggregator", 0),
    "learner_exit_0": ev.ServiceExited("learner-n1", 0),
    "exit_unknown": ev.ServiceExited("learner-n1", None, "learning"),
    "grace_aggregator_0": ev.GraceExpired("aggregator", 0),
    "grace_unknown": ev.GraceExpired("learner-n1", None, "learning"),
    "grace_aggregator_lost": ev.GraceExpired("learner-n1", 3, reason="learner n1 failed: lost"),
    "cancel": ev.CancelRequested(),
    "post_training_progress": ev.PostTrainingProgress("skipped", "skipped a step"),
    "post_training_failed": ev.PostTrainingFailed("build_image", "no registry", "models:/m/1"),
    "post_training_finished": ev.PostTrainingFinished(),
    "found_all_running": ev.ServicesFound(True, tuple(SERVICES)),
    "found_some_gone": ev.ServicesFound(True, ("aggregator",), {"learner-n1": "x"}),
    "found_no_handles": ev.ServicesFound(False),
    "recovery_clean": ev.RecoveryFinished(tuple(SERVICES)),
    "recovery_gone": ev.RecoveryFinished(("aggregator",), {"learner-n1": "last"}),
    "manager_stopping": ev.ManagerStopping("the manager stopped"),
}

SAME = ("=", ())
FAIL = ("failed", ("stop_services", "log"))
P, B, D, T, PT = "pending", "building", "deploying", "training", "post_training"
ACTIVE_ORDER = (P, B, D, T, PT)

# event → (next status, action kinds) for pending, building, deploying, training, post_training
# ("=": the status stays).
TABLE: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "build": ((B, ("start_build",)), SAME, SAME, SAME, SAME),
    "build_resumed": ((B, ("start_build",)), ("=", ("start_build",)), SAME, SAME, SAME),
    "build_finished": (SAME, (D, ("deploy",)), SAME, SAME, SAME),
    "pipeline_failed": (FAIL,) * 5,
    "service_started": (SAME,) * 5,
    "deployment_finished": (SAME, SAME, (T, ()), SAME, SAME),
    "learner_started": (SAME,) * 5,
    "round": (SAME,) * 5,
    "training_done": (SAME, SAME, SAME, (PT, ()), SAME),
    "aggregator_success": (
        SAME,
        SAME,
        SAME,
        (PT, ("run_post_training",)),
        ("=", ("run_post_training",)),
    ),
    "learner_failed": (FAIL,) * 5,
    "aggregator_failed": (FAIL,) * 5,
    "learner_exit_error": (FAIL,) * 5,
    "learner_exit_aggregator_lost": (FAIL, FAIL, FAIL, ("=", ("await_grace",)), SAME),
    "learner_failed_aggregator_lost": (FAIL, FAIL, FAIL, ("=", ("await_grace",)), SAME),
    "aggregator_exit_0": (("=", ("await_grace",)),) * 5,
    "learner_exit_0": (SAME,) * 5,
    "exit_unknown": (("=", ("await_grace",)),) * 5,
    "grace_aggregator_0": (SAME, SAME, SAME, FAIL, FAIL),
    "grace_unknown": (FAIL, FAIL, FAIL, FAIL, SAME),
    "grace_aggregator_lost": (SAME, SAME, SAME, FAIL, SAME),
    "cancel": (("cancelled", ("stop_services", "log")),) * 5,
    "post_training_progress": (SAME,) * 5,
    "post_training_failed": (SAME, SAME, SAME, SAME, FAIL),
    "post_training_finished": (SAME, SAME, SAME, SAME, ("completed", ("stop_services", "log"))),
    "found_all_running": (SAME, SAME, (T, ()), SAME, SAME),
    "found_some_gone": (SAME, SAME, FAIL, SAME, SAME),
    "found_no_handles": (SAME, SAME, FAIL, FAIL, FAIL),
    "recovery_clean": (SAME,) * 5,
    "recovery_gone": (SAME, SAME, FAIL, FAIL, FAIL),
    "manager_stopping": (FAIL,) * 5,
}

TERMINAL_EXCEPTIONS: dict[str, tuple[str, ...]] = {
    "pipeline_failed": ("stop_services",),
    "deployment_finished": ("stop_services",),
}
"""Events that clean up after a project ended: a deployment that finishes or fails after the
project's end stops what it started."""


def record(status: str, **fields: Any) -> ProjectRecord:
    sla = {
        "ml_repo_url": "https://example.com/repo.git",
        "training_configuration": {
            "min_available_clients": 2,
            "min_fit_clients": 2,
            "min_evaluate_clients": 2,
        },
    }
    values: dict[str, Any] = {
        "_id": "p1",
        "project_id": "p1",
        "customer_id": "c",
        "status": status,
        "status_message": "",
        "created_at": 1.0,
        "updated_at": 1.0,
        "sla": sla,
        "nodes": ["n1", "n2"],
        "services": SERVICES,
        "phases": {status: Phase(started_at=900.0)},
    }
    return ProjectRecord(**{**values, **fields})


def test_the_table_covers_every_status_and_event() -> None:
    assert set(TABLE) == set(EVENTS)
    assert set(ACTIVE_ORDER) | {s.value for s in TERMINAL} == {s.value for s in ProjectStatus}
    assert {e.kind for e in EVENTS.values()} == set(ev.EventKind)


@pytest.mark.parametrize("name", sorted(EVENTS))
@pytest.mark.parametrize("status", ACTIVE_ORDER)
def test_unfinished_project(status: str, name: str) -> None:
    before = record(status)
    expected_status, expected_actions = TABLE[name][ACTIVE_ORDER.index(status)]

    after, actions = transition(before, EVENTS[name], NOW_S)

    assert after.status == (status if expected_status == "=" else expected_status)
    assert tuple(a.kind.value for a in actions) == expected_actions
    if after.status != before.status:  # every status change is timed and logged
        assert after.phases[status].seconds == NOW_S - 900.0
        assert after.events[-1].type == "status"
        assert after.events[-1].status == after.status
    assert before == record(status)  # the input is left alone


@pytest.mark.parametrize("name", sorted(EVENTS))
@pytest.mark.parametrize("status", sorted(s.value for s in TERMINAL))
def test_a_finished_project_changes_no_more(status: str, name: str) -> None:
    before = record(status)

    after, actions = transition(before, EVENTS[name], NOW_S)

    assert after == before
    assert tuple(a.kind.value for a in actions) == TERMINAL_EXCEPTIONS.get(name, ())


def test_cancelling_a_finished_project_stops_its_trained_model_server() -> None:
    before = record("completed", inference_url="http://127.0.0.1:5001")

    after, actions = transition(before, ev.CancelRequested(), NOW_S)

    assert (after.status, after.inference_url) == (ProjectStatus.COMPLETED, None)
    assert [a.kind for a in actions] == [ActionKind.STOP_INFERENCE]
    assert after.events[-1].message == "trained-model server stopped"


def test_a_learner_failure_is_tolerated_while_enough_learners_remain() -> None:
    sla = {"ml_repo_url": "https://example.com/repo.git"}  # every minimum is 1
    before = record("training", sla=sla)

    once, _ = transition(before, EVENTS["learner_failed"], NOW_S)
    twice, actions = transition(once, EVENTS["learner_exit_error"], NOW_S)
    other, _ = transition(twice, ev.ServiceExited("learner-n2", 1, ""), NOW_S)

    assert once.status is ProjectStatus.TRAINING
    assert once.lost_learners == ["learner-n1"]
    assert once.events[-1].message == (
        "learner n1 failed: ValueError: shape; training goes on with 1 learner(s) "
        "(at least 1 needed)"
    )
    assert (twice, actions) == (once, [])  # its exit after its failure changes nothing
    assert other.status is ProjectStatus.FAILED  # no learner left


def test_a_service_exiting_with_an_error_names_the_code_its_fix_and_last_line() -> None:
    after, _ = transition(record("training"), EVENTS["learner_exit_error"], NOW_S)

    assert after.status_message.startswith("learner-n1 exited with code 1 (user code error): ")
    assert "Fix: " in after.status_message
    assert after.status_message.endswith("; last log line: 'ValueError: shape'")


def test_an_exit_code_nobody_reported_is_not_called_a_user_code_error() -> None:
    after, _ = transition(
        record("training"), ev.ServiceExited("aggregator", UNKNOWN_EXIT, "DEAD (it crashed)"), NOW_S
    )

    assert after.status_message.startswith(
        "aggregator crashed or could not start, exit code unknown"
    )
    assert "user code" not in after.status_message
    assert after.status_message.endswith("; last log line: 'DEAD (it crashed)'")


def test_a_learner_that_lost_the_aggregator_is_judged_after_the_aggregator_reported() -> None:
    lost, waiting = transition(record("training"), EVENTS["learner_exit_aggregator_lost"], NOW_S)
    failed, _ = transition(lost, EVENTS["aggregator_failed"], NOW_S + 1)
    judged, later = transition(failed, waiting[0].event, NOW_S + 5)  # type: ignore[attr-defined]

    assert lost.status is ProjectStatus.TRAINING and lost.lost_learners == []
    assert lost.events[-1].message.startswith("learner-n1 exited with code 3")
    assert failed.status_message == "aggregator failed: too few learners"  # the real cause
    assert (judged, later) == (failed, [])


def test_a_learner_that_lost_a_living_aggregator_is_a_lost_learner_once() -> None:
    three = record(
        "training",
        services=[*SERVICES, "learner-n3"],
        nodes=["n1", "n2", "n3"],
    )
    _, from_message = transition(three, EVENTS["learner_failed_aggregator_lost"], NOW_S)
    _, from_exit = transition(three, EVENTS["learner_exit_aggregator_lost"], NOW_S)
    judged, _ = transition(three, from_message[0].event, NOW_S + 5)  # type: ignore[attr-defined]
    again, actions = transition(judged, from_exit[0].event, NOW_S + 6)  # type: ignore[attr-defined]

    assert judged.status is ProjectStatus.TRAINING
    assert judged.lost_learners == ["learner-n1"]
    assert "Lost the connection" in judged.events[-1].message
    assert (again, actions) == (judged, [])


def test_rounds_are_recorded_once() -> None:
    once, _ = transition(record("training"), EVENTS["round"], NOW_S)
    twice, _ = transition(once, EVENTS["round"], NOW_S + 1)

    assert [r.round for r in twice.rounds] == [1]
    assert twice.events[-1].message == "round 1: loss 0.5000, accuracy None"
    assert twice == once


def test_success_is_recorded_once_and_completes_through_post_training() -> None:
    done, _ = transition(record("training"), EVENTS["training_done"], NOW_S)
    success, first = transition(done, EVENTS["aggregator_success"], NOW_S)
    again, second = transition(success, EVENTS["aggregator_success"], NOW_S)
    completed, _ = transition(again, ev.PostTrainingFinished(), NOW_S + 2)

    assert success.mlflow is not None and success.mlflow.run_id == "r1"
    assert [a.kind for a in first] == [ActionKind.RUN_POST_TRAINING]
    assert second == []
    assert completed.status is ProjectStatus.COMPLETED
    assert completed.status_message == "final accuracy None; model registered as runs:/r1/model"
    assert [e.status for e in completed.events if e.type == "status"] == [
        "post_training",
        "completed",
    ]


def test_during_recovery_failures_and_exits_are_held_back_then_judged_together() -> None:
    before = record("training")

    failed, held = transition(before, EVENTS["aggregator_failed"], NOW_S, recovering=True)
    exited, gone = transition(failed, EVENTS["learner_exit_error"], NOW_S, recovering=True)
    judged, _ = transition(
        exited,
        ev.RecoveryFinished(
            ("aggregator",), {"learner-n1": "learning"}, ("aggregator failed: too few learners",)
        ),
        NOW_S,
    )

    assert exited.status is ProjectStatus.TRAINING
    assert held == [Hold(failure="aggregator failed: too few learners")]
    assert gone == [Hold(service="learner-n1", last_line="ValueError: shape")]
    assert judged.status_message == (
        "while the manager was down, learner-n1 stopped without reporting a result "
        "(last log line: 'learning'); aggregator failed: too few learners"
    )


def test_a_success_reported_while_down_runs_post_training_after_the_recovery() -> None:
    success, during = transition(
        record("training"), EVENTS["aggregator_success"], NOW_S, recovering=True
    )
    judged, after = transition(success, EVENTS["recovery_clean"], NOW_S)

    assert during == []
    assert judged.status is ProjectStatus.POST_TRAINING
    assert [a.kind for a in after] == [ActionKind.RUN_POST_TRAINING]
    assert judged.events[-1].message == "the aggregator reported success while the manager was down"


def test_post_training_progress_records_the_image_and_the_server() -> None:
    image = {"ref": "r/m@sha256:" + "a" * 64, "model_uri": "models:/m/1", "port": 8080}
    built = ev.PostTrainingProgress(
        "built", "image built", {"model_image": {**image, "reused": False, "seconds": 1.5}}
    )
    deployed = ev.PostTrainingProgress(
        "deployed", "server up", {"inference_url": "http://127.0.0.1:5001"}
    )

    with_image, _ = transition(record("post_training"), built, NOW_S)
    served, actions = transition(with_image, deployed, NOW_S)
    late, late_actions = transition(record("cancelled"), deployed, NOW_S)

    assert served.model_image is not None and served.model_image.port == 8080
    assert (served.inference_url, actions) == ("http://127.0.0.1:5001", [])
    assert [e.status for e in served.events] == ["built", "deployed"]
    assert late.inference_url is None  # the project ended meanwhile: the server is stopped
    assert [a.kind for a in late_actions] == [ActionKind.STOP_INFERENCE]


def test_a_straggler_is_an_event_and_not_a_round() -> None:
    notice = ev.StatusReceived(
        A,
        ComponentStatus.PROGRESS,
        message="learner n2 has not answered round 2 for 4 s",
        data={"stage": "straggler", "learner": "n2", "round": 2, "phase": "fit", "waited_s": 4},
    )

    after, actions = transition(record("training"), notice, NOW_S)

    assert after.rounds == [] and actions == []
    assert after.events[-1].type == "learner" and after.events[-1].status == "straggler"
    assert after.events[-1].component == "learner-n2"
    assert after.events[-1].message == "learner n2 has not answered round 2 for 4 s"


def test_learners_dropped_from_a_round_are_lost_while_training_goes_on() -> None:
    three = record("training", services=[*SERVICES, "learner-n3"], nodes=["n1", "n2", "n3"])
    dropped = ev.StatusReceived(
        A,
        ComponentStatus.PROGRESS,
        message="round 2 training: dropped learner(s) n3; going on with 2",
        data={"stage": "learners_dropped", "round": 2, "learners": ["n3"], "going_on": True},
    )
    later_failure = ev.StatusReceived(
        L, ComponentStatus.FAILED, "n3", "Lost the connection", {"cause": "aggregator_unreachable"}
    )

    after, _ = transition(three, dropped, NOW_S)
    _, waiting = transition(after, later_failure, NOW_S + 1)
    judged, actions = transition(after, waiting[0].event, NOW_S + 6)  # type: ignore[attr-defined]

    assert after.status is ProjectStatus.TRAINING and after.rounds == []
    assert after.lost_learners == ["learner-n3"]
    assert "training goes on with 2 learner(s)" in after.events[-1].message
    assert (judged, actions) == (after, [])  # its later failure changes nothing
