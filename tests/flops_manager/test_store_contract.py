"""One contract for both project stores: the embedded mongita one and MongoDB over the wire
(a real ``secantusd-py`` server, see ``tests/store_testing.py``)."""

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from flops_manager.errors import http_status
from flops_manager.records import (
    Event,
    Metrics,
    MlflowRecord,
    Phase,
    ProjectRecord,
    RoundMetrics,
    ServiceReport,
)
from flops_manager.store import (
    SUMMARY_FIELDS,
    EmbeddedProjectStore,
    MongoProjectStore,
    ProjectStore,
    StoreUnavailable,
    open_store,
    public_url,
)
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.net import find_free_port


@pytest.fixture(params=["embedded", "mongo"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store location: a directory, or a database of its own on the session's
    MongoDB server."""
    if request.param == "embedded":
        return str(tmp_path / "db")
    server: str = request.getfixturevalue("mongo_server")
    return f"{server}/t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(store_url: str) -> Iterator[ProjectStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def record(
    project_id: str,
    created_at: float = 1000.0,
    customer_id: str = "alice",
    status: ProjectStatus = ProjectStatus.PENDING,
) -> ProjectRecord:
    """A project with every kind of nested data filled in."""
    return ProjectRecord(
        _id=project_id,
        project_id=project_id,
        customer_id=customer_id,
        status=status,
        status_message=f"{project_id} is {status}",
        created_at=created_at,
        updated_at=created_at,
        sla={"ml_repo_url": "https://example.org/repo.git", "rounds": 3, "nested": {"a": [1]}},
        nodes=["node-1", "node-2"],
        phases={"build": Phase(started_at=created_at, ended_at=created_at + 2, seconds=2.0)},
        events=[
            Event(timestamp=created_at, type="status", status="pending", message="created"),
            Event(
                timestamp=created_at + 1,
                type="component",
                status="running",
                message="learner up",
                component="learner-node-1",
            ),
        ],
        rounds=[RoundMetrics(round=1, loss=0.5, accuracy=0.75)],
        metrics=Metrics(round=1, loss=0.5, accuracy=0.75),
        services=["aggregator", "learner-node-1"],
        service_handles=[{"service": "aggregator", "pid": 42, "log": "a.log", "extra": {"x": 1}}],
        service_reports=[ServiceReport(service="aggregator", status="success", timestamp=1.5)],
        aggregator_address="127.0.0.1:9000",
        mlflow=MlflowRecord(experiment_id="1", run_id="r", model_version=2),
    )


def raw_database(store_url: str) -> Any:
    """The store's database through a client of its own (for documents the store would
    not write)."""
    if store_url.startswith("mongodb://"):
        return pymongo.MongoClient(store_url).get_default_database()
    from mongita import MongitaClientDisk

    Path(store_url).mkdir(parents=True, exist_ok=True)
    return MongitaClientDisk(store_url)["flops"]


def test_full_record_round_trips(store: ProjectStore) -> None:
    original = record("p1")
    store.insert_project(original)

    assert store.get_project("p1") == original
    assert store.list_projects() == [original]
    assert store.get_project("missing") is None


def test_dotted_set_and_pushes_apply_in_one_update(store: ProjectStore) -> None:
    store.insert_project(record("p1"))
    store.update_project("p1", {"phases.training": Phase(started_at=2000.0)})

    store.update_project(
        "p1",
        {"phases.training.ended_at": 2010.0, "status": ProjectStatus.TRAINING, "nodes.1": "n-9"},
        event=Event(timestamp=2010.0, type="round", status="running", message="round 2"),
        push={"rounds": RoundMetrics(round=2, loss=0.25), "lost_learners": "learner-node-2"},
    )

    project = store.get_project("p1")
    assert project is not None
    assert project.phases["training"] == Phase(started_at=2000.0, ended_at=2010.0)
    assert project.phases["build"].seconds == 2.0
    assert project.status is ProjectStatus.TRAINING
    assert project.nodes == ["node-1", "n-9"]
    assert [e.message for e in project.events] == ["created", "learner up", "round 2"]
    assert [r.round for r in project.rounds] == [1, 2]
    assert project.lost_learners == ["learner-node-2"]
    assert project.updated_at > 1000.0


def test_concurrent_updates_lose_nothing(store: ProjectStore) -> None:
    store.insert_project(record("p1"))
    per_thread = 25

    def work(thread: int) -> None:
        for i in range(per_thread):
            event = Event(timestamp=float(i), type="round", status="running", message=f"{thread}")
            store.update_project(
                "p1",
                {"status_message": f"{thread}/{i}"},
                event=event,
                push={"rounds": {"round": thread * 100 + i}},
            )

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    project = store.get_project("p1")
    assert project is not None
    assert len(project.events) == 2 + 8 * per_thread
    pushed = sorted(r.round or 0 for r in project.rounds[1:])
    assert pushed == sorted(t * 100 + i for t in range(8) for i in range(per_thread))
    [summary], _ = store.find_projects({"project_id": "p1"})
    assert summary["status_message"] == project.status_message


def test_find_projects_filters_pages_and_orders_oldest_first(store: ProjectStore) -> None:
    for project_id, created_at, customer, status in [
        ("p3", 3.0, "bob", ProjectStatus.TRAINING),
        ("p1", 1.0, "alice", ProjectStatus.TRAINING),
        ("p5", 5.0, "alice", ProjectStatus.FAILED),
        ("p2", 2.0, "bob", ProjectStatus.COMPLETED),
        ("p4", 4.0, "alice", ProjectStatus.TRAINING),
    ]:
        store.insert_project(record(project_id, created_at, customer, status))

    everything, total = store.find_projects({})
    assert [s["project_id"] for s in everything] == ["p1", "p2", "p3", "p4", "p5"]
    assert total == 5
    assert set(everything[0]) == set(SUMMARY_FIELDS)
    page, total = store.find_projects({}, offset=1, limit=2)
    assert ([s["project_id"] for s in page], total) == (["p2", "p3"], 5)
    alices, total = store.find_projects({"customer_id": "alice"}, offset=1, limit=1)
    assert ([s["project_id"] for s in alices], total) == (["p4"], 3)
    training, total = store.find_projects({"customer_id": "alice", "status": "training"})
    assert ([s["project_id"] for s in training], total) == (["p1", "p4"], 2)
    assert store.find_projects({"customer_id": "carol"}) == ([], 0)
    assert [p.id for p in store.list_projects()] == ["p1", "p2", "p3", "p4", "p5"]
    with pytest.raises(ValueError, match="sla"):
        store.find_projects({"sla": "x"})


def test_summaries_follow_writes(store: ProjectStore) -> None:
    store.insert_project(record("p1"))
    store.insert_project(record("p2", created_at=2000.0))

    store.update_project("p1", {"status": ProjectStatus.FAILED, "status_message": "broken"})

    [failed], total = store.find_projects({"status": "failed"})
    assert total == 1
    assert (failed["project_id"], failed["status_message"]) == ("p1", "broken")
    assert failed["updated_at"] > 1000.0
    assert store.find_projects({"status": "pending"})[1] == 1


@pytest.mark.parametrize(
    ("fields", "push", "named"),
    [
        ({"bogus": 1}, None, "bogus"),
        ({"bogus.inner": 1}, None, "bogus.inner"),
        ({}, {"not_a_list_field": 1}, "not_a_list_field"),
        ({"_id": "other"}, None, "_id"),
        ({"events": []}, {"events": {"x": 1}}, "events"),
    ],
)
def test_bad_update_is_refused_and_writes_nothing(
    store: ProjectStore, fields: dict[str, Any], push: dict[str, Any] | None, named: str
) -> None:
    store.insert_project(record("p1"))

    with pytest.raises(ValueError, match=named):
        store.update_project("p1", {"status_message": "changed", **fields}, push=push)

    assert store.get_project("p1") == record("p1")


def test_reopened_store_finds_everything(store_url: str) -> None:
    first = open_store(store_url)
    first.insert_project(record("p2", created_at=2.0))
    first.insert_project(record("p1", created_at=1.0))
    first.update_project("p1", {"status": ProjectStatus.COMPLETED}, event=None)
    first.upsert_node({"node_id": "n1", "tags": {"mnist": 10}})
    expected = first.list_projects()
    first.close()

    second = open_store(store_url)
    try:
        assert second.list_projects() == expected
        assert [p.id for p in expected] == ["p1", "p2"]
        assert second.find_projects({"status": "completed"})[0][0]["project_id"] == "p1"
        assert second.list_nodes() == [{"_id": "n1", "node_id": "n1", "tags": {"mnist": 10}}]
    finally:
        second.close()


def test_nodes_are_upserted_listed_and_deleted(store: ProjectStore) -> None:
    store.upsert_node({"node_id": "n2", "tags": {}})
    store.upsert_node({"node_id": "n1", "tags": {"a": 1}})
    store.upsert_node({"node_id": "n2", "tags": {"b": 2}})

    assert [(n["node_id"], n["tags"]) for n in store.list_nodes()] == [
        ("n1", {"a": 1}),
        ("n2", {"b": 2}),
    ]
    assert store.delete_node("n1") is True
    assert store.delete_node("n1") is False
    assert [n["_id"] for n in store.list_nodes()] == ["n2"]


def test_delete_all_removes_projects_and_nodes(store: ProjectStore) -> None:
    store.insert_project(record("p1"))
    store.upsert_node({"node_id": "n1"})

    store.delete_all()

    assert store.list_projects() == []
    assert store.find_projects({}) == ([], 0)
    assert store.get_project("p1") is None
    assert store.list_nodes() == []


def test_older_document_with_unknown_key_still_loads(store_url: str) -> None:
    doc = {**record("old").document(), "retired_field": {"x": 1}}
    raw_database(store_url)["projects"].insert_one(doc)

    opened = open_store(store_url)
    try:
        assert opened.get_project("old") == record("old")
        assert [p.id for p in opened.list_projects()] == ["old"]
        assert opened.find_projects({"customer_id": "alice"})[1] == 1
        opened.update_project("old", {"status": ProjectStatus.CANCELLED})
        loaded = opened.get_project("old")
        assert loaded is not None and loaded.status is ProjectStatus.CANCELLED
    finally:
        opened.close()


def test_open_store_picks_the_implementation(store_url: str, store: ProjectStore) -> None:
    expected = MongoProjectStore if store_url.startswith("mongodb://") else EmbeddedProjectStore
    assert type(store) is expected


def test_unreachable_mongo_is_store_unavailable_without_credentials() -> None:
    port = find_free_port("127.0.0.1")
    url = f"mongodb://flops:s3cret@127.0.0.1:{port}/flops?authSource=admin"

    with pytest.raises(StoreUnavailable) as caught:
        MongoProjectStore(url, server_selection_timeout_s=0.3)

    assert f"mongodb://127.0.0.1:{port}/flops" in caught.value.message
    assert "s3cret" not in caught.value.message and "flops:" not in caught.value.message
    assert caught.value.code == "store_unavailable"
    assert http_status(caught.value) == 503


def test_public_url_drops_credentials_and_options() -> None:
    assert public_url("mongodb+srv://u:p@a.example,b.example/db?x=1") == (
        "mongodb+srv://a.example,b.example/db"
    )
    assert public_url("mongodb://h:1") == "mongodb://h:1"
