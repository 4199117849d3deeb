"""The orchestrator base class's bookkeeping (exits reported once, stops not reported,
re-attach) through the ``local`` backend with tiny real child processes, and the ``oakestra``
backend's aggregator ports against the Oakestra double running instances as host processes."""

import socket
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from oakestra_double import OakestraDouble, WorkerSpec

from flops_manager.errors import ServiceUnavailable
from flops_manager.orchestrators.base import (
    Deployment,
    Orchestrator,
    Placement,
    Service,
    ServiceExit,
    ServiceSpec,
)
from flops_manager.orchestrators.local import LocalOrchestrator
from flops_manager.orchestrators.oakestra import OakestraOrchestrator
from flops_manager.orchestrators.oakestra_client import OakestraClient
from flops_manager.orchestrators.ports import (
    ephemeral_range,
    first_free_port,
    is_bindable,
    local_aggregator_port,
    outside_ephemeral,
    parse_port_range,
)
from flops_manager.process_identity import ProcessIdentity
from flops_utils import env_vars

Exit = tuple[str, str, int | None, str]

PROGRAMS = {
    # binds FLOPS_AGGREGATOR_ADDRESS and greets every connection until it is stopped
    "fake_aggregator": """
        import os, socket
        host, _, port = os.environ["FLOPS_AGGREGATOR_ADDRESS"].rpartition(":")
        server = socket.create_server((host, int(port)))
        print("listening on", host, port, flush=True)
        while True:
            connection, _ = server.accept()
            connection.sendall(b"hello from the aggregator\\n")
            connection.close()
    """,
    # connects to FLOPS_AGGREGATOR_ADDRESS (retrying for 30 s), prints the greeting, exits 0
    "fake_learner": """
        import os, socket, time
        host, _, port = os.environ["FLOPS_AGGREGATOR_ADDRESS"].rpartition(":")
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=2) as connection:
                    print("got:", connection.makefile().readline().strip(), flush=True)
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    """,
    "sleeper": """
        import time
        print("sleeping", flush=True)
        time.sleep(120)
    """,
    "quick": """
        print("done", flush=True)
    """,
    "crasher": """
        import sys
        print("loading the data", flush=True)
        print("boom: no data tag mnist on this node", file=sys.stderr, flush=True)
        sys.exit(6)
    """,
    # runs until the file named by FLOPS_TEST_FLAG exists, then exits 3
    "waiter": """
        import os, sys, time
        print("waiting", flush=True)
        while not os.path.exists(os.environ["FLOPS_TEST_FLAG"]):
            time.sleep(0.05)
        print("told to stop", flush=True)
        sys.exit(3)
    """,
}


