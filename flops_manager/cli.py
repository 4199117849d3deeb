"""``flops``: the user CLI (typer + rich).

Commands: ``demo`` (the main job on the embedded default), ``login`` (store the manager's URL
and token), ``submit`` (POST an SLA file and follow it with live progress), ``list``,
``status`` (one project; ``--follow`` re-attaches), ``logs`` (events and the services' own
output), ``cancel``, ``nodes``, ``mock`` (push mock data to registered nodes), ``token``,
``tracking`` (the MLflow GUI), ``data put|ls|drop`` (a node owner's own datasets on their
node's data server), ``model pull|serve|download`` (a project's trained model: its image in
the local Docker engine, a server, the MLflow model).
Exit codes: 0 success; 1 the project failed, the manager answered with an error or could not
be reached, or an input was wrong; 2 a command-line usage error; 130 interrupted (Ctrl-C).

Errors are one or two lines naming the cause and the fix, never a traceback: ``flops --debug
...`` (or ``FLOPS_DEBUG=1``) adds the traceback, without local variables, so never the token.
"""

import json
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from flops_manager.client import ManagerClient
from flops_utils.errors import FlopsError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's own INFO lines are not for users


class _Cli(typer.Typer):
    """The typer app whose errors are one or two lines (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except KeyboardInterrupt:
            console.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # the last resort: no traceback unless asked for
            if _debugging():
                traceback.print_exception(exc)
            console.print(f"[red]error:[/] {_describe(exc)}", highlight=False)
            sys.exit(EXIT_ERROR)


def _debugging() -> bool:
    return _DEBUG or os.environ.get("FLOPS_DEBUG", "") not in ("", "0", "false")


def _describe(exc: Exception) -> str:
    """One line about an error no command handled itself."""
    if isinstance(exc, FlopsError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        name = Path(str(exc.filename)).name if exc.filename else ""
        return f"{exc.strerror}{f': {name}' if name else ''}"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    return (
        f"unexpected error ({type(exc).__name__}); run the command again with --debug for "
        "the traceback, and report it"
    )


_DEBUG = False

app = _Cli(
    help="FLOps: federated learning from an ML repository and an SLA.",
    pretty_exceptions_enable=False,
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import flwr
        import mlflow

        console.print(
            f"flops {version('flops')} (Flower {flwr.__version__}, MLflow {mlflow.__version__})",
            highlight=False,
        )
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Print the traceback of an error (no secrets).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the versions."
        ),
    ] = False,
) -> None:
    global _DEBUG
    _DEBUG = debug


ManagerUrl = Annotated[
    str | None,
    typer.Option(
        envvar="FLOPS_MANAGER_URL",
        help="Base URL of the FLOps manager.",
        show_default="flops login's, else http://127.0.0.1:8080",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        envvar="FLOPS_API_TOKEN",
        help="Bearer token; defaults to flops login's, else the embedded manager's "
        "$FLOPS_HOME/api-token.",
    ),
]


DEFAULT_MANAGER_URL = "http://127.0.0.1:8080"


def _client(manager_url: str | None, token: str | None) -> ManagerClient:
    """A client of the manager: the option (or its environment variable) wins, then
    ``flops login``'s configuration, then the embedded manager on this machine."""
    from flops_manager.auth import read_api_token
    from flops_manager.cli_config import read_login
    from flops_manager.demo import demo_home

    login = read_login()
    url = manager_url or login.manager_url or DEFAULT_MANAGER_URL
    return ManagerClient(url, token=token or login.token or read_api_token(demo_home()))


