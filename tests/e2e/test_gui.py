"""The MLflow GUI through the manager, in headless Chromium (Debian's ``chromium``).

A finished project (MNIST, two local nodes, two rounds) on a manager with the embedded MLflow
(basic-auth app on) listening on every interface and advertised on this machine's outside
address. The browser opens the manager's ``/api/flops/tracking/projects/{id}`` without a
token, is redirected to the project's run page in the MLflow GUI, logs in with the customer's
MLflow user (``POST /tracking/credential``) when MLflow asks (HTTP basic auth), and finds the
per-round ``accuracy`` chart. Screenshots go to ``$FLOPS_TEST_ARTIFACTS`` (default
``tests/artifacts/gui``), printed at the end.

The browser is driven over the Chrome DevTools protocol (a WebSocket, ``websockets``) with
the flags that work in a container without a display or a sandbox.
"""

import base64
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flow_testing import MockNodes
from mqtt_testing import manager_mqtt
from waiting import wait_until
from websockets.sync.client import ClientConnection, connect

from flops_manager.broker import MosquittoBroker
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla, run_project
from flops_manager.suite import ManagerSuite

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    "--remote-debugging-port=0",
)
"""Flags that start Chromium here: no display, no user namespaces for its sandbox, no network
calls of its own; the DevTools port is picked by Chromium (read from ``DevToolsActivePort``)."""

ROUNDS = 2
PROJECT_TIMEOUT_S = 300
PAGE_TIMEOUT_S = 60
ACCURACY_CHART_JS = """(() => {
  const title = document.querySelector('[title="accuracy"]');
  const card = title && title.closest('[data-testid=experiment-view-compare-runs-card]');
  const plot = card && card.querySelector('.js-plotly-plot');
  if (plot) {
    return {points: plot.querySelectorAll('.scatterlayer .point').length,
            lines: plot.querySelectorAll('.scatterlayer .js-line').length};
  }
  const section = [...document.querySelectorAll(
      '[data-testid=experiment-view-compare-runs-section-header]')]
    .find(h => h.innerText.includes('Model metrics'));
  (card || section || document.body).scrollIntoView({block: 'center'});
  return null;
})()"""
"""The marks of the run page's ``accuracy`` chart (the Plotly plot in the chart card titled
``accuracy``: the aggregated one, in the "Model metrics" section; the learners' cards are
titled ``learner.<name>/accuracy``), or ``null`` after scrolling towards it (the GUI draws
only the charts in view)."""

TAB_CENTRE_JS = """((name) => {
  const tab = [...document.querySelectorAll('[role=tab]')].find(t => t.innerText.trim() === name);
  if (!tab) return null;
  const box = tab.getBoundingClientRect();
  return [box.x + box.width / 2, box.y + box.height / 2];
})(%s)"""
"""The centre of the page's tab named ``%s`` (a JSON string), or ``null``."""

ARTIFACTS = Path(os.environ.get("FLOPS_TEST_ARTIFACTS", Path(__file__).parents[1] / "artifacts"))


