"""``ManagerClient.follow_events``: a project's events from the manager's event stream, live,
each once and in order, across a dropped connection (resumed with ``Last-Event-ID``) and
when the manager refuses the stream (429: it polls instead). Real manager (waitress), real
Mosquitto; the projects hang in ``building`` on a tarpit git server until cancelled."""

import io
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import requests
from mqtt_testing import manager_mqtt
from rich.console import Console
from tarpit_testing import tarpit_server
from waiting import wait_until

import flops_manager.suite as suite_module
from flops_manager import cli_progress
from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.client import ApiError, ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite

FOLLOW_TIMEOUT_S = 120.0


def _config(home: Path, mqtt_broker: MosquittoBroker) -> ManagerConfig:
    return ManagerConfig(
        home=home,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url="http://127.0.0.1:9",
        insecure=frozenset({"mlflow"}),
    )


@pytest.fixture(scope="module")
def suite(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    with ManagerSuite(_config(tmp_path_factory.mktemp("follow-home"), mqtt_broker)) as running:
        yield running


@pytest.fixture(scope="module")
def tarpit() -> Iterator[str]:
    with tarpit_server() as url:
        yield f"{url}/slow.git"


def _client(suite: ManagerSuite, url: str | None = None) -> ManagerClient:
    client = ManagerClient(url or suite.url, token=read_api_token(suite.config.home))
    client.request(
        "POST",
        "/nodes",
        {"node_id": "edge-1", "data_server": "grpc://127.0.0.1:9999", "tags": {"mnist": 5}},
    )
    return client


def _hanging_project(client: ManagerClient, tarpit: str) -> str:
    """A project that stays ``building`` (its clone hangs) until cancelled."""
    return client.create_project(
        {
            "ml_repo_url": tarpit,
            "ml_model_flavor": "sklearn",
            "training_configuration": {"data_tags": ["mnist"]},
        }
    )


class _Follower:
    """Follows a project in a thread, collecting its events."""

    def __init__(self, client: ManagerClient, project_id: str, **options: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(client, project_id, options), daemon=True
        )
        self.thread.start()

    def _run(self, client: ManagerClient, project_id: str, options: dict[str, Any]) -> None:
        try:
            self.events.extend(client.follow_events(project_id, **options))
        except BaseException as exc:  # handed to the test
            self.error = exc

    def statuses(self) -> list[str]:
        return [event["status"] for event in list(self.events)]

    def finish(self) -> list[str]:
        self.thread.join(timeout=FOLLOW_TIMEOUT_S)
        assert not self.thread.is_alive(), "the follower did not end with the project"
        if self.error is not None:
            raise self.error
        return self.statuses()


class CuttableProxy:
    """A TCP proxy on loopback to ``port`` whose open connections the test can cut; it keeps
    the first bytes each connection sent (an HTTP request's head)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.heads: list[bytes] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, request: bool) -> None:
        first = request
        try:
            while data := source.recv(65536):
                if first:
                    self.heads.append(data)
                    first = False
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with _ignored():
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every open connection (as a network failure would)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with _ignored():
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


def _ignored() -> suppress:
    return suppress(OSError)


def test_events_arrive_live_each_once_and_end_with_the_project(
    suite: ManagerSuite, tarpit: str
) -> None:
    client = _client(suite)
    project_id = _hanging_project(client, tarpit)

    follower = _Follower(client, project_id, timeout_s=FOLLOW_TIMEOUT_S)
    live = wait_until(
        lambda: follower.statuses() if "building" in follower.statuses() else None,
        60,
        "the follower did not get the building event while the project builds",
    )
    building = client.project(project_id)["status"]
    client.request("DELETE", f"/projects/{project_id}")
    statuses = follower.finish()

    assert live == ["pending", "building"] and building == "building"
    assert statuses == ["pending", "building", "cancelled"]
    assert follower.events == client.project(project_id)["events"]


def test_a_dropped_stream_resumes_after_the_last_event(suite: ManagerSuite, tarpit: str) -> None:
    proxy = CuttableProxy(int(suite.url.rsplit(":", 1)[1]))
    try:
        client = _client(suite, proxy.url)
        project_id = _hanging_project(client, tarpit)
        follower = _Follower(client, project_id, timeout_s=FOLLOW_TIMEOUT_S)
        wait_until(lambda: "building" in follower.statuses(), 60, "no building event")

        proxy.cut()
        wait_until(
            lambda: sum(b"Last-Event-ID: 1" in head for head in proxy.heads),
            60,
            "the follower did not reconnect after the last event it got",
        )
        client.request("DELETE", f"/projects/{project_id}")
        statuses = follower.finish()
    finally:
        proxy.close()

    assert statuses == ["pending", "building", "cancelled"]
    assert follower.events == client.project(project_id)["events"]


def test_following_from_an_event_yields_the_rest(suite: ManagerSuite, tarpit: str) -> None:
    client = _client(suite)
    project_id = _hanging_project(client, tarpit)
    wait_until(lambda: client.project(project_id)["status"] == "building", 60, "not building")
    client.request("DELETE", f"/projects/{project_id}")

    rest = list(client.follow_events(project_id, start=1, timeout_s=FOLLOW_TIMEOUT_S))

    assert [event["status"] for event in rest] == ["building", "cancelled"]


def test_following_a_project_that_does_not_end_times_out(suite: ManagerSuite, tarpit: str) -> None:
    client = _client(suite)
    project_id = _hanging_project(client, tarpit)
    try:
        with pytest.raises(TimeoutError, match=project_id):
            list(client.follow_events(project_id, timeout_s=2))
    finally:
        client.request("DELETE", f"/projects/{project_id}")


def test_an_unknown_project_is_an_api_error(suite: ManagerSuite) -> None:
    client = _client(suite)

    with pytest.raises(ApiError) as raised:
        list(client.follow_events("nosuchproject", timeout_s=FOLLOW_TIMEOUT_S))

    assert raised.value.status == 404


def test_a_wrong_token_is_the_api_error_with_its_message(suite: ManagerSuite) -> None:
    project_id = _hanging_project(_client(suite), "http://127.0.0.1:9/never.git")
    stranger = ManagerClient(suite.url, token="wrong-" + "x" * 30)
    with pytest.raises(ApiError) as expected:
        stranger.project(project_id)

    with pytest.raises(ApiError) as raised:
        list(stranger.follow_events(project_id, timeout_s=FOLLOW_TIMEOUT_S))

    assert raised.value.status == expected.value.status == 401
    assert raised.value.message == expected.value.message and raised.value.message


def test_a_refused_stream_falls_back_to_polling(
    tmp_path: Path,
    mqtt_broker: MosquittoBroker,
    tarpit: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(suite_module, "API_THREADS", 5)
    monkeypatch.setattr(suite_module, "API_FREE_THREADS", 4)  # one event stream at most
    with ManagerSuite(_config(tmp_path / "home", mqtt_broker)) as suite:
        client = _client(suite)
        holder = _hanging_project(client, tarpit)
        project_id = _hanging_project(client, tarpit)
        url = f"{suite.url}/api/flops/projects/{holder}/events"
        headers = {"Authorization": f"Bearer {read_api_token(suite.config.home)}"}
        with requests.get(url, headers=headers, params={"follow": 1}, stream=True, timeout=30):
            refused = requests.get(url, headers=headers, params={"follow": 1}, timeout=30)
            follower = _Follower(client, project_id, timeout_s=FOLLOW_TIMEOUT_S, poll_s=0.2)
            wait_until(lambda: "building" in follower.statuses(), 60, "no building event")
            client.request("DELETE", f"/projects/{project_id}")
            statuses = follower.finish()
        client.request("DELETE", f"/projects/{holder}")

    assert refused.status_code == 429
    assert statuses == ["pending", "building", "cancelled"]


def test_progress_written_to_a_file_is_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_progress, "QUIET_S", 0.5)
    out = io.StringIO()
    console = Console(file=out, width=40)
    event = {"timestamp": 0.0, "type": "component", "status": "failed", "component": "learner 1"}

    with cli_progress.Activity(console) as activity:
        with activity.step("starting the manager"):
            wait_until(lambda: "still" in out.getvalue(), 10, "no 'still' line")
        activity.print(cli_progress.event_line({**event, "message": "bad [/red] " + "x" * 60}))

    lines = out.getvalue().splitlines()
    assert lines[0] == "... starting the manager"
    assert re.fullmatch(r"\.\.\. still starting the manager \(\d+ s\)", lines[1])
    assert re.fullmatch(r"done: starting the manager \(\d+\.\d s\)", lines[-2])
    assert lines[-1].endswith("failed        learner 1: bad [/red] " + "x" * 60)
    assert "\x1b" not in out.getvalue()


def test_replayed_rounds_are_numbered_each_with_its_own_metrics() -> None:
    rounds = [
        {"round": 1, "loss": 0.5, "accuracy": 0.8},
        {"round": 2, "loss": 0.25, "accuracy": 0.9},
    ]
    sla = {"training_configuration": {"training_rounds": 2}}
    project = {"project_id": "p1", "sla": sla, "rounds": rounds}
    out = io.StringIO()
    unused = ManagerClient("http://127.0.0.1:9")  # the project's rounds are known already

    with cli_progress.Activity(Console(file=out, width=200)) as activity:
        view = cli_progress.ProjectProgress(activity, unused, project)
        for number in (1, 2):
            view.on_event(
                {
                    "timestamp": 0.0,
                    "type": "round",
                    "status": "progress",
                    "component": "aggregator",
                    "message": f"round {number}: ...",
                }
            )

    assert "round 1/2: loss 0.5000, accuracy 0.8000" in out.getvalue()
    assert "round 2/2: loss 0.2500, accuracy 0.9000" in out.getvalue()