@app.command()
def demo(
    rounds: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Training rounds (per cycle with --hierarchical).",
            show_default="5; 2 with --hierarchical",
        ),
    ] = None,
    nodes: Annotated[
        int | None,
        typer.Option(
            min=1, max=8, help="Local worker nodes.", show_default="2; 4 with --hierarchical"
        ),
    ] = None,
    hierarchical: Annotated[
        bool,
        typer.Option(
            help="Hierarchical FL: the nodes form 2 clusters, each with its cluster aggregator, "
            "under one root aggregator."
        ),
    ] = False,
    cycles: Annotated[
        int, typer.Option(min=1, help="With --hierarchical: training cycles of the root.")
    ] = 2,
    timeout_s: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900,
    keep_running: Annotated[
        bool, typer.Option(help="Keep the suite (and the MLflow GUI) up until Ctrl-C.")
    ] = False,
    verbose: Annotated[bool, typer.Option(help="Also print the manager's log.")] = False,
) -> None:
    """Run the example MNIST project end to end on this machine and print its result."""
    import logging

    from flops_utils.logging import logger

    if not verbose:
        logger.setLevel(logging.WARNING)
    from flops_manager.auth import read_api_token
    from flops_manager.cli_progress import Activity
    from flops_manager.config import ManagerConfig
    from flops_manager.demo import DemoShape, demo_home, run_demo
    from flops_manager.suite import ManagerSuite

    clusters = 2 if hierarchical else 1
    nodes = nodes or (4 if hierarchical else 2)
    rounds = rounds or (2 if hierarchical else 5)
    per_cluster = nodes // clusters
    if per_cluster < 1:
        console.print(f"[red]demo failed:[/] --hierarchical needs at least {clusters} nodes")
        raise typer.Exit(2)
    home = demo_home().resolve()
    console.rule("FLOps demo" + (" (hierarchical FL)" if hierarchical else ""))
    shape = DemoShape(nodes, clusters, rounds, cycles if hierarchical else None)
    suite = ManagerSuite(ManagerConfig.from_env(home=home, port=0))
    kept = False  # the suite runs on for --keep-running: Ctrl-C is how it ends
    try:
        with Activity(console) as activity:
            activity.print(f"FLOPS_HOME {home}")
            with activity.step("starting the manager, store, Mosquitto and MLflow"):
                suite.start()
            activity.print(f"manager    {suite.url}/api/flops\nMLflow     {suite.mlflow_url}")
            project = run_demo(activity, suite, shape, timeout_s)
        api = ManagerClient(suite.url, token=read_api_token(suite.config.home))
        _print_result(project, api.tracking_url())
        if keep_running:
            kept = True
            console.print("the suite keeps running; press Ctrl-C to stop it")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        if not kept:
            console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    except (FlopsError, TimeoutError) as exc:
        from rich.markup import escape

        reason = escape(str(getattr(exc, "message", exc)))
        console.print(f"[red]demo failed:[/] {reason}", highlight=False)
        raise typer.Exit(1) from exc
    finally:
        with Activity(console) as activity, activity.step("stopping the suite"):
            suite.stop()


def _print_result(project: dict[str, Any], tracking_url: str | None) -> None:
    """The followed project's final summary (:func:`_print_summary`), its federated
    accuracy, hierarchy and MLflow GUI; exits 1 unless it completed."""
    console.rule("result")
    _print_summary(project)
    accuracy = (project.get("metrics") or {}).get("accuracy")
    if accuracy is not None:
        console.print(f"accuracy  {accuracy:.4f} (federated evaluation on held-out local data)")
    tree = project.get("hierarchy")
    if tree:
        cycles = len(tree["root"]["cycles"])
        console.print(f"root      {cycles} cycle(s) of {tree['root']['training_rounds']} round(s)")
        for cluster in tree["clusters"]:
            last = cluster["rounds"][-1] if cluster["rounds"] else {}
            accuracy_text = f"{last['accuracy']:.4f}" if last.get("accuracy") is not None else "n/a"
            console.print(
                f"cluster   {cluster['name']}: learners {', '.join(cluster['learners'])}; "
                f"{len(cluster['rounds'])} round(s), last accuracy {accuracy_text}"
                + (f" [red]lost: {cluster['lost']}[/]" if cluster.get("lost") else "")
            )
    if tracking_url:
        console.print(f"MLflow    {tracking_url} (log in with: flops tracking)", highlight=False)
    if project["status"] != "completed":
        raise typer.Exit(1)


FollowTimeout = Annotated[
    float, typer.Option("--timeout-s", help="Stop following after this many seconds.")
]


@app.command()
def submit(
    sla_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="SLA JSON file.")],
    manager_url: ManagerUrl = None,
    token: Token = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow/--detach",
            help="Follow the project until it ends (Ctrl-C stops following, not the "
            "project), or only submit it.",
        ),
    ] = True,
    timeout_s: FollowTimeout = 24 * 3600,
) -> None:
    """POST an SLA to the manager (and follow the project's progress)."""
    sla = _read_sla(sla_file)
    client = _client(manager_url, token)
    try:
        project_id = client.create_project(sla)
    except FlopsError as exc:
        _fail(exc)
    console.print(f"project {project_id} accepted", highlight=False)
    if not follow:
        console.print(f"follow it with: flops status {project_id} --follow", highlight=False)
        return
    _follow(client, project_id, timeout_s)


