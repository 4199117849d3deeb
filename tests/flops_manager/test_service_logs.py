"""The services' own output through ``GET /api/flops/projects/{id}/logs``: the route on the WSGI
app over a real embedded store, with services that are real child processes of the ``local``
backend (their output in real files) and the ``oakestra`` backend against the Oakestra double
(instances run as host processes, their ``logs`` reported by its worker)."""

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from flask.testing import FlaskClient
from oakestra_double import OakestraDouble, WorkerSpec
from waiting import wait_until
from werkzeug.test import TestResponse

from flops_manager.app import create_app
from flops_manager.auth import Authenticator, Principal
from flops_manager.errors import NotFound
from flops_manager.orchestrators.base import (
    Deployment,
    LogSource,
    Orchestrator,
    Placement,
    ServiceHandle,
    ServiceSpec,
)
from flops_manager.orchestrators.local import FileLog, LocalOrchestrator
from flops_manager.orchestrators.oakestra import OakestraOrchestrator, new_lines
from flops_manager.orchestrators.oakestra_client import OakestraClient
from flops_manager.orchestrators.ports import is_bindable, local_aggregator_port
from flops_manager.projects import ProjectLifecycle
from flops_manager.records import ProjectRecord
from flops_manager.service_logs import (
    MAX_LOG_BYTES,
    MAX_LOG_LINES,
    TRUNCATED_HEADER,
    ServiceLogs,
    UnknownService,
)
from flops_manager.sla import ProjectSLA
from flops_manager.store import EmbeddedProjectStore, ProjectStore
from flops_utils import env_vars
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.net import find_free_port

PROGRAMS = {
    # the aggregator: greets, then waits until it is stopped
    "quiet_aggregator": """
        import time
        print("aggregator listening", flush=True)
        time.sleep(600)
    """,
    # a learner: prints a line, waits for FLOPS_TEST_FLAG, prints two more and exits
    "chatty_learner": """
        import os, sys, time
        print("learner: loaded 1200 rows", flush=True)
        while not os.path.exists(os.environ["FLOPS_TEST_FLAG"]):
            time.sleep(0.05)
        print("learner: round 1 fit", flush=True)
        print("learner: done", file=sys.stderr, flush=True)
    """,
    # an Oakestra learner: prints three lines and exits 0
    "oak_learner": """
        print("oak learner: round 1", flush=True)
        print("oak learner: round 2", flush=True)
        print("oak learner: done", flush=True)
    """,
}
SERVICES = ["aggregator", "learner-node-1"]
SECRET_TEXT = "the manager's own file, never a service's output"


class TokenAuth(Authenticator):
    """``admin-token`` is the admin; ``<name>-token`` is customer ``<name>``."""

    def authenticate(self, token: str) -> Principal:
        if token == "admin-token":
            return Principal(customer="Admin", admin=True)
        return Principal(customer=token.removesuffix("-token"))


class LogsLifecycle:
    """The part of ``ProjectLifecycle`` the logs route uses: the store and the orchestrator."""

    def __init__(self, store: ProjectStore, orchestrator: Orchestrator) -> None:
        self.store = store
        self.orchestrator = orchestrator

    def get(self, project_id: str) -> ProjectRecord:
        record = self.store.get_project(project_id)
        if record is None:
            raise NotFound(f"No project has id {project_id!r}.")
        return record


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("log-programs")
    for name, code in PROGRAMS.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(code))
    return directory


def record(
    project_id: str,
    handles: list[ServiceHandle],
    services: list[str] | None = None,
    status: ProjectStatus = ProjectStatus.TRAINING,
) -> ProjectRecord:
    now = time.time()
    return ProjectRecord(
        _id=project_id,
        project_id=project_id,
        customer_id="alice",
        status=status,
        status_message="",
        created_at=now,
        updated_at=now,
        sla=ProjectSLA(customerID="alice", ml_repo_url="https://git.example/ml.git").model_dump(
            mode="json"
        ),
        services=services if services is not None else [str(h["name"]) for h in handles],
        service_handles=handles,
    )