def outside_address() -> str:
    """This machine's address on its default route (what another machine reaches it on);
    skips the test when there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
        except OSError:
            pytest.skip("this machine has no route off loopback")
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol.

    ``credentials(username, password)`` answers every HTTP authentication challenge (what a
    user types into the browser's login dialog); :meth:`evaluate` runs JavaScript in the page.
    """

    def __init__(self, profile: Path) -> None:
        self._process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        active = profile / "DevToolsActivePort"
        wait_until(active.exists, 30, "Chromium did not open its DevTools port")
        port = wait_until(lambda: active.read_text().split("\n")[0].strip(), 10)
        pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        self._socket: ClientConnection = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._ids = itertools.count(1)
        self._answers: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.login: tuple[str, str] | None = None
        self.challenges = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.call("Page.enable")
        self.call("Fetch.enable", patterns=[{"urlPattern": "*"}], handleAuthRequests=True)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command; its ``result`` (``AssertionError`` on an error)."""
        ident = next(self._ids)
        answer: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._answers[ident] = answer
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        message = answer.get(timeout=PAGE_TIMEOUT_S)
        assert "error" not in message, f"{method}: {message['error']}"
        result: dict[str, Any] = message.get("result", {})
        return result

    def _read(self) -> None:
        """Route answers to their callers; continue paused requests, answer logins."""
        try:
            for raw in self._socket:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        waiting = self._answers.pop(message["id"], None)
                    if waiting is not None:
                        waiting.put(message)
                elif message.get("method") == "Fetch.requestPaused":
                    self._send("Fetch.continueRequest", requestId=message["params"]["requestId"])
                elif message.get("method") == "Fetch.authRequired":
                    self._answer_login(message["params"]["requestId"])
        except Exception:  # the socket closes when the browser stops
            return

    def _answer_login(self, request_id: str) -> None:
        self.challenges += 1
        if self.login is None:
            response = {"response": "CancelAuth"}
        else:
            username, password = self.login
            response = {
                "response": "ProvideCredentials",
                "username": username,
                "password": password,
            }
        self._send("Fetch.continueWithAuth", requestId=request_id, authChallengeResponse=response)

    def _send(self, method: str, **params: Any) -> None:
        """A command whose answer nobody waits for."""
        self._socket.send(json.dumps({"id": next(self._ids), "method": method, "params": params}))

    def evaluate(self, expression: str) -> Any:
        """The value of the JavaScript ``expression`` in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def click_tab(self, name: str) -> None:
        """Click the tab named ``name`` as a user does (mouse events at its centre); waits
        for it to appear."""
        centre = wait_until(
            lambda: self.evaluate(TAB_CENTRE_JS % json.dumps(name)),
            PAGE_TIMEOUT_S,
            f"no tab {name!r} on the page",
        )
        for event in ("mouseMoved", "mousePressed", "mouseReleased"):
            x, y = centre
            self.call("Input.dispatchMouseEvent", type=event, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        """Save the page as a PNG at ``path``."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        self._socket.close()
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    browser = Chromium(tmp_path / "chromium-profile")
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def gui_suite(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    """A manager with its own MLflow (basic auth on), reachable on the outside address."""
    config = ManagerConfig(
        home=Path(tmp_path_factory.mktemp("gui-home")),
        port=0,
        **manager_mqtt(mqtt_broker),
        bind_host="0.0.0.0",
        public_host=outside_address(),
    )
    with ManagerSuite(config) as suite:
        yield suite


@pytest.fixture(scope="module")
def finished(gui_suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[dict[str, Any]]:
    """The finished MNIST project (two learners, :data:`ROUNDS` rounds) and the client."""
    with mnist_nodes(gui_suite, 2) as api:
        sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2)
        project = run_project(api, sla, PROJECT_TIMEOUT_S)
        assert project["status"] == "completed", project["status_message"]
        yield {"project": project, "api": api}


def _customer_login(api: ManagerClient) -> tuple[str, str]:
    """The customer's MLflow user and a new password (``POST /tracking/credential``)."""
    issued = api.tracking_credential()
    return issued["username"], issued["password"]


def test_the_browser_reaches_the_projects_accuracy_chart(
    gui_suite: ManagerSuite, finished: dict[str, Any], chromium: Chromium
) -> None:
    project = finished["project"]
    mlflow = project["mlflow"]
    chromium.login = _customer_login(finished["api"])
    shots = ARTIFACTS / "gui"
    if shots.exists():
        shutil.rmtree(shots)

    chromium.call(
        "Page.navigate", url=f"{gui_suite.url}/api/flops/tracking/projects/{project['project_id']}"
    )
    run_page = (
        f"{gui_suite.tracking_url}/#/experiments/{mlflow['experiment_id']}/runs/{mlflow['run_id']}"
    )
    wait_until(
        lambda: str(chromium.evaluate("location.href")).startswith(run_page),
        PAGE_TIMEOUT_S,
        lambda: f"not redirected to the run page: {chromium.evaluate('location.href')}",
    )
    assert chromium.challenges >= 1  # MLflow asked for the login
    text = wait_until(  # the model-training view's navigation, not the GenAI one
        lambda: (lambda t: t if "Model registry" in t else None)(
            str(chromium.evaluate("document.body.innerText"))
        ),
        PAGE_TIMEOUT_S,
        "the run page did not open on the model-training view",
    )
    assert "Evaluation runs" not in text
    chromium.screenshot(shots / "run-overview.png")

    chromium.click_tab("Model metrics")
    chart = wait_until(
        lambda: chromium.evaluate(ACCURACY_CHART_JS),
        PAGE_TIMEOUT_S,
        lambda: (
            "no accuracy chart on the run page: "
            + str(chromium.evaluate("document.body.innerText.slice(0, 2000)"))
        ),
    )
    path = chromium.screenshot(shots / "accuracy-chart.png")
    print(f"\nGUI screenshots: {path.parent} (accuracy chart: {chart})")
    assert chart["points"] == ROUNDS  # one per round
    assert path.stat().st_size > 10_000
