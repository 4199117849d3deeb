"""The embedded MLflow tracking server (a real ``mlflow server`` child process)."""

import json
import os
import socket
import stat
import urllib.request
from pathlib import Path

import pytest

from observatory.mlflow_server import (
    ADMIN_USERNAME,
    AUTH_CONFIG_FILE,
    MlflowServer,
    MlflowServerError,
    read_admin_credential,
    write_auth_config,
)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_answers_and_keeps_its_state_in_the_workdir(mlflow_server: MlflowServer) -> None:
    # Prepare: the session's server is up.
    url = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search"
    request = urllib.request.Request(
        url,
        # the default experiment (id 0), whatever other tests of the session created
        data=json.dumps({"max_results": 10, "filter": "name = 'Default'"}).encode(),
        headers={"Content-Type": "application/json"},
    )

    # Execute
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())

    # Assert: the REST API answers, state lives in the workdir, the start time was measured.
    assert mlflow_server.healthy()
    assert mlflow_server.running()
    assert [e["name"] for e in body["experiments"]] == ["Default"]
    assert (mlflow_server.workdir / "mlflow.db").stat().st_size > 0
    assert (mlflow_server.workdir / "artifacts").is_dir()
    assert mlflow_server.start_seconds is not None and 0 < mlflow_server.start_seconds < 90
    print(f"MLflow server start time: {mlflow_server.start_seconds:.1f} s")


def test_taken_port_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    # Prepare: someone listens on the port.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = MlflowServer(tmp_path, port=port)

        # Execute / Assert
        with pytest.raises(MlflowServerError, match=f"127.0.0.1:{port}.*another port"):
            server.start()
    assert server.pid is None


def test_start_timeout_stops_the_whole_process_group(tmp_path: Path) -> None:
    # Prepare: a deadline MLflow cannot meet.
    server = MlflowServer(tmp_path, start_timeout_s=0.5)

    # Execute
    with pytest.raises(MlflowServerError, match=r"did not answer .* within 0.5s") as err:
        server.start()

    # Assert: the message points at the log; nothing of the server is left running.
    assert str(tmp_path / "mlflow.log") in err.value.message
    assert server.pid is not None
    assert not _group_alive(server.pid)
    assert not server.running()
    server.stop()  # a no-op now


def test_auth_config_is_private_and_keeps_the_admin_password(tmp_path: Path) -> None:
    # Prepare: a workdir others could read.
    workdir = tmp_path / "mlflow"
    workdir.mkdir(mode=0o755)

    # Execute: written at the first start, rewritten at the next.
    first = write_auth_config(workdir)
    second = write_auth_config(workdir)

    # Assert: one generated password, kept; 0600 in a 0700 directory; NO_PERMISSIONS default.
    text = (workdir / AUTH_CONFIG_FILE).read_text()
    assert first == second == read_admin_credential(workdir)
    assert first.username == ADMIN_USERNAME and len(first.password) >= 40
    assert stat.S_IMODE((workdir / AUTH_CONFIG_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    assert "default_permission = NO_PERMISSIONS" in text
    assert first.password not in repr(first)
    assert read_admin_credential(tmp_path) is None


def test_unauthenticated_server_is_recognised(mlflow_server: MlflowServer) -> None:
    # Prepare: probes of the session's (unauthenticated) server in either mode.
    plain = MlflowServer(mlflow_server.workdir, port=mlflow_server.port)
    secure = MlflowServer(mlflow_server.workdir, port=mlflow_server.port, authentication=True)

    # Execute / Assert
    assert plain.serves_as_configured()
    assert not secure.serves_as_configured()


def test_authenticated_server_keeps_its_admin_across_restarts(tmp_path: Path) -> None:
    # Prepare: a server with authentication.
    workdir = tmp_path / "mlflow"
    server = MlflowServer(workdir, authentication=True).start()
    try:
        first = server.admin
        plain = MlflowServer(workdir, port=server.port)

        # Execute: the mode as seen by probes, then a restart on the same workdir and port.
        secure_seen, plain_seen = server.serves_as_configured(), plain.serves_as_configured()
        server.stop()
        server.start()

        # Assert: the same generated admin still works after the restart.
        assert first is not None and server.admin == first
        assert (secure_seen, plain_seen) == (True, False)
        assert server.serves_as_configured()
        assert "--app-name" in server.command()
        assert first.password not in " ".join(server.command())
    finally:
        server.stop()