class Local:
    """A local orchestrator, a store and the app over them."""

    def __init__(self, workdir: Path, programs: Path) -> None:
        self.workdir = workdir
        self.programs = programs
        self.flag = workdir / "go-on"
        self.orchestrator = LocalOrchestrator(workdir / "services", lambda *_: None, 0.1)
        self.store = EmbeddedProjectStore(workdir / "db")
        lifecycle = LogsLifecycle(self.store, self.orchestrator)
        self.app = create_app(
            cast(ProjectLifecycle, lifecycle), self.store, "http://127.0.0.1:9", TokenAuth()
        )
        self.client: FlaskClient = self.app.test_client()

    def deploy(self, project_id: str) -> list[ServiceHandle]:
        """Store the project, then start its services (:meth:`deploy_into`)."""
        self.store.insert_project(record(project_id, [], services=SERVICES))
        return self.deploy_into(project_id)

    def deploy_into(self, project_id: str) -> list[ServiceHandle]:
        """Start the services of a stored project and store their handles one by one, as
        the lifecycle does."""
        env = {env_vars.ML_REPO_DIR: str(self.programs), "FLOPS_TEST_FLAG": str(self.flag)}
        deployment = Deployment(
            project_id,
            (
                ServiceSpec("aggregator", "quiet_aggregator", dict(env)),
                ServiceSpec("learner-node-1", "chatty_learner", dict(env)),
            ),
            python=Path(sys.executable),
        )
        handles: list[ServiceHandle] = []

        def started(handle: ServiceHandle) -> None:
            handles.append(handle)
            self.store.update_project(project_id, {}, push={"service_handles": handle})

        self.orchestrator.deploy(deployment, started)
        return handles

    def get(self, path: str, token: str = "alice-token", **kwargs: Any) -> TestResponse:
        return self.client.get(
            f"/api/flops/projects{path}", headers={"Authorization": f"Bearer {token}"}, **kwargs
        )

    def close(self) -> None:
        self.orchestrator.close()
        self.store.close()


@pytest.fixture
def local(tmp_path: Path, programs: Path) -> Iterator[Local]:
    running = Local(tmp_path, programs)
    yield running
    running.close()


def output_of(local: Local, project_id: str, service: str) -> str:
    response = local.get(f"/{project_id}/logs?service={service}")
    assert response.status_code == 200, response.text
    return response.text


def test_the_services_are_listed_and_a_learners_own_output_comes_through(local: Local) -> None:
    local.deploy("p-1")
    wait_until(lambda: "loaded" in output_of(local, "p-1", "learner-node-1"), 30)

    listing = local.get("/p-1/logs").get_json()
    text = local.get("/p-1/logs?service=learner-node-1")

    assert listing == {
        "project_id": "p-1",
        "status": "training",
        "services": [
            {"name": "aggregator", "role": "aggregator", "where": "local", "running": True},
            {"name": "learner-node-1", "role": "learner", "where": "local", "running": True},
        ],
    }
    assert text.mimetype == "text/plain"
    assert text.text == "learner: loaded 1200 rows\n"
    assert TRUNCATED_HEADER not in text.headers


def test_tail_gives_the_last_lines(local: Local) -> None:
    local.deploy("p-1")
    local.flag.touch()
    wait_until(lambda: "done" in output_of(local, "p-1", "learner-node-1"), 30)

    everything = output_of(local, "p-1", "learner-node-1").splitlines()
    last_two = local.get("/p-1/logs?service=learner-node-1&tail=2").text.splitlines()

    assert everything == ["learner: loaded 1200 rows", "learner: round 1 fit", "learner: done"]
    assert last_two == everything[-2:]
    assert local.get("/p-1/logs?service=learner-node-1&tail=0").status_code == 422
    assert local.get(f"/p-1/logs?service=x&tail={MAX_LOG_LINES + 1}").status_code == 422