def _follow(client: ManagerClient, project_id: str, timeout_s: float) -> None:
    """Show the project's progress until it ends, then its summary; exits 1 unless it
    completed, 130 on Ctrl-C (saying how to follow again), 1 on an error."""
    from flops_manager.cli_progress import Activity, follow_project

    try:
        with Activity(console) as activity:
            project = follow_project(activity, client, project_id, timeout_s)
    except KeyboardInterrupt:
        console.print(
            f"stopped following; project {project_id} keeps running. Follow it again with: "
            f"flops status {project_id} --follow; stop it with: flops cancel {project_id}",
            highlight=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except TimeoutError as exc:
        _fail(FlopsError(f"{exc}; project {project_id} keeps running (flops status {project_id})"))
    except FlopsError as exc:
        _fail(exc)
    try:
        tracking_url: str | None = client.tracking_url()
    except FlopsError:
        tracking_url = None
    _print_result(project, tracking_url)


def _read_sla(sla_file: Path) -> dict[str, Any]:
    """The SLA file's JSON object; exits 1 naming the file, line and column otherwise."""
    try:
        sla = json.loads(sla_file.read_text())
    except json.JSONDecodeError as exc:
        _fail(
            FlopsError(
                f"{sla_file.name} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                f"{exc.colno}. Fix the file; examples/mnist_sklearn/sla.json is a valid SLA."
            )
        )
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        _fail(FlopsError(f"cannot read {sla_file.name}: {reason}"))
    if not isinstance(sla, dict):
        kind = type(sla).__name__
        _fail(FlopsError(f"{sla_file.name} must hold a JSON object (the SLA), not a {kind}"))
    return sla


@app.command()
def token(
    node: Annotated[
        str | None,
        typer.Option(
            help="Print a node credential for this node id instead: its data server "
            "registers and refreshes that node with it, and can do nothing else."
        ),
    ] = None,
) -> None:
    """Print the embedded manager's API token ($FLOPS_HOME/api-token), or a node credential."""
    from flops_manager.auth import NodeCredentials, read_api_token
    from flops_manager.demo import demo_home

    if node is not None:
        print(NodeCredentials(demo_home().resolve()).issue(node).token)
        return
    value = read_api_token(demo_home())
    if value is None:
        console.print("[red]error:[/] no API token yet; start flops-manager once to create it")
        raise typer.Exit(1)
    print(value)


@app.command()
def tracking(manager_url: ManagerUrl = None, token: Token = None) -> None:
    """Print the MLflow GUI's address and a login for it: your own MLflow user with a new
    password (the previous one stops working); the GUI shows your projects only. A server
    without authentication (``FLOPS_INSECURE=mlflow``) needs no login: only its address."""
    from flops_manager.client import ApiError

    client = _client(manager_url, token)
    try:
        login = client.tracking_credential()
    except ApiError as exc:
        if exc.status != 404:
            _fail(exc)
        try:
            url = client.tracking_url()
        except FlopsError as again:
            _fail(again)
        console.print(f"MLflow    {url}")
        console.print("(no login: this MLflow server has no authentication)")
        return
    except FlopsError as exc:
        _fail(exc)
    console.print(f"MLflow    {login['url']}")
    console.print(f"user      {login['username']}")
    print(f"password  {login['password']}")


JsonOutput = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead.")]


@app.command()
def login(
    manager_url: Annotated[str, typer.Option(help="Base URL of the FLOps manager.")],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FLOPS_API_TOKEN",
            help="Your API token (an Oakestra access token with FLOPS_AUTH=oakestra); "
            "asked for when not given.",
        ),
    ] = None,
) -> None:
    """Store the manager's URL and your token (0600) for the other commands; the
    --manager-url/--token options and FLOPS_MANAGER_URL/FLOPS_API_TOKEN override them."""
    from flops_manager.cli_config import Login, write_login

    secret = token or typer.prompt("API token", hide_input=True)
    client = ManagerClient(manager_url, token=secret)
    try:
        client.request("GET", "/projects?limit=1")
    except FlopsError as exc:
        _fail(exc)
    path = write_login(Login(manager_url=manager_url.rstrip("/"), token=secret))
    console.print(f"logged in to {manager_url}; stored in {path}", highlight=False)


