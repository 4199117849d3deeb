"""``flops-manager``: run the FLOps manager (and, by default, its embedded suite) until stopped.

Usage: ``flops-manager [--stop-projects] [--home DIR] [--host HOST] [--port PORT]``. The rest
of the configuration comes from ``FLOPS_*`` environment variables (see :class:`ManagerConfig`;
``flops-manager --help`` lists them, :data:`MANAGER_ENV`); an option wins over its variable.

On SIGTERM or SIGINT the manager stops but leaves running projects' learners and aggregators
running, and with them the embedded Mosquitto and MLflow they report to; the next start on the
same ``FLOPS_HOME`` re-attaches them and applies the status messages queued meanwhile (see
``ManagerSuite.stop``). With ``--stop-projects`` it stops them too and marks their projects
``failed``.

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 a component could not start, or another manager
uses the same ``FLOPS_HOME`` (the message says which and how to fix it); 2 bad arguments or a
malformed ``FLOPS_*`` variable (one line naming it).
"""

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Annotated

import typer
from pydantic import ValidationError

from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.role_cli import EXIT_USAGE, EnvVar, RoleApp, VersionOption

EXIT_STOPPED = 0
EXIT_START_FAILED = 1

MANAGER_ENV = (
    EnvVar("FLOPS_BIND_HOST", "interface the embedded Mosquitto and MLflow listen on", "--host"),
    EnvVar(
        "FLOPS_MQTT_PORT / FLOPS_MLFLOW_PORT",
        "fixed ports of the embedded Mosquitto and MLflow; a taken one fails the start",
        "the recorded port, else a free one",
    ),
    EnvVar(
        "FLOPS_PUBLIC_HOST",
        "this machine's name or address that workers and browsers reach: the embedded "
        "broker's and MLflow's URLs given to services and GET /tracking use it",
    ),
    EnvVar("FLOPS_DB_URL", "mongodb://... selects MongoDB", "embedded store in FLOPS_HOME/db"),
    EnvVar("FLOPS_MQTT_URL", "mqtt://HOST:PORT of an existing broker", "embedded Mosquitto"),
    EnvVar(
        "FLOPS_MQTT_ADMIN_USERNAME / FLOPS_MQTT_ADMIN_PASSWORD",
        "an admin of an external broker's dynamic-security plugin (with FLOPS_MQTT_URL)",
        "the embedded broker's own",
    ),
    EnvVar("FLOPS_MLFLOW_URL", "an existing MLflow tracking server", "embedded MLflow"),
    EnvVar(
        "FLOPS_MLFLOW_ADMIN_USERNAME / FLOPS_MLFLOW_ADMIN_PASSWORD",
        "an admin of an external MLflow server's basic-auth app (with FLOPS_MLFLOW_URL)",
        "the embedded server's own",
    ),
    EnvVar(
        "FLOPS_MLFLOW_PUBLIC_URL",
        "the MLflow GUI address browsers reach (GET /tracking and its redirect)",
        "FLOPS_MLFLOW_URL, or the embedded server's (on FLOPS_PUBLIC_HOST)",
    ),
    EnvVar("FLOPS_ORCHESTRATOR", "the orchestrator backend: local or oakestra", "local"),
    EnvVar("FLOPS_BUILDER", "the builder backend: venv or oci", "what the orchestrator runs"),
    EnvVar("FLOPS_AUTH", "token (API token file) or oakestra (Oakestra JWTs)", "token"),
    EnvVar(
        "FLOPS_JWT_PUBLIC_KEY_FILE",
        "PEM public key of the Oakestra root orchestrator (FLOPS_AUTH=oakestra)",
    ),
    EnvVar(
        "FLOPS_REGISTRY / FLOPS_REGISTRY_NAMESPACE / FLOPS_REGISTRY_TLS_VERIFY",
        "where the oci builder pushes images (namespace flops, TLS verified by default)",
        "the embedded registry",
    ),
    EnvVar(
        "FLOPS_EMBEDDED_REGISTRY",
        "false: no embedded registry for trained-model images without FLOPS_REGISTRY",
        "true",
    ),
    EnvVar(
        "FLOPS_REGISTRY_PORT",
        "fixed port of the embedded registry",
        "the recorded port, else a free one",
    ),
    EnvVar(
        "FLOPS_REGISTRY_PUBLIC",
        "host[:port] of the registry as workers and users pull from it",
        "FLOPS_REGISTRY",
    ),
    EnvVar("FLOPS_BASE_IMAGE", "the Python 3.11 base image of the oci builder"),
    EnvVar(
        "FLOPS_OAKESTRA_URL / FLOPS_OAKESTRA_USER / FLOPS_OAKESTRA_PASSWORD",
        "the Oakestra root orchestrator and its account (FLOPS_ORCHESTRATOR=oakestra)",
        "user and password Admin",
    ),
    EnvVar("FLOPS_OAKESTRA_NAMESPACE", "namespace of the Oakestra applications", "flops"),
    EnvVar(
        "FLOPS_OAKESTRA_ORGANIZATION", "the Oakestra organization the manager logs in to", "root"
    ),
    EnvVar(
        "FLOPS_OAKESTRA_MQTT_URL / FLOPS_OAKESTRA_MLFLOW_URL",
        "broker and MLflow addresses the workers reach",
        "the manager's",
    ),
    EnvVar(
        "FLOPS_OAKESTRA_PORT_RANGE",
        "ports the oakestra orchestrator publishes aggregators and trained-model servers on",
        "30000-30999",
    ),
    EnvVar(
        "FLOPS_INSECURE",
        "comma-separated controls to turn off: mqtt, flower, data, mlflow, local (README's "
        "Security); logged as a warning at every start",
        "every control on",
    ),
)
"""The manager's variables without an option (:meth:`ManagerConfig.from_env` reads them)."""

