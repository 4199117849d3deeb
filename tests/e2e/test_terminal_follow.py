"""``flops submit --follow`` in a real terminal (tmux): live progress while the project runs
(a spinner line with the elapsed time, each round as ``round R/N``), then the final summary;
no traceback and no token on the screen. One small training: the MNIST sklearn example, two
rounds, two local nodes."""

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flow_testing import MockNodes
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.client import TERMINAL_STATUSES, ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla
from flops_manager.suite import ManagerSuite

ROUNDS = 2
PROJECT_TIMEOUT_S = 600
FLOPS = str(Path(sys.executable).with_name("flops"))
SPINNER_LINE = re.compile(
    r"^[^\d\s]\s+.*(environment|aggregator|learners|training|post-training).*\s\d:\d\d:\d\d\s*$",
    re.MULTILINE,
)
"""A spinner, what the project waits for, the elapsed time (events start with a clock time)."""

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (scripts/bootstrap)"),
]


@pytest.fixture(scope="module")
def suite(manager_config: ManagerConfig) -> Iterator[ManagerSuite]:
    with ManagerSuite(manager_config) as running:
        yield running


@pytest.fixture(scope="module")
def client(suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[ManagerClient]:
    with mnist_nodes(suite, 2) as api:
        yield api


class Terminal:
    """A detached tmux session (120 x 40) on a tmux server of its own, running bash."""

    def __init__(self, env: dict[str, str]) -> None:
        self.socket = f"flops-test-{uuid.uuid4().hex[:8]}"
        self.env = env
        self.tmux("new-session", "-d", "-x", "120", "-y", "40", "bash --norc --noprofile")

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
            check=True,
        )
        return done.stdout

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-t", "0", "-l", line)
        self.tmux("send-keys", "-t", "0", "Enter")

    def screen(self) -> str:
        """What the terminal shows now."""
        return self.tmux("capture-pane", "-p", "-t", "0")

    def history(self) -> str:
        """Everything the terminal showed, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "0")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.env, check=False)


def test_submit_follow_shows_live_progress_and_the_summary(
    suite: ManagerSuite, client: ManagerClient, tmp_path: Path
) -> None:
    token = read_api_token(suite.config.home)
    assert token is not None
    sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    (tmp_path / "sla.json").write_text(json.dumps(sla))
    env = {
        "PATH": f"{Path(FLOPS).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "FLOPS_API_TOKEN": token,
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
    }
    terminal = Terminal(env)
    screens: list[str] = []
    try:
        terminal.type(
            f"cd {tmp_path} && flops submit --follow sla.json --manager-url {suite.url}; "
            'echo "FLOPS-""EXIT=$?"'  # the typed line does not hold the marker itself
        )
        accepted = wait_until(
            lambda: re.search(r"project (\w+) accepted", terminal.screen()), 60, "not accepted"
        )
        project_id = accepted.group(1)

        def round_shown_while_running() -> str | None:
            screen = terminal.screen()
            screens.append(screen)
            if f"round 1/{ROUNDS}" not in screen:
                return None
            return str(client.project(project_id)["status"])

        status_at_round = wait_until(
            round_shown_while_running, PROJECT_TIMEOUT_S, "no round line", interval_s=0.2
        )
        wait_until(
            lambda: "FLOPS-EXIT=" in terminal.history(), PROJECT_TIMEOUT_S, "flops did not end"
        )
        time.sleep(0.5)  # the shell's prompt after the exit line
        history = terminal.history()
    finally:
        terminal.close()
    again = subprocess.run(  # re-attaching (plain lines: not a terminal) to the ended project
        [FLOPS, "status", project_id, "--follow", "--manager-url", suite.url],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "120"},
        timeout=120,
        check=False,
    )

    assert status_at_round not in TERMINAL_STATUSES, "the round line came only at the end"
    assert any(SPINNER_LINE.search(screen) for screen in screens), screens[-1]
    assert "FLOPS-EXIT=0" in history, history
    assert re.search(r"status\s+completed", history), history
    assert re.search(r"accuracy\s+0\.\d{4}", history), history
    assert f"round {ROUNDS}/{ROUNDS}" in history, history
    assert "Traceback" not in history and token not in history
    assert again.returncode == 0, again.stdout + again.stderr
    assert "\x1b" not in again.stdout
    for number in range(1, ROUNDS + 1):  # each replayed round with its own number
        assert f"round {number}/{ROUNDS}: loss" in again.stdout, again.stdout
    assert re.search(r"status\s+completed", again.stdout), again.stdout