def test_another_customer_gets_404_and_the_admin_reads_it(local: Local) -> None:
    local.deploy("p-1")
    wait_until(lambda: "loaded" in output_of(local, "p-1", "learner-node-1"), 30)

    for path in ("/p-1/logs", "/p-1/logs?service=learner-node-1"):
        other = local.get(path, token="bob-token")
        assert other.status_code == 404
        assert "loaded" not in other.text
        assert local.get(path, token="admin-token").status_code == 200


@pytest.mark.parametrize(
    "name",
    [
        "../secret",
        "../../secret",
        "..%2F..%2Fsecret",
        "aggregator/../../secret",
        "/etc/passwd",
        "learner-node-1/../aggregator",
        "nosuch",
    ],
)
def test_a_name_that_is_not_a_service_gets_404_naming_the_services(local: Local, name: str) -> None:
    local.deploy("p-1")
    (local.workdir / "services" / "secret.log").write_text(SECRET_TEXT)
    (local.workdir / "secret.log").write_text(SECRET_TEXT)

    response = local.get(f"/p-1/logs?service={name}")

    assert response.status_code == 404, response.text
    assert SECRET_TEXT not in response.text
    if name != "nosuch":  # the backend refuses it too, had a lookup let it through
        with pytest.raises(NotFound):
            local.orchestrator.service_log("p-1", LogSource(name, "local", {"name": name}))
    assert response.get_json()["error"] == "unknown_service"
    assert response.get_json()["details"] == [
        {"service": "aggregator"},
        {"service": "learner-node-1"},
    ]


def test_before_the_deployment_the_answer_says_so(local: Local) -> None:
    local.store.insert_project(record("p-2", [], services=[], status=ProjectStatus.BUILDING))

    listing = local.get("/p-2/logs").get_json()
    unknown = local.get("/p-2/logs?service=learner-node-1")

    assert listing["services"] == []
    assert unknown.status_code == 404
    assert "has started no services yet (it is building)" in unknown.get_json()["message"]


