"""``flops-data-server`` as a real child process, registering with a real loopback HTTP server."""

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pyarrow as pa
import pytest
from waiting import wait_until

from data_server.main import newest_credential
from data_server.registration import NodeRegistrar, node_architecture, registration_payload
from data_server.security import owner_credentials
from data_server.server import DataServer
from flops_utils.contract.exit_codes import ExitCode
from flops_utils.data_client import DataClient
from flops_utils.net import find_free_port, wait_for_port

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
CLI = [sys.executable, "-m", "data_server"]


@dataclass
class FakeManager:
    """A real HTTP server on loopback that records every POST to /api/flops/nodes.

    The first ``fail_first`` requests are answered 503, the rest 201.
    """

    url: str
    fail_first: int = 0
    posts: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        def matching() -> dict[str, Any] | None:
            with self.lock:
                return next((body for body in self.posts if predicate(body)), None)

        return wait_until(matching, timeout_s, lambda: f"no matching registration: {self.posts}")

    def wait_for_count(self, count: int, timeout_s: float) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            with self.lock:
                return list(self.posts) if len(self.posts) >= count else None

        return wait_until(
            enough, timeout_s, lambda: f"fewer than {count} registrations: {self.posts}"
        )


@pytest.fixture
def manager() -> Iterator[FakeManager]:
    recorder = FakeManager(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            with recorder.lock:
                recorder.posts.append({"path": self.path, **body})
                status = 503 if len(recorder.posts) <= recorder.fail_first else 201
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield recorder
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def start_cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [*CLI, *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
        raise


def test_cli_registers_retries_reports_new_tags_and_stops_on_sigterm(
    manager: FakeManager, tmp_path: Path
) -> None:
    # Prepare: the manager refuses the first registration
    manager.fail_first = 1
    port = find_free_port()
    log = tmp_path / "server.log"
    process = start_cli(
        "--data-dir",
        str(tmp_path / "data"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-id",
        "edge-1",
        "--cluster",
        "lab",
        "--manager-url",
        manager.url,
        "--register-interval-s",
        "30",
        log=log,
    )
    try:
        # Execute
        assert wait_for_port("127.0.0.1", port, START_TIMEOUT_S), log.read_text()
        retried = manager.wait_for_count(2, START_TIMEOUT_S)[1]
        token, cert = owner_credentials(tmp_path / "data")
        with DataClient(f"grpc+tls://127.0.0.1:{port}", token=token, tls_root_certs=cert) as client:
            client.put_table("mnist", pa.table({"label": list(range(42))}))
        with_tags = manager.wait_for(lambda body: body["tags"] == {"mnist": 42}, START_TIMEOUT_S)
    finally:
        code = stop(process)

    # Assert
    assert code == 0, log.read_text()
    assert retried == {
        "path": "/api/flops/nodes",
        "node_id": "edge-1",
        "data_server": f"grpc+tls://127.0.0.1:{port}",
        "architecture": node_architecture(),
        "cluster": "lab",
        "tags": {},
        "data_server_cert": cert,
    }
    assert with_tags["node_id"] == "edge-1"
    assert "will retry" in log.read_text()
    assert (tmp_path / "data" / "mnist.parquet").is_file()


def test_cli_insecure_serves_plain_grpc_without_a_manager_and_stops_on_sigint(
    tmp_path: Path,
) -> None:
    port = find_free_port()
    log = tmp_path / "server.log"
    process = start_cli(
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
        "--node-id",
        "n",
        "--insecure",
        log=log,
    )
    try:
        assert wait_for_port("127.0.0.1", port, START_TIMEOUT_S), log.read_text()
        with DataClient(f"grpc://127.0.0.1:{port}") as client:
            assert client.list_tags() == {}
        process.send_signal(signal.SIGINT)
        code = process.wait(STOP_TIMEOUT_S)
    finally:
        stop(process)

    assert code == 0, log.read_text()
    assert "security is off" in log.read_text()
    assert not (tmp_path / "data" / ".security").exists()


def test_cli_exits_10_when_the_port_is_taken(tmp_path: Path) -> None:
    with DataServer(tmp_path / "first") as taken:
        process = subprocess.run(
            [
                *CLI,
                "--data-dir",
                str(tmp_path / "second"),
                "--port",
                str(taken.port),
                "--node-id",
                "n",
            ],
            capture_output=True,
            timeout=STOP_TIMEOUT_S + START_TIMEOUT_S,
        )

    assert process.returncode == ExitCode.ADDRESS_UNAVAILABLE
    assert b"Choose a free port" in process.stderr
    last_line = process.stderr.decode().strip().splitlines()[-1]
    assert "data server failed (exit 10, address unavailable)" in last_line


def test_cli_exits_2_on_a_malformed_manager_url(tmp_path: Path) -> None:
    process = subprocess.run(
        [
            *CLI,
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
            "--node-id",
            "n",
            "--manager-url",
            "ftp://manager",
        ],
        capture_output=True,
        timeout=START_TIMEOUT_S,
    )

    assert process.returncode == 2
    assert b"http://HOST:PORT" in process.stderr


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("AMD64", "linux/amd64"),
        ("aarch64", "linux/arm64"),
        ("arm64", "linux/arm64"),
        ("riscv64", "linux/riscv64"),
    ],
)
def test_architecture_mapping(machine: str, expected: str) -> None:
    assert node_architecture(machine) == expected


def test_registrar_reports_failure_without_raising_and_succeeds_later(
    manager: FakeManager,
) -> None:
    # Prepare
    dead = NodeRegistrar(
        f"http://127.0.0.1:{find_free_port()}",
        lambda: registration_payload("n", "grpc://127.0.0.1:1", "local", {}),
        timeout_s=2,
    )
    alive = NodeRegistrar(
        manager.url,
        lambda: registration_payload("n", "grpc://127.0.0.1:1", "local", {"a": 1}, "linux/arm64"),
        timeout_s=2,
    )

    # Execute
    dead_ok = dead.register_once()
    alive_ok = alive.register_once()
    dead.stop()
    alive.stop()

    # Assert
    assert dead_ok is False and dead.failures == 1
    assert dead.last_error is not None and "ConnectionError" in dead.last_error
    assert alive_ok is True and alive.successes == 1
    assert manager.posts[-1]["architecture"] == "linux/arm64"
    assert manager.posts[-1]["tags"] == {"a": 1}


def test_the_newest_node_credential_is_used_at_start() -> None:
    def credential(issued_s: float) -> str:
        claims = {"sub": "n", "iat": int(issued_s), "exp": int(issued_s) + 3600}
        return jwt.encode(claims, "k" * 32, algorithm="HS256")

    now = time.time()
    older, newer = credential(now - 60), credential(now)

    assert newest_credential(None, older) == older
    assert newest_credential(older, newer) == newer  # e.g. issued by a new manager
    assert newest_credential(newer, older) == newer  # the refreshed one kept on the node
    assert newest_credential(newer, "admin-token") == newer