@app.command("list")
def list_projects(
    manager_url: ManagerUrl = None,
    token: Token = None,
    status_filter: Annotated[
        str | None, typer.Option("--status", help="Only projects in this status.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many.")] = 50,
    as_json: JsonOutput = False,
) -> None:
    """Your projects, oldest first, as a table."""
    from urllib.parse import urlencode

    query = {"limit": limit, **({"status": status_filter} if status_filter else {})}
    try:
        page = _client(manager_url, token).request("GET", f"/projects?{urlencode(query)}")
    except FlopsError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=page)
        return
    from rich.table import Table

    table = Table("project", "customer", "status", "created", "message", box=None)
    for project in page["projects"]:
        table.add_row(
            project["project_id"],
            project["customer_id"],
            _coloured(project["status"]),
            _clock(project["created_at"]),
            project["status_message"][:80],
        )
    console.print(table)
    console.print(f"{len(page['projects'])} of {page['total']} project(s)")


@app.command()
def status(
    project_id: Annotated[str, typer.Argument(help="The project's id.")],
    manager_url: ManagerUrl = None,
    token: Token = None,
    as_json: JsonOutput = False,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Follow the project's progress until it ends (Ctrl-C stops following).",
        ),
    ] = False,
    timeout_s: FollowTimeout = 24 * 3600,
) -> None:
    """One project: its phases, rounds, learners, MLflow run and model."""
    client = _client(manager_url, token)
    try:
        project = client.project(project_id)
    except FlopsError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=project)
    elif follow:
        _follow(client, project_id, timeout_s)
    else:
        _print_summary(project)


@app.command()
def cancel(
    project_id: Annotated[str, typer.Argument(help="The project's id.")],
    manager_url: ManagerUrl = None,
    token: Token = None,
) -> None:
    """Stop every service of a project (a finished one: its trained-model server)."""
    try:
        project = _client(manager_url, token).request("DELETE", f"/projects/{project_id}")
    except FlopsError as exc:
        _fail(exc)
    console.print(f"project {project_id} {_coloured(project['status'])}", highlight=False)


@app.command()
def nodes(manager_url: ManagerUrl = None, token: Token = None, as_json: JsonOutput = False) -> None:
    """The registered worker nodes: data tags and rows, architecture, cluster, last seen."""
    try:
        registered = _client(manager_url, token).nodes()
    except FlopsError as exc:
        _fail(exc)
    if as_json:
        console.print_json(data=registered)
        return
    from rich.table import Table

    table = Table("node", "tags (rows)", "architecture", "cluster", "last seen", box=None)
    for node in registered:
        tags = ", ".join(f"{tag} ({rows})" for tag, rows in sorted(node["tags"].items()))
        table.add_row(
            node["node_id"],
            tags or "-",
            str(node.get("architecture") or "-"),
            str(node.get("cluster") or "-"),
            _clock(node.get("last_seen")),
        )
    console.print(table)


def _clock(epoch_s: float | None) -> str:
    return datetime.fromtimestamp(epoch_s).strftime("%Y-%m-%d %H:%M:%S") if epoch_s else "-"


def _coloured(status: str) -> str:
    colour = {"failed": "red", "completed": "green", "cancelled": "yellow"}.get(status, "cyan")
    return f"[{colour}]{status}[/]"