def test_a_huge_log_is_capped_in_lines_and_bytes(local: Local) -> None:
    project_dir = local.workdir / "services" / "p-3"
    project_dir.mkdir(parents=True)
    many = "".join(f"line {i}\n" for i in range(MAX_LOG_LINES + 500))
    (project_dir / "learner-a.log").write_text(many)
    wide = "x" * 1000 + "\n"
    (project_dir / "learner-b.log").write_text(wide * (MAX_LOG_BYTES // len(wide) + 100))
    handles: list[ServiceHandle] = [{"name": "learner-a"}, {"name": "learner-b"}]
    local.store.insert_project(record("p-3", handles, status=ProjectStatus.COMPLETED))

    by_lines = local.get("/p-3/logs?service=learner-a")
    by_bytes = local.get("/p-3/logs?service=learner-b")
    asked = local.get("/p-3/logs?service=learner-a&tail=3")

    assert by_lines.text.splitlines() == [f"line {i}" for i in range(500, MAX_LOG_LINES + 500)]
    assert by_lines.headers[TRUNCATED_HEADER] == "1"
    assert len(by_bytes.data) <= MAX_LOG_BYTES
    assert set(by_bytes.text.splitlines()) == {"x" * 1000}
    assert by_bytes.headers[TRUNCATED_HEADER] == "1"
    last = MAX_LOG_LINES + 500
    assert asked.text == f"line {last - 3}\nline {last - 2}\nline {last - 1}\n"
    assert TRUNCATED_HEADER not in asked.headers


def sse_data(chunks: Iterator[bytes]) -> Iterator[tuple[str, str]]:
    """``(event, data)`` of each server-sent event (``event`` empty for plain data)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            fields = dict(
                line.split(": ", 1) for line in block.decode().splitlines() if ": " in line
            )
            if "data" in fields:
                yield fields.get("event", ""), fields["data"]


def test_follow_streams_new_lines_until_the_service_ends(local: Local) -> None:
    local.deploy("p-1")
    wait_until(lambda: "loaded" in output_of(local, "p-1", "learner-node-1"), 30)

    response = local.get("/p-1/logs?service=learner-node-1&follow=1", buffered=False)
    events = sse_data(response.iter_encoded())
    first = next(events)
    local.flag.touch()  # only now does the learner go on
    rest = list(events)
    response.close()

    assert response.mimetype == "text/event-stream"
    assert first == ("", "learner: loaded 1200 rows")
    assert rest == [
        ("", "learner: round 1 fit"),
        ("", "learner: done"),
        ("end", "learner-node-1 ended"),
    ]


def test_follow_needs_a_service_and_a_finished_service_ends_at_once(local: Local) -> None:
    local.deploy("p-1")
    local.flag.touch()
    wait_until(lambda: "done" in output_of(local, "p-1", "learner-node-1"), 30)
    wait_until(lambda: "learner-node-1" not in local.orchestrator.running_services("p-1"), 30)

    without = local.get("/p-1/logs?follow=1")
    followed = local.get("/p-1/logs?service=learner-node-1&follow=1&tail=1")

    assert without.status_code == 422
    assert "events?follow=1" in without.get_json()["message"]
    assert list(sse_data(iter([followed.data]))) == [
        ("", "learner: done"),
        ("end", "learner-node-1 ended"),
    ]


def test_follow_waits_for_a_service_that_has_not_started_yet(local: Local) -> None:
    planned = record("p-4", [], services=SERVICES)
    local.store.insert_project(planned)
    logs = ServiceLogs(local.orchestrator, local.store)
    freed = threading.Event()
    received: list[str] = []
    follower = threading.Thread(
        target=lambda: received.extend(
            logs.follow(planned, logs.find(planned, "learner-node-1"), "learner-node-1", None,
                        freed.set)
        ),
        daemon=True,
    )  # fmt: skip
    follower.start()

    handles = local.deploy_into("p-4")
    local.flag.touch()
    follower.join(timeout=60)

    assert not follower.is_alive()
    assert [h["name"] for h in handles] == ["aggregator", "learner-node-1"]
    assert received == [
        "data: learner: loaded 1200 rows\n\n",
        "data: learner: round 1 fit\n\n",
        "data: learner: done\n\n",
        "event: end\ndata: learner-node-1 ended\n\n",
    ]
    assert freed.is_set()


def test_file_log_holds_back_an_unfinished_line(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    log = FileLog(path)

    assert log.read_tail(1024) == ([], False)  # no file yet
    path.write_bytes(b"first\nsec")
    assert log.read_new(1024) == ["first"]
    with path.open("ab") as f:
        f.write(b"ond\r\nthird \xff")
    assert log.read_new(1024) == ["second"]
    assert log.pending() == ["third \ufffd"]
    # the last 8 bytes begin inside "second\r\n": that line is left out, "third" held back
    assert log.read_tail(8) == ([], True)
    assert log.pending() == ["third \ufffd"]
    assert log.read_tail(100) == (["first", "second"], False)


def test_new_lines_of_a_sliding_window() -> None:
    assert new_lines([], ["a", "b"]) == ["a", "b"]
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines(["a", "b"], ["x", "y"]) == ["x", "y"]
    assert new_lines(["x", "a", "x"], ["a", "x", "a", "x"]) == ["a", "x"]


# ---- the oakestra backend against the double -------------------------------------------------

LEARNER_IMAGE = "registry.test/flops/learner:1"
AGGREGATOR_IMAGE = "registry.test/flops/aggregator:1"


@pytest.fixture(scope="module")
def double(programs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OakestraDouble]:
    images = {
        AGGREGATOR_IMAGE: [sys.executable, str(programs / "quiet_aggregator.py")],
        LEARNER_IMAGE: [sys.executable, str(programs / "oak_learner.py")],
    }
    with OakestraDouble(
        tmp_path_factory.mktemp("oakestra-logs"),
        workers=(WorkerSpec("cluster1", "worker1"),),
        process_images=images,
    ) as running:
        yield running


def free_ports() -> tuple[int, int]:
    """Ten ports outside the ephemeral range, free on this machine (the double's instances
    share its network)."""
    first = local_aggregator_port(set())
    while not all(is_bindable(port) for port in range(first, first + 10)):
        first = local_aggregator_port(set())
    return first, first + 9


def test_oakestra_instance_logs_come_through_also_after_the_service_was_deleted(
    double: OakestraDouble, tmp_path: Path
) -> None:
    ended: list[str] = []
    orchestrator = OakestraOrchestrator(
        OakestraClient(double.url, "Admin", "Admin", timeout_s=5, backoff_s=0.05),
        lambda _project, name, *_: ended.append(name),
        poll_interval_s=0.2,
        aggregator_start_timeout_s=30,
        port_range=free_ports(),
    )
    store = EmbeddedProjectStore(tmp_path / "db")
    try:
        deployment = Deployment(
            "oak1",
            (
                ServiceSpec("aggregator", "aggregator", {env_vars.PROJECT_ID: "oak1"}),
                ServiceSpec(
                    "learner-n1",
                    "learner",
                    {env_vars.PROJECT_ID: "oak1"},
                    Placement("cluster1", "worker1", ""),
                ),
            ),
            images={"aggregator": AGGREGATOR_IMAGE, "learner": LEARNER_IMAGE},
        )
        handles: list[ServiceHandle] = []
        orchestrator.deploy(deployment, handles.append)
        project = record("oak1", handles)
        store.insert_project(project)
        logs = ServiceLogs(orchestrator, store)
        wait_until(lambda: "learner-n1" in ended, 60, "the learner did not end")

        text, truncated = logs.text(project, "learner-n1", None)
        listing = logs.listing(project)

        assert text == "oak learner: round 1\noak learner: round 2\noak learner: done\n"
        assert not truncated
        assert [(s.name, s.where, s.running) for s in listing.services] == [
            ("aggregator", "oakestra", True),
            ("learner-n1", "oakestra", False),
        ]
        with pytest.raises(UnknownService):
            logs.text(project, "../learner-n1", None)
        followed = list(logs.follow(project, logs.find(project, "learner-n1"), "", 2, lambda: None))
        assert followed == [
            "data: oak learner: round 2\n\n",
            "data: oak learner: done\n\n",
            "event: end\ndata: learner-n1 ended\n\n",
        ]
        assert json.dumps(listing.model_dump()).count("service_id") == 0
    finally:
        orchestrator.close()
        store.close()


# ---- the CLI's errors ------------------------------------------------------------------------

CLI_TOKEN = "tok-" + "l0gs3cr3t" * 4


@pytest.mark.parametrize(
    "args",
    [(), ("--service", "learner-node-1"), ("-f", "--service", "learner-node-1", "--tail", "5")],
)
def test_flops_logs_names_an_unreachable_manager_in_one_line(args: tuple[str, ...]) -> None:
    closed = f"http://127.0.0.1:{find_free_port()}"
    env = {"PATH": "/usr/bin:/bin", "FLOPS_API_TOKEN": CLI_TOKEN, "COLUMNS": "200"}

    done = subprocess.run(
        [str(Path(sys.executable).with_name("flops")), "logs", "abc", *args, "--manager-url",
         closed],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip

    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"cannot reach the FLOps manager at {closed}" in output
    assert "Traceback" not in output and CLI_TOKEN not in output
    assert len(output.strip().splitlines()) <= 3, output