def wait_for(condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s}s")


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with one module per entry of :data:`PROGRAMS`."""
    directory = tmp_path_factory.mktemp("programs")
    for name, code in PROGRAMS.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(code))
    return directory


class Exits:
    """Collects ``on_service_exit`` calls."""

    def __init__(self) -> None:
        self.calls: list[Exit] = []
        self._lock = threading.Lock()

    def __call__(self, project_id: str, name: str, code: int | None, line: str) -> None:
        with self._lock:
            self.calls.append((project_id, name, code, line))

    def of(self, project_id: str) -> list[Exit]:
        with self._lock:
            return [call for call in self.calls if call[0] == project_id]


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
def local(tmp_path: Path, exits: Exits) -> Iterator[LocalOrchestrator]:
    orchestrator = LocalOrchestrator(tmp_path / "services", exits, poll_interval_s=0.1)
    yield orchestrator
    orchestrator.close()


def local_deployment(
    project_id: str, programs: Path, *modules: tuple[str, str], env: dict[str, str] | None = None
) -> Deployment:
    """``modules``: ``(service name, module)``, the aggregator first."""
    common = {env_vars.ML_REPO_DIR: str(programs), **(env or {})}
    services = tuple(ServiceSpec(name, module, dict(common)) for name, module in modules)
    return Deployment(project_id, services, python=Path(sys.executable))


def settle(orchestrator: Orchestrator, exits: Exits, programs: Path, marker: str) -> None:
    """Run one more project whose service exits at once and wait for its report: by then
    the watcher has polled every tracked service again."""
    orchestrator.deploy(
        local_deployment(marker, programs, ("aggregator", "sleeper"), ("learner-q", "quick"))
    )
    wait_for(lambda: exits.of(marker), 30)
    orchestrator.stop(marker)


# ---- ports -----------------------------------------------------------------------------------


def test_port_ranges_parse_and_the_ephemeral_range_is_avoided(tmp_path: Path) -> None:
    custom = tmp_path / "ip_local_port_range"
    custom.write_text("20000\t20100\n")

    assert parse_port_range("30000-30999") == (30000, 30999)
    assert parse_port_range("31000") == (31000, 31000)
    for bad in ("30999-30000", "a-b", "0-10", "1-70000"):
        with pytest.raises(ValueError):
            parse_port_range(bad)
    assert ephemeral_range(custom) == (20000, 20100)
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
    assert outside_ephemeral([19999, 20000, 20100, 20101], (20000, 20100)) == [19999, 20101]
    low, high = ephemeral_range()
    for _ in range(20):
        port = local_aggregator_port(set())
        assert not low <= port <= high
        assert is_bindable(port)


def test_a_port_in_use_is_skipped_and_none_left_is_a_clear_error() -> None:
    free = local_aggregator_port(set())

    with socket.create_server(("127.0.0.1", free)):
        assert not is_bindable(free)
        with pytest.raises(ServiceUnavailable, match=r"No free port .*widen the port range"):
            first_free_port([free], set(), "127.0.0.1")

    assert first_free_port([free, free + 1], {free}) == free + 1
    assert first_free_port([free, free + 1], set(), "127.0.0.1") == free


# ---- the local backend -----------------------------------------------------------------------


def test_deploy_returns_the_address_the_learners_reach(
    local: LocalOrchestrator, exits: Exits, programs: Path
) -> None:
    started: list[dict[str, Any]] = []
    deployment = local_deployment(
        "reach",
        programs,
        ("aggregator", "fake_aggregator"),
        ("learner-a", "fake_learner"),
        ("learner-b", "fake_learner"),
    )

    address = local.deploy(deployment, started.append)
    wait_for(lambda: len(exits.of("reach")) == 2, 60)
    running = local.running_services("reach")
    local.stop("reach")

    host, _, port = address.rpartition(":")
    low, high = ephemeral_range()
    assert host == "127.0.0.1" and not low <= int(port) <= high
    assert [h["name"] for h in started] == ["aggregator", "learner-a", "learner-b"]
    assert sorted(exits.of("reach")) == [
        ("reach", "learner-a", 0, "got: hello from the aggregator"),
        ("reach", "learner-b", 0, "got: hello from the aggregator"),
    ]
    assert running == ["aggregator"]
    log = Path(started[0]["log_path"]).read_text()
    assert f"listening on 127.0.0.1 {port}" in log
    assert local.running_services("reach") == []


def test_an_exit_is_reported_once_and_a_crash_with_its_code_and_last_line(
    local: LocalOrchestrator, exits: Exits, programs: Path
) -> None:
    local.deploy(
        local_deployment("crash", programs, ("aggregator", "sleeper"), ("learner-x", "crasher"))
    )
    wait_for(lambda: exits.of("crash"), 30)

    settle(local, exits, programs, "settle1")
    settle(local, exits, programs, "settle2")

    assert exits.of("crash") == [("crash", "learner-x", 6, "boom: no data tag mnist on this node")]
    assert local.running_services("crash") == ["aggregator"]


def test_stopped_services_are_not_reported_as_exits(
    local: LocalOrchestrator, exits: Exits, programs: Path
) -> None:
    started: list[dict[str, Any]] = []
    local.deploy(
        local_deployment("stopped", programs, ("aggregator", "sleeper"), ("learner-a", "sleeper")),
        started.append,
    )
    wait_for(lambda: len(local.running_services("stopped")) == 2, 30)

    local.stop("stopped")
    settle(local, exits, programs, "settle")

    assert exits.of("stopped") == []
    assert local.running_services("stopped") == []
    for handle in started:
        identity = ProcessIdentity.from_dict(handle)
        assert identity is not None and not identity.is_alive()


class GatedLocal(LocalOrchestrator):
    """Holds the watcher inside its first poll that finds an exit until ``release`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.holding = threading.Event()
        self.release = threading.Event()

    def _poll(self, service: Service) -> ServiceExit | None:
        ended = super()._poll(service)
        if ended is not None and not self.holding.is_set():
            self.holding.set()
            self.release.wait(timeout=30)
        return ended


def test_a_stop_racing_a_natural_exit_is_not_reported(
    tmp_path: Path, exits: Exits, programs: Path
) -> None:
    gated = GatedLocal(tmp_path, exits, poll_interval_s=0.1)
    gated.deploy(local_deployment("race", programs, ("aggregator", "quick")))
    wait_for(gated.holding.is_set, 30)  # the watcher saw the exit but has not reported it

    gated.stop("race")
    gated.release.set()
    settle(gated, exits, programs, "settle")
    gated.close()

    assert exits.of("race") == []


def test_concurrent_deployments_get_different_ports(
    local: LocalOrchestrator, programs: Path
) -> None:
    addresses: list[str] = []

    def deploy(project_id: str) -> None:
        deployment = local_deployment(project_id, programs, ("aggregator", "fake_aggregator"))
        addresses.append(local.deploy(deployment))

    threads = [threading.Thread(target=deploy, args=(f"p{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(addresses)) == 4
    wait_for(lambda: all(local.running_services(f"p{i}") for i in range(4)), 30)


def test_a_new_orchestrator_reattaches_watches_and_stops_the_services(
    tmp_path: Path, exits: Exits, programs: Path
) -> None:
    # Setup: a manager deploys, then closes without stopping the services
    flag = tmp_path / "flag"
    first = LocalOrchestrator(tmp_path / "services", exits, poll_interval_s=0.1)
    handles: list[dict[str, Any]] = []
    first.deploy(
        local_deployment(
            "again",
            programs,
            ("aggregator", "sleeper"),
            ("learner-w", "waiter"),
            env={"FLOPS_TEST_FLAG": str(flag)},
        ),
        handles.append,
    )
    wait_for(lambda: all(Path(h["log_path"]).read_text().strip() for h in handles), 30)
    first.close(stop_services=False)
    gone = {**handles[1], "name": "learner-gone", "start_ticks": 1}

    # Execute: the next manager re-attaches; the learner then ends on its own
    second = LocalOrchestrator(tmp_path / "services", exits, poll_interval_s=0.1)
    states = second.reattach("again", [*handles, gone])
    running = second.running_services("again")
    flag.touch()
    wait_for(lambda: exits.of("again"), 30)
    second.stop("again")
    second.close()

    # Assert
    assert [(s.name, s.running) for s in states] == [
        ("aggregator", True),
        ("learner-w", True),
        ("learner-gone", False),
    ]
    assert states[0].last_output == "sleeping"
    assert sorted(running) == ["aggregator", "learner-w"]
    assert exits.of("again") == [("again", "learner-w", None, "told to stop")]
    aggregator = ProcessIdentity.from_dict(handles[0])
    assert aggregator is not None and not aggregator.is_alive()


# ---- the oakestra backend against the double ---------------------------------------------


AGGREGATOR_IMAGE = "registry.test/flops/aggregator:1"
LEARNER_IMAGE = "registry.test/flops/learner:1"


@pytest.fixture(scope="module")
def double(programs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OakestraDouble]:
    """Two workers; the images run the fake aggregator and learner as host processes."""
    images = {
        AGGREGATOR_IMAGE: [sys.executable, str(programs / "fake_aggregator.py")],
        LEARNER_IMAGE: [sys.executable, str(programs / "fake_learner.py")],
    }
    with OakestraDouble(
        tmp_path_factory.mktemp("oakestra"),
        workers=(WorkerSpec("cluster1", "worker1"), WorkerSpec("cluster2", "worker2")),
        process_images=images,
    ) as running:
        yield running


@pytest.fixture
def port_range() -> tuple[int, int]:
    """Ten ports outside the ephemeral range, free on this machine (the double's instances
    share its network)."""
    first = local_aggregator_port(set())
    while not all(is_bindable(port) for port in range(first, first + 10)):
        first = local_aggregator_port(set())
    return first, first + 9


def oakestra(
    double: OakestraDouble, exits: Exits, port_range: tuple[int, int]
) -> OakestraOrchestrator:
    return OakestraOrchestrator(
        OakestraClient(double.url, "Admin", "Admin", timeout_s=5, backoff_s=0.05),
        exits,
        poll_interval_s=0.2,
        aggregator_start_timeout_s=30,
        port_range=port_range,
    )


def oakestra_deployment(project_id: str) -> Deployment:
    """An aggregator placed anywhere (the double takes the first worker) and a learner on
    ``cluster1/worker1``."""
    return Deployment(
        project_id,
        (
            ServiceSpec("aggregator", "aggregator", {env_vars.PROJECT_ID: project_id}),
            ServiceSpec(
                "learner-n1",
                "learner",
                {env_vars.PROJECT_ID: project_id},
                Placement("cluster1", "worker1", ""),
            ),
        ),
        images={"aggregator": AGGREGATOR_IMAGE, "learner": LEARNER_IMAGE},
    )


def published_port(client: OakestraClient, handle: dict[str, Any]) -> str:
    return str(client.get_service(handle["service_id"])["port"])


def test_two_projects_on_one_worker_get_different_aggregator_ports(
    double: OakestraDouble, exits: Exits, port_range: tuple[int, int]
) -> None:
    orchestrator = oakestra(double, exits, port_range)
    handles: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}

    addresses = {p: orchestrator.deploy(oakestra_deployment(p), handles[p].append) for p in handles}
    wait_for(lambda: len(exits.of("one")) == 1 and len(exits.of("two")) == 1, 60)
    ports = {p: published_port(orchestrator.client, handles[p][0]) for p in handles}
    workers = {i["worker"] for i in double.instances()}
    orchestrator.close()

    (port_one, port_two) = (int(a.rpartition(":")[2]) for a in addresses.values())
    assert port_one != port_two
    assert all(port_range[0] <= port <= port_range[1] for port in (port_one, port_two))
    assert addresses == {"one": f"127.0.0.1:{port_one}", "two": f"127.0.0.1:{port_two}"}
    assert ports == {"one": f"{port_one}:{port_one}", "two": f"{port_two}:{port_two}"}
    assert workers == {"worker1"}
    for project_id in handles:
        assert exits.of(project_id) == [
            (
                project_id,
                "learner-n1",
                0,
                "Oakestra reports the instance COMPLETED: the instance exited with code 0",
            )
        ]
    assert [h["port"] for h in handles["one"]] == [port_one, None]


def test_reattached_aggregators_keep_their_ports_and_an_exhausted_range_is_clear(
    double: OakestraDouble, exits: Exits, port_range: tuple[int, int]
) -> None:
    # Setup: a manager deploys a project and closes without stopping it
    narrow = (port_range[0], port_range[0] + 1)
    first = oakestra(double, exits, narrow)
    handles: list[dict[str, Any]] = []
    first.deploy(oakestra_deployment("kept"), handles.append)
    first.close(stop_services=False)

    # Execute: the next manager re-attaches, deploys two more projects in the narrow range
    second = oakestra(double, exits, narrow)
    states = second.reattach("kept", handles)
    address = second.deploy(oakestra_deployment("next"))
    with pytest.raises(ServiceUnavailable, match="No free port for the aggregator"):
        second.deploy(oakestra_deployment("third"))
    second.stop("third")
    second.stop("kept")
    freed = second.deploy(oakestra_deployment("after"))
    second.close()

    # Assert
    assert (states[0].name, states[0].running) == ("aggregator", True)
    assert handles[0]["port"] == narrow[0]
    assert address == f"127.0.0.1:{narrow[1]}"
    assert freed == f"127.0.0.1:{narrow[0]}"
    check = OakestraClient(double.url, "Admin", "Admin")
    assert check.list_applications() == []
    check.close()
    wait_for(lambda: not [i for i in double.instances() if i["alive"]], 30)
