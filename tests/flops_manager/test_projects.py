"""The project lifecycle's state machine, fed with status messages and service exits."""

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from flops_manager.builds import BuildResult, VenvProjectBuilder
from flops_manager.errors import Conflict
from flops_manager.lifecycle.admission import new_record
from flops_manager.orchestrators.local import LocalOrchestrator
from flops_manager.projects import ProjectLifecycle, ProjectStatus, UnsupportedSla, eligible_nodes
from flops_manager.records import Phase, ProjectRecord
from flops_manager.sla import ProjectSLA
from flops_manager.store import EmbeddedProjectStore
from flops_utils import env_vars
from flops_utils.mqtt_topics import parse_status_topic


@pytest.fixture
def lifecycle(tmp_path: Path) -> Iterator[ProjectLifecycle]:
    store = EmbeddedProjectStore(tmp_path / "db")
    holder: list[ProjectLifecycle] = []
    orchestrator = LocalOrchestrator(
        tmp_path / "services", lambda *args: holder[0].on_service_exit(*args)
    )
    running = ProjectLifecycle(
        store,
        VenvProjectBuilder(tmp_path / "envs"),
        orchestrator,
        tmp_path,
        "mqtt://127.0.0.1:9",
        "",
    )
    holder.append(running)
    yield running
    running.close()
    orchestrator.close()


def training_project(lifecycle: ProjectLifecycle, project_id: str = "p1") -> None:
    now = time.time()
    lifecycle.store.insert_project(
        ProjectRecord(
            _id=project_id,
            project_id=project_id,
            customer_id="c",
            status=ProjectStatus.TRAINING,
            status_message="",
            created_at=now,
            updated_at=now,
            sla={"ml_repo_url": "x", "post_training_steps": []},
            phases={"training": Phase(started_at=now)},
        )
    )


def message(lifecycle: ProjectLifecycle, topic: str, **payload: Any) -> None:
    parsed = parse_status_topic(topic)
    assert parsed is not None
    lifecycle.on_status(parsed, payload)
    assert lifecycle.drain(5)