_FIELD_ENV = {"host": "FLOPS_MANAGER_HOST", "port": "FLOPS_MANAGER_PORT"}
"""Fields of :class:`ManagerConfig` whose variable is not ``FLOPS_<FIELD>``."""

app = RoleApp(
    "flops-manager",
    "Run the FLOps manager (REST API, project lifecycle and, unless configured otherwise, the "
    "embedded Mosquitto, MLflow and store) until SIGTERM or Ctrl-C.",
    env_only=MANAGER_ENV,
)


@app.main_command()
def _manager(
    stop_projects: Annotated[
        bool,
        typer.Option(
            "--stop-projects",
            help="On exit, also stop running projects' services (their projects fail) "
            "instead of leaving them for the next start to re-attach.",
        ),
    ] = False,
    home: Annotated[
        str | None,
        typer.Option(
            envvar="FLOPS_HOME",
            metavar="DIR",
            help="State: embedded store, MLflow data, environment cache, logs.",
            show_default="./.flops",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            envvar="FLOPS_MANAGER_HOST",
            help="Interface the REST API listens on.",
            show_default="127.0.0.1",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            envvar="FLOPS_MANAGER_PORT",
            min=0,
            max=65535,
            help="TCP port of the REST API; 0 picks a free one.",
            show_default="8080",
        ),
    ] = None,
    version: VersionOption = False,
) -> int:
    """Start the suite, print the API's URL, serve until SIGTERM or SIGINT; returns the exit
    code (see the module docstring)."""
    overrides = {
        field: value
        for field, value in (("home", home), ("host", host), ("port", port))
        if value is not None
    }
    try:
        config = ManagerConfig.from_env(**overrides)
    except ValidationError as exc:
        logger.error("%s", describe_config_error(exc))
        return EXIT_USAGE
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        suite = ManagerSuite(config).start()
    except FlopsError as exc:
        logger.error("%s", exc.message)
        return EXIT_START_FAILED
    print(f"FLOps manager: {suite.url}/api/flops  (MLflow GUI: {suite.tracking_url})", flush=True)
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        suite.stop(keep_running=not stop_projects)
    return EXIT_STOPPED


def describe_config_error(exc: ValidationError) -> str:
    """One line naming each malformed ``FLOPS_*`` variable of ``exc``, its value (never a
    password's) and what is wrong."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        name = _FIELD_ENV.get(field, f"FLOPS_{field.upper()}")
        value = "" if "password" in field else f"={error.get('input')!r}"
        problems.append(f"{name}{value}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flops-manager``: run it with ``argv`` (default ``sys.argv[1:]``) and
    return the exit code."""
    return app.run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