def _print_summary(project: dict[str, Any]) -> None:
    """A project in words and tables: status, phase timeline, rounds, learners, MLflow."""
    from rich.markup import escape
    from rich.table import Table

    console.print(
        f"project   {project['project_id']} ({escape(project['customer_id'])})\n"
        f"status    {_coloured(project['status'])} {escape(project['status_message'])}",
        highlight=False,
        soft_wrap=True,
    )
    phases = sorted(
        project.get("phases", {}).items(), key=lambda item: item[1].get("started_at") or 0.0
    )
    timeline = "  ".join(
        f"{name} {p['seconds']:.1f} s" if p.get("seconds") is not None else f"{name} ..."
        for name, p in phases
    )
    console.print(f"phases    {timeline or '-'}", highlight=False, soft_wrap=True)
    learners = [s for s in project.get("services", []) if s.startswith("learner-")]
    lost = project.get("lost_learners") or []
    if learners:
        named = ", ".join(f"[red]{s} (lost)[/]" if s in lost else s for s in learners)
        console.print(f"learners  {named}", highlight=False)
    rounds = project.get("rounds") or []
    if rounds:
        table = Table("round", "loss", "accuracy", box=None)
        for entry in rounds:
            table.add_row(str(entry["round"]), _fmt(entry.get("loss")), _fmt(entry.get("accuracy")))
        console.print(table)
    mlflow = project.get("mlflow") or {}
    if mlflow:
        model = mlflow.get("registered_model_uri") or mlflow.get("model_uri")
        console.print(
            f"model     {model} (MLflow run {mlflow.get('run_id')})",
            highlight=False,
            soft_wrap=True,
        )
    if project.get("inference_url"):
        console.print(f"serving   {project['inference_url']}/invocations", highlight=False)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


@app.command()
def mock(
    manager_url: ManagerUrl = None,
    token: Token = None,
    tag: Annotated[str, typer.Option(help="Data tag to store the parts under.")] = "mnist",
    partitioning: Annotated[str, typer.Option(help="iid or dirichlet.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
) -> None:
    """Split the bundled MNIST across the registered nodes and push the parts."""
    from flops_manager.cli_progress import Activity

    client = _client(manager_url, token)
    try:
        with Activity(console) as activity, activity.step(f"pushing MNIST parts (tag {tag!r})"):
            rows = client.provide_mocks(
                dataset="mnist", tag=tag, partitioning=partitioning, alpha=alpha
            )
    except FlopsError as exc:
        _fail(exc)
    console.print(rows)


@app.command()
def logs(
    project_id: Annotated[str, typer.Argument(help="The project's id.")],
    service: Annotated[
        str | None,
        typer.Option(
            "--service",
            "-s",
            help="Print this service's own output (learner-node-1, aggregator, ...) instead "
            "of the project's events.",
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing until the service (or the project) ends."
        ),
    ] = False,
    tail: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="Only the last N lines (or events).")
    ] = None,
    manager_url: ManagerUrl = None,
    token: Token = None,
) -> None:
    """A project's events and its services, or with --service that service's own output,
    read through the manager's API (-f follows; Ctrl-C stops following, not the project)."""
    client = _client(manager_url, token)
    try:
        if service is not None:
            _print_service_log(client, project_id, service, tail, follow)
        else:
            _print_project_log(client, project_id, tail, follow)
    except FlopsError as exc:
        if getattr(exc, "code", "") == "unknown_service":
            _fail(FlopsError(exc.message))  # the message names the services already
        _fail(exc)
    except KeyboardInterrupt:
        again = f"flops logs {project_id} -f" + (f" --service {service}" if service else "")
        console.print(
            f"stopped following; project {project_id} keeps running. Follow it again with: "
            + again,
            highlight=False,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _print_service_log(
    client: ManagerClient, project_id: str, service: str, tail: int | None, follow: bool
) -> None:
    """Print ``service``'s output as it is (no markup), following it with ``follow``."""
    if not follow:
        sys.stdout.write(client.service_log(project_id, service, tail))
        sys.stdout.flush()
        return
    for line in client.follow_service_log(project_id, service, tail):
        print(line, flush=True)


def _print_project_log(
    client: ManagerClient, project_id: str, tail: int | None, follow: bool
) -> None:
    """Print the project's events (the last ``tail``) and its services with output;
    ``follow``: then each new event until the project ends."""
    events = client.project(project_id).get("events", [])
    shown = events[-tail:] if tail else events
    for event in shown:
        _print_log_event(event)
    _print_log_services(client.service_logs(project_id))
    if follow:
        for event in client.follow_events(project_id, start=len(events)):
            _print_log_event(event)


def _print_log_event(event: dict[str, Any]) -> None:
    """One event: local date and time, status (coloured), component, message (as it is:
    rich markup in a message is not interpreted)."""
    from rich.text import Text

    status = str(event["status"])
    colour = {"failed": "red", "completed": "green", "cancelled": "yellow"}.get(status, "cyan")
    who = f"[{event['component']}] " if event.get("component") else ""
    line = Text(f"{_clock(event.get('timestamp'))}  ")
    line.append(f"{status:<13}", style=colour)
    line.append(f" {who}{event['message']}")
    console.print(line, highlight=False)


def _print_log_services(listing: dict[str, Any]) -> None:
    """The services with output, and how to read one."""
    services = listing.get("services") or []
    if not services:
        console.print(f"no service output yet (project {listing['status']})", highlight=False)
        return
    from rich.table import Table

    table = Table("service", "role", "where", "state", box=None)
    for item in services:
        state = "[cyan]running[/]" if item["running"] else "ended"
        table.add_row(item["name"], item["role"], item["where"], state)
    console.print(table)
    names = [item["name"] for item in services]
    first = next((n for n in names if n.startswith("learner-")), names[0])
    console.print(
        f"read one with: flops logs {listing['project_id']} --service {first} [-f]",
        highlight=False,
        markup=False,
    )


data_app = typer.Typer(help="A node's own datasets on its Arrow Flight data server.")
app.add_typer(data_app, name="data")

DEFAULT_DATA_SERVER = "grpc://127.0.0.1:8815"

DataServer = Annotated[
    str | None,
    typer.Option(
        "--data-server",
        envvar="FLOPS_DATA_SERVER",
        help="The node's data server, grpc://HOST:PORT.",
        show_default=DEFAULT_DATA_SERVER,
    ),
]
NodeName = Annotated[
    str | None,
    typer.Option(
        "--node",
        help="A registered node: its data server's address is asked from the manager "
        "(admin token); instead of --data-server.",
    ),
]


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The data server's --data-dir on this node: its owner credential and TLS "
        "certificate are read from there (else from FLOPS_DATA_TOKEN / FLOPS_DATA_SERVER_CERT).",
    ),
]


