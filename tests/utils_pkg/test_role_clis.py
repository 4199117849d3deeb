"""The one command-line convention of the entry points (:mod:`flops_utils.role_cli`), driven
through the installed scripts (``.venv/bin/flops-...``) as real child processes."""

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from waiting import wait_until

from flops_utils.contract.exit_codes import ExitCode
from flops_utils.net import find_free_port
from flops_utils.role_cli import COMMON_ENV, RoleApp, VersionOption, settings_of
from scripts.role_options import README, rewritten, role_apps

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
REGISTRATION_TIMEOUT_S = 60.0

PROGRAMS = {app.program: app for app in role_apps()}


def run_script(
    program: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``program`` with ``args`` in ``env`` (default: an empty environment,
    so no ``FLOPS_*`` variable at all)."""
    return subprocess.run(
        [str(BIN / program), *args],
        env={} if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def variables_of(app: RoleApp) -> list[str]:
    """Every ``FLOPS_*`` name in ``app``'s settings (a row may name several)."""
    names = [name for row in settings_of(app) for name in re.findall(r"FLOPS_\w+", row.variable)]
    return [*names, *(var.name for var in COMMON_ENV)]


# --- --help and --version without any environment --------------------------------------------


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_works_without_environment_and_lists_every_variable(program: str) -> None:
    # Execute
    result = run_script(program, "--help")

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {program} [OPTIONS]")
    assert "Traceback" not in result.stdout + result.stderr
    listed = set(re.findall(r"FLOPS_\w+", result.stdout))
    expected = variables_of(PROGRAMS[program])
    assert len(expected) >= 3
    assert set(expected) <= listed, set(expected) - listed


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_version_works_without_environment(program: str) -> None:
    # Execute
    result = run_script(program, "--version")

    # Assert
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{program} \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout


def test_the_manager_help_names_every_variable_its_configuration_reads() -> None:
    # Prepare: the names ManagerConfig.from_env maps its fields to
    source = (REPO_ROOT / "flops_manager" / "config.py").read_text()
    read = set(re.findall(r'"(FLOPS_[A-Z_]+)"', source))
    assert {"FLOPS_HOME", "FLOPS_MANAGER_PORT", "FLOPS_INSECURE"} <= read

    # Execute
    result = run_script("flops-manager", "--help")

    # Assert
    assert result.returncode == 0, result.stderr
    assert read <= set(re.findall(r"FLOPS_\w+", result.stdout)), read - set(
        re.findall(r"FLOPS_\w+", result.stdout)
    )


# --- errors: one line, exit code 2 (the contract's CONFIG_ERROR), no traceback ----------------


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_an_unknown_option_is_one_line_and_exit_2(program: str) -> None:
    # Execute
    result = run_script(program, "--no-such-option")

    # Assert
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: No such option '--no-such-option'. (see {program} --help)"
    ]


@pytest.mark.parametrize(
    ("program", "args", "named"),
    [
        ("flops-manager", ["--port", "eighty"], "'--port' (env var: 'FLOPS_MANAGER_PORT')"),
        ("flops-data-server", ["--data-dir", "d", "--node-id", "n", "--port", "99999"], "--port"),
        ("flops-observatory", ["--port", "-1"], "--port"),
    ],
)
def test_a_malformed_typed_value_is_one_line_and_exit_2(
    program: str, args: list[str], named: str
) -> None:
    # Execute
    result = run_script(program, *args)

    # Assert
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: Invalid value for") and named in lines[0]


@pytest.mark.parametrize("program", ["flops-learner", "flops-aggregator", "flops-image-builder"])
def test_an_option_sets_its_variable_and_a_malformed_one_is_one_line_and_exit_2(
    program: str, tmp_path: Path
) -> None:
    # Execute: the option's value reaches the role's own check of FLOPS_MQTT_URL
    result = run_script(program, "--project-id", "p1", "--mqtt-url", "broker:1883", cwd=tmp_path)

    # Assert
    assert result.returncode == ExitCode.CONFIG_ERROR
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "failed (exit 2, config error): FLOPS_MQTT_URL" in lines[0]
    assert "Traceback" not in result.stderr


def test_the_manager_names_a_malformed_variable_in_one_line(tmp_path: Path) -> None:
    # Execute
    result = run_script(
        "flops-manager",
        env={
            "FLOPS_HOME": str(tmp_path / "home"),
            "FLOPS_OAKESTRA_NAMESPACE": "not valid!",
            "FLOPS_MQTT_ADMIN_PASSWORD": "",
        },
    )

    # Assert
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "FLOPS_OAKESTRA_NAMESPACE='not valid!'" in lines[0]
    assert not (tmp_path / "home").exists()