def wait_status(lifecycle: ProjectLifecycle, project_id: str, timeout_s: float = 5) -> str:
    """The project's status once terminal; its current status after ``timeout_s``."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: lifecycle.get(project_id).status.is_terminal, timeout_s, interval_s=0.02)
    return lifecycle.get(project_id).status.value


def test_rounds_are_recorded_with_their_metrics(lifecycle: ProjectLifecycle) -> None:
    training_project(lifecycle)

    message(
        lifecycle, "flops/p1/aggregator/progress", data={"round": 1, "loss": 0.9, "accuracy": 0.7}
    )
    message(
        lifecycle, "flops/p1/aggregator/progress", data={"round": 2, "loss": 0.5, "accuracy": 0.8}
    )

    project = lifecycle.get("p1")
    assert [r.model_dump() for r in project.rounds] == [
        {"round": 1, "loss": 0.9, "accuracy": 0.7},
        {"round": 2, "loss": 0.5, "accuracy": 0.8},
    ]
    assert project.events[-1].message == "round 2: loss 0.5000, accuracy 0.8000"


def test_success_moves_through_post_training_to_completed(lifecycle: ProjectLifecycle) -> None:
    training_project(lifecycle)

    message(lifecycle, "flops/p1/aggregator/progress", data={"stage": "training_done"})
    message(
        lifecycle,
        "flops/p1/aggregator/success",
        data={"run_id": "r1", "model_uri": "models:/m/1", "accuracy": 0.9},
    )

    assert wait_status(lifecycle, "p1") == "completed"
    project = lifecycle.get("p1")
    assert project.mlflow is not None and project.mlflow.run_id == "r1"
    assert (project.phases["training"].seconds or -1) >= 0
    assert (project.phases["post_training"].seconds or -1) >= 0
    assert [e.status for e in project.events if e.type == "status"] == [
        "post_training",
        "completed",
    ]


def test_a_failed_learner_fails_the_project_with_its_message(lifecycle: ProjectLifecycle) -> None:
    training_project(lifecycle)

    message(
        lifecycle,
        "flops/p1/learner/failed",
        instance="node-2",
        message="ValueError: bad shape",
    )

    assert wait_status(lifecycle, "p1") == "failed"
    assert lifecycle.get("p1").status_message == "learner node-2 failed: ValueError: bad shape"


def test_messages_after_the_end_change_nothing(lifecycle: ProjectLifecycle) -> None:
    training_project(lifecycle)
    message(lifecycle, "flops/p1/learner/failed", instance="node-1", message="boom")
    wait_status(lifecycle, "p1")

    message(lifecycle, "flops/p1/aggregator/success", data={"run_id": "late"})

    project = lifecycle.get("p1")
    assert (project.status, project.mlflow) == ("failed", None)


def test_a_service_exiting_with_an_error_fails_the_project(lifecycle: ProjectLifecycle) -> None:
    training_project(lifecycle)

    lifecycle.on_service_exit("p1", "learner-node-1", 1, "ValueError: bad shape")
    assert lifecycle.drain(5)

    project = lifecycle.get("p1")
    assert project.status == "failed"
    assert project.status_message.startswith(
        "learner-node-1 exited with code 1 (user code error): The ML repository's code raised"
    )
    assert project.status_message.endswith("; last log line: 'ValueError: bad shape'")


def test_cancel_ends_a_running_project_and_is_idempotent(lifecycle: ProjectLifecycle) -> None:
    training_project(lifecycle)

    first = lifecycle.cancel("p1")
    second = lifecycle.cancel("p1")

    assert first.status == second.status == "cancelled"
    assert [e.status for e in second.events] == ["cancelled"]


def test_eligible_nodes_hold_a_tag_run_a_supported_platform_and_are_live() -> None:
    now = 1000.0
    nodes = [
        {"node_id": "a", "tags": {"mnist": 10}, "last_seen": now},
        {"node_id": "b", "tags": {"cifar10": 10}, "last_seen": now},
        {"node_id": "c", "tags": {"mnist": 0}, "last_seen": now},
        {"node_id": "d", "tags": {"mnist": 10}, "last_seen": now - 3600},
        {"node_id": "e", "tags": {"mnist": 10}, "last_seen": now, "architecture": "linux/arm64"},
    ]

    def ids(platforms: list[str] | None) -> list[str]:
        return [n["node_id"] for n in eligible_nodes(nodes, ["mnist"], platforms, now=now)]

    assert ids(None) == ["a", "e"]
    assert ids(["linux/amd64"]) == ["a"]
    assert ids(["linux/amd64", "linux/arm64"]) == ["a", "e"]


def register_nodes(lifecycle: ProjectLifecycle, count: int) -> None:
    for i in range(1, count + 1):
        lifecycle.store.upsert_node(
            {
                "node_id": f"node-{i}",
                "tags": {"mnist": 100 * i},
                "last_seen": time.time(),
                "data_server": f"http://127.0.0.1:{9000 + i}",
            }
        )


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("use_devel_base_images", True, "no devel variant"),
        ("resource_constraints", {"memory": 512}, "cannot limit their memory"),
    ],
)
def test_an_sla_field_the_manager_cannot_honour_is_refused_with_the_reason(
    lifecycle: ProjectLifecycle, field: str, value: object, reason: str
) -> None:
    register_nodes(lifecycle, 2)
    sla = ProjectSLA.model_validate({"ml_repo_url": "https://example.com/repo.git", field: value})

    with pytest.raises(UnsupportedSla, match=reason):
        lifecycle.create(sla)

    assert lifecycle.store.list_projects() == []


def test_too_few_nodes_with_the_data_is_a_conflict(lifecycle: ProjectLifecycle) -> None:
    register_nodes(lifecycle, 1)
    sla = ProjectSLA.model_validate(
        {
            "ml_repo_url": "https://example.com/repo.git",
            "training_configuration": {"min_available_clients": 2},
        }
    )

    with pytest.raises(Conflict, match="min_available_clients is 2"):
        lifecycle.create(sla)


def test_a_build_failure_fails_the_new_project_with_the_builders_reason(
    lifecycle: ProjectLifecycle,
) -> None:
    register_nodes(lifecycle, 2)
    sla = ProjectSLA.model_validate(
        {
            "ml_repo_url": "file:///nonexistent/lifecycle-repo.git",
            "training_configuration": {"max_clients": 1},
        }
    )

    created = lifecycle.create(sla)

    assert (created.status, created.nodes) == ("pending", ["node-2"])  # most rows first
    assert wait_status(lifecycle, created.project_id, timeout_s=30) == "failed"
    project = lifecycle.get(created.project_id)
    assert "nonexistent/lifecycle-repo.git" in project.status_message
    assert [e.status for e in project.events if e.type == "status"] == [
        "pending",
        "building",
        "failed",
    ]
    assert project.phases["building"].seconds is not None


@pytest.mark.parametrize(("verbose", "level"), [(True, "DEBUG"), (False, None)])
def test_a_verbose_sla_makes_every_service_log_at_debug(
    lifecycle: ProjectLifecycle, verbose: bool, level: str | None
) -> None:
    sla = ProjectSLA.model_validate(
        {"ml_repo_url": "https://example.com/repo.git", "verbose": verbose}
    )
    record = new_record(sla, ["node-1"], time.time())
    env = BuildResult(commit="0" * 40, key="0" * 32, cache_hit=True, seconds=0.0)
    node = {"node_id": "node-1", "data_server": "grpc://127.0.0.1:9"}

    deployment = lifecycle.pipeline.deployment(record, sla, env, [node])

    assert [s.env.get(env_vars.LOG_LEVEL) for s in deployment.services] == [level, level]