def _node_data_server(
    data_server: str | None, node: str | None, manager_url: str | None, token: str | None
) -> str:
    """The data server to talk to: ``--node``'s as the manager knows it (registered nodes,
    ``GET /nodes``), else ``--data-server``, else :data:`DEFAULT_DATA_SERVER`. Exits 2 when
    both are given, 1 when the node is unknown or its address is hidden from the caller."""
    if node is None:
        return data_server or DEFAULT_DATA_SERVER
    if data_server is not None:
        console.print("[red]error:[/] give --node or --data-server, not both")
        raise typer.Exit(2)
    nodes = {n["node_id"]: n for n in _client(manager_url, token).nodes()}
    if node not in nodes:
        known = ", ".join(sorted(nodes)) or "none"
        console.print(f"[red]error:[/] no registered node {node!r} (registered: {known})")
        raise typer.Exit(1)
    address = nodes[node].get("data_server")
    if not address:
        console.print(
            f"[red]error:[/] the manager shows node {node!r}'s data server to the admin only; "
            "use the admin token or pass --data-server"
        )
        raise typer.Exit(1)
    return str(address)


def _data_client(data_server: str, data_dir: Path | None) -> Any:
    """A ``DataClient`` of ``data_server`` with the owner's credential of ``data_dir`` when
    given; exits 1 when that directory holds none."""
    from data_server.security import owner_credentials
    from flops_utils.data_client import DataClient

    if data_dir is None:
        return DataClient(data_server)
    try:
        token, cert = owner_credentials(data_dir)
    except OSError:
        console.print(
            f"[red]error:[/] {data_dir} holds no data server credential; pass the --data-dir "
            "of a data server that has started (without --insecure) on this node"
        )
        raise typer.Exit(1) from None
    return DataClient(data_server, token=token, tls_root_certs=cert)


@data_app.command("put")
def data_put(
    file: Annotated[Path, typer.Argument(help="A Parquet file, e.g. Dataset.to_parquet's.")],
    tag: Annotated[str, typer.Option(help="The data tag SLAs select it by.")],
    data_server: DataServer = None,
    node: NodeName = None,
    data_dir: DataDir = None,
    manager_url: ManagerUrl = None,
    token: Token = None,
) -> None:
    """Store a Parquet file under a data tag, replacing what the tag held.

    HuggingFace features written by ``datasets.Dataset.to_parquet`` (``Image``,
    ``ClassLabel``, ``Array2D``, ...) travel in the file's schema metadata and come back from
    ``load_dataset()`` on the learners.
    """
    table = _read_parquet(file)
    data_server = _node_data_server(data_server, node, manager_url, token)
    try:
        with _data_client(data_server, data_dir) as client:
            rows = client.put_table(tag, table)
    except FlopsError as exc:
        _fail(exc)
    console.print(f"stored {rows} rows under tag {tag!r} on {data_server}")


