"""``flops logs`` against the embedded default: one small MNIST project trains between real
child processes while the CLI follows a learner's own output through the API, then reads the
finished project's events, services and output."""

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flow_testing import MockNodes
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.client import TERMINAL_STATUSES, ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla
from flops_manager.suite import ManagerSuite

ROUNDS = 3
PROJECT_TIMEOUT_S = 600
LEARNER_DONE = "learner node-1 done"
"""What the learner's own log says last (``learner.main``)."""
CLI_TRACEBACK = re.compile(r'File "[^"]*/(flops_manager|typer|click|requests|urllib3)/')
"""A frame of the CLI's own code in a traceback (a learner's output may hold tracebacks of
its own: they come through as they are)."""
SERVICES_SHOWN = re.compile(r"read one with|no service output yet")
"""What ``flops logs ID`` prints after the events: the services, or that there are none yet."""

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def suite(manager_config: ManagerConfig) -> Iterator[ManagerSuite]:
    with ManagerSuite(manager_config) as running:
        yield running


@pytest.fixture(scope="module")
def client(suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[ManagerClient]:
    with mnist_nodes(suite, 2) as api:
        yield api


class Cli:
    """``flops`` as a user runs it, with the manager's URL and token in the environment."""

    def __init__(self, suite: ManagerSuite, home: Path) -> None:
        token = read_api_token(suite.config.home)
        assert token is not None
        self.token = token
        self.flops = str(Path(sys.executable).with_name("flops"))
        self.env = {
            "PATH": "/usr/bin:/bin",
            "COLUMNS": "160",
            "XDG_CONFIG_HOME": str(home),
            "FLOPS_MANAGER_URL": suite.url,
            "FLOPS_API_TOKEN": token,
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.flops, *args], capture_output=True, text=True, env=self.env, timeout=120,
            check=False,
        )  # fmt: skip

    def start(self, *args: str) -> "Follower":
        process = subprocess.Popen(
            [self.flops, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        return Follower(process)


class Follower:
    """A running ``flops`` whose output lines are collected as they come, each with the
    monotonic time it arrived."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def test_logs_follow_a_running_learner_and_read_the_finished_project(
    suite: ManagerSuite, client: ManagerClient, tmp_path: Path
) -> None:
    cli = Cli(suite, tmp_path)
    sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    project_id = client.create_project(sla)
    wait_until(lambda: client.project(project_id)["services"], PROJECT_TIMEOUT_S, "no deployment")
    learner = cli.start("logs", project_id, "-f", "--service", "learner-node-1")
    events = cli.start("logs", project_id, "--follow")
    ended_at: list[float] = []
    try:
        # Ctrl-C while following the events: it says the project keeps running
        wait_until(lambda: SERVICES_SHOWN.search(events.text()), 120, events.text)
        events.process.send_signal(signal.SIGINT)
        interrupted = events.wait(60)

        final = client.wait_for_project(project_id, PROJECT_TIMEOUT_S)
        ended_at.append(time.monotonic())
        followed = learner.wait(120)
    finally:
        learner.stop()
        events.stop()

    assert final["status"] == "completed", final["status_message"]
    # the follower streamed while the project ran and ended by itself once the learner ended
    assert followed == 0, learner.text()
    assert learner.lines and learner.lines[0][0] < ended_at[0], learner.text()
    assert LEARNER_DONE in learner.text()
    assert "Received: train message" in learner.text()
    assert interrupted == 130, events.text()
    assert f"project {project_id} keeps running" in events.text()
    assert "Traceback" not in events.text()
    assert not CLI_TRACEBACK.search(learner.text()), learner.text()

    # the finished project: its events and services, and a learner's own output
    overview = cli.run("logs", project_id)
    output = cli.run("logs", project_id, "--service", "learner-node-1")
    last = cli.run("logs", project_id, "--service", "learner-node-1", "--tail", "1")
    unknown = cli.run("logs", project_id, "--service", "../aggregator")

    assert overview.returncode == 0, overview.stdout + overview.stderr
    assert "completed" in overview.stdout
    for name in ("aggregator", "learner-node-1", "learner-node-2"):
        assert name in overview.stdout
    assert output.returncode == 0 and LEARNER_DONE in output.stdout
    assert "Received: train message" in output.stdout
    assert last.stdout.count("\n") == 1 and LEARNER_DONE in last.stdout
    assert unknown.returncode == 1
    assert "has no service '../aggregator'" in unknown.stdout
    assert "learner-node-1" in unknown.stdout
    everything: list[Any] = [overview, output, last, unknown]
    shown = learner.text() + events.text() + "".join(r.stdout + r.stderr for r in everything)
    assert cli.token not in shown
    assert not CLI_TRACEBACK.search(shown), shown
    assert final["status"] in TERMINAL_STATUSES