# --- the helper in-process: unexpected errors and Ctrl-C --------------------------------------


def failing_app() -> RoleApp:
    app = RoleApp("flops-test", "A command that fails as asked.")

    @app.main_command()
    def _fail(
        what: Annotated[str, typer.Option(envvar="FLOPS_TEST_WHAT")] = "runtime",
        version: VersionOption = False,
    ) -> int:
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "runtime":
            raise RuntimeError("the secret is not shown twice\nsecond line")
        return 7

    return app


def test_an_unexpected_error_is_one_line_and_exit_1_with_the_traceback_only_when_asked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    app = failing_app()
    monkeypatch.delenv("FLOPS_DEBUG", raising=False)

    # Execute
    quiet = app.run([])
    quiet_err = capsys.readouterr().err
    monkeypatch.setenv("FLOPS_DEBUG", "1")
    debug = app.run([])
    debug_err = capsys.readouterr().err

    # Assert
    assert quiet == debug == 1
    assert quiet_err.splitlines() == [
        "error: unexpected error (RuntimeError: the secret is not shown twice); set "
        "FLOPS_DEBUG=1 for the traceback, and report it"
    ]
    assert "Traceback (most recent call last)" in debug_err
    assert debug_err.splitlines()[-1] == quiet_err.splitlines()[0]


def test_ctrl_c_exits_130_and_the_command_s_code_is_returned(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    interrupted = failing_app().run(["--what", "interrupt"])
    returned = failing_app().run(["--what", "other"])

    # Assert
    assert interrupted == 130
    assert returned == 7
    assert "Traceback" not in capsys.readouterr().err


# --- the data server's token: FLOPS_API_TOKEN, FLOPS_MANAGER_TOKEN deprecated -----------------


@dataclass
class Registrations:
    """A real HTTP server on loopback recording the Authorization header of every POST."""

    url: str = ""
    headers: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first(self) -> str:
        def got() -> str | None:
            with self.lock:
                return self.headers[0] if self.headers else None

        return wait_until(got, REGISTRATION_TIMEOUT_S, "no registration arrived")


@pytest.fixture
def registrations() -> Iterator[Registrations]:
    recorder = Registrations()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with recorder.lock:
                recorder.headers.append(self.headers.get("Authorization", ""))
            body = json.dumps({}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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


@pytest.mark.parametrize(
    ("env", "sent", "warned"),
    [
        ({"FLOPS_MANAGER_TOKEN": "old-name-token"}, "old-name-token", True),
        ({"FLOPS_API_TOKEN": "new-name-token"}, "new-name-token", False),
        (
            {"FLOPS_API_TOKEN": "new-name-token", "FLOPS_MANAGER_TOKEN": "old-name-token"},
            "new-name-token",
            False,
        ),
    ],
)
def test_the_data_server_registers_with_flops_api_token_or_the_deprecated_alias(
    registrations: Registrations,
    tmp_path: Path,
    env: dict[str, str],
    sent: str,
    warned: bool,
) -> None:
    # Prepare: the rest of the configuration through variables too
    log = tmp_path / "server.log"
    variables = {
        "FLOPS_DATA_DIR": str(tmp_path / "data"),
        "FLOPS_NODE_ID": "node-a",
        "FLOPS_DATA_SERVER_PORT": str(find_free_port()),
        "FLOPS_MANAGER_URL": registrations.url,
        "FLOPS_INSECURE": "data",
        **env,
    }

    # Execute
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(BIN / "flops-data-server")],
            env=variables,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        authorization = registrations.first()
    finally:
        process.terminate()
        code = process.wait(STOP_TIMEOUT_S)

    # Assert
    output = log.read_text()
    assert authorization == f"Bearer {sent}"
    assert code == 0, output
    warnings = [line for line in output.splitlines() if "FLOPS_MANAGER_TOKEN" in line]
    if warned:
        assert len(warnings) == 1
        assert warnings[0].endswith(
            "FLOPS_MANAGER_TOKEN is deprecated; set FLOPS_API_TOKEN instead (the same value)"
        )
    else:
        assert warnings == []
    assert "Traceback" not in output


# --- the README's configuration tables --------------------------------------------------------


def test_the_readme_configuration_tables_match_the_apps() -> None:
    # Prepare
    readme = README.read_text(encoding="utf-8")

    # Execute
    wanted = rewritten(readme)

    # Assert: else run `python -m scripts.role_options`
    assert wanted == readme
    for program, app in PROGRAMS.items():
        assert f"#### `{program}`" in readme
        for name in variables_of(app):
            assert f"`{name}`" in readme