@data_app.command("ls")
def data_ls(
    data_server: DataServer = None,
    node: NodeName = None,
    data_dir: DataDir = None,
    manager_url: ManagerUrl = None,
    token: Token = None,
) -> None:
    """List the node's data tags and their row counts."""
    data_server = _node_data_server(data_server, node, manager_url, token)
    try:
        with _data_client(data_server, data_dir) as client:
            tags = client.list_tags()
    except FlopsError as exc:
        _fail(exc)
    for name, rows in sorted(tags.items()):
        console.print(f"{name}\t{rows}")


@data_app.command("drop")
def data_drop(
    tag: Annotated[str, typer.Argument(help="The data tag to delete.")],
    data_server: DataServer = None,
    node: NodeName = None,
    data_dir: DataDir = None,
    manager_url: ManagerUrl = None,
    token: Token = None,
) -> None:
    """Delete the dataset stored under a tag."""
    data_server = _node_data_server(data_server, node, manager_url, token)
    try:
        with _data_client(data_server, data_dir) as client:
            dropped = client.drop(tag)
    except FlopsError as exc:
        _fail(exc)
    console.print(f"dropped {tag!r}" if dropped else f"no tag {tag!r} on {data_server}")


model_app = typer.Typer(
    help="A project's trained model: pull its image, serve it, or download the MLflow model."
)
app.add_typer(model_app, name="model")

ProjectId = Annotated[str, typer.Argument(help="The project's id.")]


@model_app.command("pull")
def model_pull(project_id: ProjectId, manager_url: ManagerUrl = None, token: Token = None) -> None:
    """Pull the project's trained-model image into the local Docker engine."""
    from flops_manager import model_delivery as md

    try:
        ref = _model_image(_client(manager_url, token), project_id)
        engine = _docker()
        console.print(f"pulling {ref}", highlight=False)
        image_id = md.pull_image(engine, ref, lambda line: console.print(f"  {line}"))
    except FlopsError as exc:
        _fail(exc)
    console.print(f"pulled {ref} (image {image_id.removeprefix('sha256:')[:12]})", highlight=False)


