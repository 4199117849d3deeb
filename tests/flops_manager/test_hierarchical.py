"""Hierarchical FL in the manager: admission by cluster, the deployment's wiring (root, cluster
aggregators, learners), and the lifecycle's rules for lost learners and lost clusters."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from flops_manager.api_models import project_json
from flops_manager.builds import BuildResult
from flops_manager.errors import Conflict
from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.admission import admit
from flops_manager.lifecycle.pipeline import Pipeline, cluster_aggregator_node
from flops_manager.lifecycle.reducer import transition
from flops_manager.orchestrators.base import (
    Deployment,
    Orchestrator,
    Service,
    ServiceExit,
    ServiceHandle,
    ServiceSpec,
    ServiceState,
)
from flops_manager.records import ProjectRecord
from flops_manager.sla import ProjectSLA
from flops_utils import env_vars
from flops_utils.contract.lifecycle import Component, ComponentStatus, ProjectStatus

NOW_S = 1000.0
CA = Component.CLUSTER_AGGREGATOR


def node(node_id: str, cluster: str, rows: int = 100, arch: str = "linux/amd64") -> dict[str, Any]:
    return {
        "node_id": node_id,
        "cluster": cluster,
        "hostname": f"host-{node_id}",
        "architecture": arch,
        "tags": {"mnist": rows},
        "last_seen": NOW_S,
        "data_server": f"grpc://10.0.0.{len(node_id)}:8815",
    }


def sla(**training: Any) -> ProjectSLA:
    return ProjectSLA.model_validate(
        {
            "ml_repo_url": "https://example.com/repo.git",
            "training_configuration": {
                "mode": "hierarchical",
                "training_cycles": 2,
                "training_rounds": 2,
                **training,
            },
        }
    )


NODES = [
    node("a1", "east", 300),
    node("a2", "east", 100),
    node("a3", "east", 200),
    node("b1", "west"),
    node("b2", "west"),
    node("c1", "north"),
    node("spare", "west", rows=0),  # no data: cannot learn, may host an aggregator
]


def test_clusters_with_too_few_eligible_nodes_do_not_take_part() -> None:
    record = admit(sla(min_available_clients=2), NODES, NOW_S)

    assert [(c.name, c.service, c.nodes) for c in record.clusters] == [
        ("east", "cluster-aggregator-east", ["a1", "a2", "a3"]),
        ("west", "cluster-aggregator-west", ["b1", "b2"]),
    ]
    assert record.nodes == ["a1", "a2", "a3", "b1", "b2"]
    assert record.hierarchical


def test_max_clients_applies_per_cluster_most_rows_first() -> None:
    record = admit(sla(min_available_clients=2, max_clients=2), NODES, NOW_S)

    assert {c.name: c.nodes for c in record.clusters} == {
        "east": ["a1", "a3"],
        "west": ["b1", "b2"],
    }


def test_no_cluster_able_to_take_part_is_a_conflict_listing_every_cluster() -> None:
    with pytest.raises(Conflict) as raised:
        admit(sla(min_available_clients=4), NODES, NOW_S)

    error = raised.value
    assert "east: 3, north: 1, west: 2" in error.message
    assert "min_available_clients (4)" in error.message
    details = {d["cluster"]: d for d in error.details or []}
    assert details["west"]["eligible_nodes"] == ["b1", "b2"]
    assert [n["node_id"] for n in details["west"]["nodes"]] == ["b1", "b2", "spare"]
    assert details["north"]["nodes"][0]["tags"] == {"mnist": 100}


def test_a_classic_sla_still_runs_on_every_eligible_node_as_one_group() -> None:
    classic = ProjectSLA.model_validate({"ml_repo_url": "https://example.com/repo.git"})

    record = admit(classic, NODES, NOW_S)

    assert record.clusters == []
    assert record.nodes == ["a1", "a2", "a3", "b1", "b2", "c1"]


def test_a_cluster_aggregator_prefers_a_node_without_a_learner_on_a_built_platform() -> None:
    arm = node("arm", "west", arch="linux/arm64")
    registered = [*NODES, arm]

    west = cluster_aggregator_node("west", ["b1", "b2"], registered, ["linux/amd64"])
    assert west is not None and west["node_id"] == "spare"
    chosen = cluster_aggregator_node("east", ["a1", "a2", "a3"], registered, ["linux/amd64"])
    assert chosen is not None and chosen["node_id"] == "a1"
    assert cluster_aggregator_node("west", ["b1"], [arm], ["linux/amd64"]) is None


def deployment_of(record: ProjectRecord, the_sla: ProjectSLA) -> Deployment:
    pipeline = Pipeline(
        cast(Any, None), cast(Any, None), cast(Any, None), Path("/x"), "mqtt://m:1883", "http://t"
    )
    env = BuildResult(commit="c" * 40, key="k" * 32, cache_hit=True, seconds=0.0)
    return pipeline.deployment(record, the_sla, env, NODES)


def test_the_deployment_starts_the_root_then_cluster_aggregators_then_learners() -> None:
    the_sla = sla(min_available_clients=2)
    record = admit(the_sla, NODES, NOW_S)

    services = {s.name: s for s in deployment_of(record, the_sla).services}

    assert list(services) == [
        "aggregator",
        "cluster-aggregator-east",
        "cluster-aggregator-west",
        "learner-a1",
        "learner-a2",
        "learner-a3",
        "learner-b1",
        "learner-b2",
    ]
    root, west = services["aggregator"], services["cluster-aggregator-west"]
    assert root.listens and root.upstream is None
    assert root.env[env_vars.AGGREGATOR_ROLE] == "root"
    assert root.env[env_vars.CLUSTERS] == "east,west"
    assert west.listens and west.upstream == "aggregator"
    assert west.upstream_env == env_vars.ROOT_AGGREGATOR_ADDRESS
    assert west.env[env_vars.AGGREGATOR_ROLE] == "cluster"
    assert west.env[env_vars.CLUSTER] == "west"
    assert west.env[env_vars.LEARNERS] == "b1,b2"
    assert env_vars.SLA in west.env and env_vars.MLFLOW_URL in west.env
    assert west.placement is not None and west.placement.hostname == "host-spare"
    assert services["learner-b2"].upstream == "cluster-aggregator-west"
    assert services["learner-a1"].upstream == "cluster-aggregator-east"
    assert not services["learner-a1"].listens


@dataclass(eq=False)
class _Recorded(Service):
    env: dict[str, str] | None = None


class RecordingOrchestrator(Orchestrator):
    """Starts nothing: records each service's environment, to check the base class's
    wiring. Every listener gets port 7000 + n and is reached at ``host-<name>``."""

    aggregator_bind_host = "0.0.0.0"

    def __init__(self) -> None:
        super().__init__(lambda *args: None, 3600.0)
        self.started: dict[str, dict[str, str]] = {}
        self.next_port = 7000

    def _aggregator_port(self, deployment: Deployment) -> int:
        self.next_port += 1
        return self.next_port

    def _aggregator_address(self, project_id: str, aggregator: Service, port: int) -> str:
        return f"host-{aggregator.name}:{port}"

    def _start(
        self, project_id: str, spec: ServiceSpec, deployment: Deployment, port: int | None
    ) -> Service:
        self.started[spec.name] = dict(spec.env)
        return _Recorded(spec.name, env=dict(spec.env))

    def _poll(self, service: Service) -> ServiceExit | None:
        return None

    def _remove(self, service: Service) -> None:
        return None

    def _reattach_one(
        self, project_id: str, handle: ServiceHandle
    ) -> tuple[Service | None, ServiceState]:
        return None, ServiceState(str(handle["name"]), False, "")


def test_the_orchestrator_gives_each_service_the_address_of_its_upstream() -> None:
    the_sla = sla(min_available_clients=2)
    record = admit(the_sla, NODES, NOW_S)
    orchestrator = RecordingOrchestrator()
    try:
        address = orchestrator.deploy(deployment_of(record, the_sla))
    finally:
        orchestrator.close()

    started = orchestrator.started
    assert address == "host-aggregator:7001"
    assert started["aggregator"][env_vars.AGGREGATOR_ADDRESS] == "0.0.0.0:7001"
    east = started["cluster-aggregator-east"]
    assert east[env_vars.AGGREGATOR_ADDRESS] == "0.0.0.0:7002"
    assert east[env_vars.ROOT_AGGREGATOR_ADDRESS] == "host-aggregator:7001"
    assert started["cluster-aggregator-west"][env_vars.AGGREGATOR_ADDRESS] == "0.0.0.0:7003"
    assert started["learner-a2"][env_vars.AGGREGATOR_ADDRESS] == (
        "host-cluster-aggregator-east:7002"
    )
    assert started["learner-b1"][env_vars.AGGREGATOR_ADDRESS] == (
        "host-cluster-aggregator-west:7003"
    )


def test_a_classic_deployment_without_wiring_is_wired_the_classic_way() -> None:
    orchestrator = RecordingOrchestrator()
    services = (ServiceSpec("aggregator", "aggregator"), ServiceSpec("learner-n1", "learner"))
    try:
        address = orchestrator.deploy(Deployment("p", services))
    finally:
        orchestrator.close()

    assert address == "host-aggregator:7001"
    assert orchestrator.started["learner-n1"][env_vars.AGGREGATOR_ADDRESS] == address


# -- the lifecycle's rules ---------------------------------------------------------------------
def training_record(min_available: int, clusters: dict[str, list[str]]) -> ProjectRecord:
    nodes = [{**node(n, c), "tags": {"mnist": 10}} for c, ns in clusters.items() for n in ns]
    record = admit(sla(min_available_clients=min_available), nodes, NOW_S)
    record, _ = transition(record, ev.BuildRequested(), NOW_S)
    record, _ = transition(
        record,
        ev.BuildFinished(BuildResult("c" * 40, "k" * 32, True, 1.0).document(), (), "built"),
        NOW_S,
    )
    record, _ = transition(record, ev.DeploymentFinished("127.0.0.1:9000"), NOW_S)
    assert record.status is ProjectStatus.TRAINING
    return record


def learner_failed(node_id: str) -> ev.StatusReceived:
    return ev.StatusReceived(Component.LEARNER, ComponentStatus.FAILED, node_id, "killed")


def test_services_and_the_deployment_message_name_every_role() -> None:
    record = training_record(1, {"east": ["a1", "a2"], "west": ["b1", "b2"]})

    assert record.services[:3] == [
        "aggregator",
        "cluster-aggregator-east",
        "cluster-aggregator-west",
    ]
    assert record.status_message == (
        "started the root aggregator, 2 cluster aggregator(s) and 4 learner(s)"
    )


def test_a_lost_learner_is_tolerated_while_its_cluster_keeps_its_minimum() -> None:
    record = training_record(2, {"east": ["a1", "a2", "a3"], "west": ["b1", "b2"]})

    after, _ = transition(record, learner_failed("a1"), NOW_S)

    assert after.status is ProjectStatus.TRAINING
    east = after.clusters[0]
    assert (east.lost_learners, east.lost) == (["learner-a1"], None)
    assert after.events[-1].message.endswith(
        "cluster east goes on with 2 learner(s) (at least 2 needed)"
    )


def test_a_cluster_below_its_minimum_is_lost_and_the_root_goes_on_while_it_can() -> None:
    record = training_record(
        1, {"east": ["a1"], "north": ["c1"], "west": ["b1"]}
    )  # min 1: the root needs 1 of 3 clusters

    once, _ = transition(record, learner_failed("a1"), NOW_S)
    aggregator_gone, actions = transition(
        once, ev.ServiceExited("cluster-aggregator-east", 6, "learners missing"), NOW_S
    )

    assert once.status is ProjectStatus.TRAINING
    assert once.clusters[0].lost is not None and "learner a1 failed" in once.clusters[0].lost
    assert "training goes on with 2 cluster(s) (at least 1 needed)" in once.events[-1].message
    assert (aggregator_gone, actions) == (once, [])  # the lost cluster's aggregator ending


def test_a_killed_cluster_aggregator_fails_the_project_naming_its_cluster_when_too_few_remain() -> (
    None
):
    record = training_record(2, {"east": ["a1", "a2"], "west": ["b1", "b2"]})

    after, _ = transition(record, ev.ServiceExited("cluster-aggregator-west", -9, ""), NOW_S)

    assert after.status is ProjectStatus.FAILED
    assert after.status_message.startswith("cluster west lost (cluster-aggregator-west was killed")
    assert "fewer than the 2 cluster(s) the root aggregator needs are left" in after.status_message


def test_with_three_clusters_and_a_minimum_of_two_one_cluster_may_be_lost() -> None:
    record = training_record(2, {"east": ["a1", "a2"], "north": ["c1", "c2"], "west": ["b1", "b2"]})
    failed = ev.StatusReceived(CA, ComponentStatus.FAILED, "north", "round 2 failed")

    once, _ = transition(record, failed, NOW_S)
    twice, _ = transition(once, ev.ServiceExited("cluster-aggregator-east", 1, ""), NOW_S)

    assert once.status is ProjectStatus.TRAINING
    assert [c.name for c in once.clusters if c.lost] == ["north"]
    assert twice.status is ProjectStatus.FAILED
    assert "cluster east lost" in twice.status_message


def test_cluster_rounds_and_root_cycles_are_recorded_once() -> None:
    record = training_record(1, {"east": ["a1"], "west": ["b1"]})
    data = {"cycle": 1, "round": 2, "step": 2, "rounds": 2, "loss": 0.4, "accuracy": 0.8}
    cluster_round = ev.StatusReceived(CA, ComponentStatus.PROGRESS, "west", data={**data})
    started = ev.StatusReceived(CA, ComponentStatus.STARTED, "west", data={"address": "h:1"})
    cycle = ev.StatusReceived(
        Component.AGGREGATOR, ComponentStatus.PROGRESS, data={"round": 1, "loss": 0.5}
    )

    after = record
    for event in (started, cluster_round, cluster_round, cycle, cycle):
        after, _ = transition(after, event, NOW_S)

    west = after.clusters[1]
    assert west.address == "h:1"
    assert [(r.cycle, r.round, r.step, r.accuracy) for r in west.rounds] == [(1, 2, 2, 0.8)]
    assert [r.round for r in after.rounds] == [1]
    messages = [e.message for e in after.events]
    assert "cluster west cycle 1 round 2: loss 0.4000, accuracy 0.8000" in messages
    assert "cycle 1: loss 0.5000, accuracy None" in messages


def test_the_project_view_shows_the_tree_and_keeps_addresses_for_the_admin() -> None:
    record = training_record(1, {"east": ["a1", "a2"], "west": ["b1"]})
    data = {"cycle": 1, "round": 1, "step": 1, "loss": 0.4, "accuracy": 0.8, "fit_examples": 20}
    for event in (
        ev.StatusReceived(CA, ComponentStatus.STARTED, "east", data={"address": "10.0.0.9:30001"}),
        ev.StatusReceived(CA, ComponentStatus.PROGRESS, "east", data=data),
        ev.StatusReceived(Component.AGGREGATOR, ComponentStatus.PROGRESS, data={"round": 1}),
    ):
        record, _ = transition(record, event, NOW_S)

    customer = project_json(record, admin=False)
    admin = project_json(record, admin=True)

    tree = customer["hierarchy"]
    assert tree["root"]["service"] == "aggregator"
    assert (tree["root"]["training_cycles"], tree["root"]["training_rounds"]) == (2, 2)
    assert [c["round"] for c in tree["root"]["cycles"]] == [1]
    east = tree["clusters"][0]
    assert (east["name"], east["service"], east["learners"]) == (
        "east",
        "cluster-aggregator-east",
        ["a1", "a2"],
    )
    assert east["learner_services"] == ["learner-a1", "learner-a2"]
    assert east["rounds"][0]["fit_examples"] == 20
    assert "10.0.0.9" not in json.dumps(customer)
    assert admin["admin"]["cluster_aggregator_addresses"] == {"east": "10.0.0.9:30001"}
    assert (
        project_json(admit(ProjectSLA.model_validate({"ml_repo_url": "x"}), NODES, NOW_S), False)[
            "hierarchy"
        ]
        is None
    )