@model_app.command("serve")
def model_serve(
    project_id: ProjectId,
    port: Annotated[int, typer.Option(help="Port to serve on (0: a free one).")] = 0,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    no_image: Annotated[
        bool,
        typer.Option(
            "--no-image",
            help="Serve the MLflow model from a virtualenv made for it instead of the image.",
        ),
    ] = False,
    manager_url: ManagerUrl = None,
    token: Token = None,
) -> None:
    """Serve the project's trained model (MLflow's scoring protocol) until Ctrl-C: its image
    in the local Docker engine, or with --no-image the MLflow model itself."""
    import signal

    from flops_manager import model_delivery as md

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop it as Ctrl-C does
    stopping = {signal.SIGTERM, signal.SIGINT}
    # held back while the server starts, so that what started is always stopped again
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    port = port or md.free_port(host)
    url = f"http://{host}:{port}"
    try:
        client = _client(manager_url, token)
        if no_image:
            stop = _serve_model_process(client, project_id, host, port)
        else:
            stop = _serve_model_image(client, project_id, host, port)
    except FlopsError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
        _fail(exc)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
        console.print(f"serving at {url}/invocations (Ctrl-C stops it)", highlight=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        stop()


@model_app.command("download")
def model_download(
    project_id: ProjectId,
    directory: Annotated[Path, typer.Argument(help="New (or empty) directory for the model.")],
    manager_url: ManagerUrl = None,
    token: Token = None,
) -> None:
    """Download the project's trained MLflow model (load it with mlflow.pyfunc.load_model)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        _fail(FlopsError(f"{directory} exists and is not an empty directory; name a new one."))
    try:
        pinned = _fetch_model(_client(manager_url, token), project_id, directory)
    except FlopsError as exc:
        _fail(exc)
    console.print(
        f"downloaded {pinned} to {directory}; load it with "
        f"mlflow.pyfunc.load_model({str(directory)!r})",
        highlight=False,
    )


def _model_image(client: ManagerClient, project_id: str) -> str:
    """The project's trained-model image reference; ``FlopsError`` when it has none."""
    ref = client.trained_model(project_id)["model_image"]
    if not ref:
        raise FlopsError(
            f"project {project_id} has no trained-model image: its SLA needs "
            "post_training_steps [build_image_for_trained_model]; use --no-image to serve the "
            "MLflow model itself."
        )
    return str(ref)


def _docker() -> Any:
    """The local Docker engine's client; ``FlopsError`` when none answers."""
    from flops_manager import model_delivery as md

    engine = md.docker_engine()
    if engine is None:
        raise FlopsError(
            "no Docker engine answers on this machine (DOCKER_HOST or /var/run/docker.sock); "
            "start dockerd, or use --no-image."
        )
    return engine


def _fetch_model(client: ManagerClient, project_id: str, directory: Path) -> str:
    """Download the project's MLflow model into ``directory`` (new or empty) with the
    caller's MLflow credential; returns the version-pinned model URI."""
    from flops_manager import model_delivery as md
    from flops_manager.client import ApiError

    model_uri = client.trained_model(project_id)["model_uri"]
    if not model_uri:
        raise FlopsError(f"project {project_id} has no trained model yet (GET its status).")
    try:
        credential = client.tracking_credential()
        url, env = (
            credential["url"],
            md.tracking_env(credential["username"], credential["password"]),
        )
    except ApiError as exc:
        if exc.status != 404:  # 404: MLflow runs without authentication
            raise
        url, env = client.tracking_url(), {}
    if directory.is_dir():
        directory.rmdir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    return md.download_model_dir(str(model_uri), url, directory, env)


def _serve_model_image(client: ManagerClient, project_id: str, host: str, port: int) -> Any:
    """Run the project's image (pulled if missing); returns what removes the container."""
    from flops_manager import model_delivery as md

    ref = _model_image(client, project_id)
    engine = _docker()
    md.pull_image(engine, ref, lambda line: console.print(f"  {line}"))
    container = md.run_model_container(engine, ref, host, port)
    try:
        md.wait_until_serving(f"http://{host}:{port}", ended=lambda: md.container_ended(container))
    except BaseException:
        container.remove(force=True)
        raise
    return lambda: container.remove(force=True)


def _serve_model_process(client: ManagerClient, project_id: str, host: str, port: int) -> Any:
    """Serve the project's MLflow model from a virtualenv made for it (cached under
    ``$XDG_CACHE_HOME/flops``); returns what stops the server."""
    import shutil
    import tempfile

    from flops_manager import model_delivery as md
    from flops_utils.processes import stop_process_groups

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flops"
    workdir = Path(tempfile.mkdtemp(prefix="flops-model-"))
    try:
        _fetch_model(client, project_id, workdir / "model")
        console.print("preparing the model's environment", highlight=False)
        python = md.ModelEnvironments(cache / "model-envs").python_for(workdir / "model")
        log = (workdir / "server.log").open("ab")
        process = md.start_model_process(python, workdir / "model", host, port, log)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def stop() -> None:
        stop_process_groups([process])
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    def ended() -> str | None:
        return None if process.poll() is None else f"exit code {process.returncode}"

    try:
        md.wait_until_serving(f"http://{host}:{port}", ended=ended)
    except BaseException:
        stop()
        raise
    return stop


def _read_parquet(file: Path) -> Any:
    """The Parquet ``file`` as a ``pyarrow.Table``; exits 1 with a one-line reason otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not file.is_file():
        _fail(FlopsError(f"{file.name}: no such file; give the path of a Parquet file."))
    try:
        return pq.read_table(file)
    except (pa.ArrowException, OSError) as exc:
        text = str(exc)
        for shown in (str(file.resolve()), str(file.absolute()), str(file)):
            text = text.replace(shown, file.name)
        reason = " ".join(text.split())[:200]
        _fail(
            FlopsError(
                f"{file.name} is not a readable Parquet file ({reason}); write it with "
                "datasets.Dataset.to_parquet or pyarrow.parquet.write_table."
            )
        )


def _fail(exc: FlopsError) -> NoReturn:
    console.print(f"[red]error:[/] {exc.message}")
    for detail in exc.details:
        console.print(f"  {detail}")
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
