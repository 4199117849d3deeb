"""The one command-line convention of FLOps' entry points (``flops-manager``,
``flops-learner``, ``flops-aggregator``, ``flops-data-server``, ``flops-observatory``,
``flops-image-builder``).

Each is a typer app made by :class:`RoleApp`:

- ``--help`` and ``--version`` work without any environment; every option names its
  ``FLOPS_<THING>`` environment variable (typer's ``envvar=``; units in the names, e.g.
  ``FLOPS_CONNECT_TIMEOUT_S``) and the help ends with the variables read from the
  environment only (secrets, PEM and JSON documents: :class:`EnvVar`).
- A command-line error (an unknown option, a value of the wrong type) is one line on stderr
  and exit code 2 (:attr:`~flops_utils.contract.exit_codes.ExitCode.CONFIG_ERROR`, click's
  usage-error code too); an unexpected error is one line and exit code 1 (what Python gives an
  uncaught exception) with its traceback only when ``FLOPS_DEBUG`` is set; Ctrl-C exits 130.
  Errors the role itself handles keep the role's exit codes
  (:mod:`flops_utils.contract.exit_codes`).

The orchestrators start the learner, the aggregator and the image builder with environment
variables only; for them an option given on the command line sets its variable
(:func:`export_options`), so the configuration is read, checked and reported the same way
whichever way it came.

typer is not a dependency of ``flops_utils`` (ML repositories' environments import it
without typer): only the entry points import this module, in FLOps' runtime environment
(typer comes with Flower there, with FLOps' own dependencies elsewhere).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any, TypeVar

import click
import typer
from click.core import ParameterSource

from flops_utils import env_vars
from flops_utils.logging import logger

__all__ = [
    "COMMON_ENV",
    "DEBUG_ENV",
    "EXIT_INTERRUPTED",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "STATUS_ENV",
    "EnvVar",
    "MqttUrlOption",
    "ProjectIdOption",
    "RepoDirOption",
    "RoleApp",
    "Setting",
    "UserPythonOption",
    "VersionOption",
    "deprecated_alias",
    "export_options",
    "flops_version",
    "markdown_table",
    "settings_of",
]

DEBUG_ENV = "FLOPS_DEBUG"
"""Set (to anything but ``""``, ``0`` or ``false``) to print the traceback of an unexpected
error; the same variable as ``flops --debug``."""

EXIT_USAGE = 2
"""A command-line error: click's usage-error code, FLOps' ``CONFIG_ERROR``."""

EXIT_UNEXPECTED = 1
"""An error nothing handled: the code of an uncaught Python exception."""

EXIT_INTERRUPTED = 130
"""Ctrl-C: 128 + SIGINT, as a shell reports it."""

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])

HELP_WIDTH = 100
"""Characters of the help text's lines at most (the terminal's width when narrower)."""


@dataclass(frozen=True)
class EnvVar:
    """A variable an entry point reads from the environment only (no option): ``name``
    (``FLOPS_...``), its ``meaning`` and its ``default`` in words (empty: none)."""

    name: str
    meaning: str
    default: str = ""


def flops_version() -> str:
    """FLOps' version: the ``flops`` distribution's, else ``flops-utils``'s (the images hold
    only the runtime's code, no distribution metadata), else ``"unknown"``."""
    for distribution in ("flops", "flops-utils"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _print_version(ctx: typer.Context, value: bool) -> None:
    """The ``--version`` callback: print ``<program> <version>`` and exit 0."""
    if value:
        typer.echo(f"{ctx.find_root().info_name} {flops_version()}")
        raise typer.Exit()


VersionOption = Annotated[
    bool,
    typer.Option(
        "--version",
        callback=_print_version,
        is_eager=True,
        expose_value=True,
        help="Print the version and exit.",
    ),
]
"""The ``--version`` parameter every entry point's command declares."""


class RoleApp(typer.Typer):
    """The typer app of one entry point.

    Args:
        name: the program's name, e.g. ``"flops-learner"``.
        help: what the program does (the help's first paragraph).
        env_only: the variables it reads from the environment only, listed at the end of
            ``--help`` (with :data:`COMMON_ENV`) and in the README's configuration table.
    """

    def __init__(self, name: str, help: str, env_only: Sequence[EnvVar] = ()) -> None:
        super().__init__(
            name=name,
            add_completion=False,
            pretty_exceptions_enable=False,
            rich_markup_mode=None,
            context_settings={"max_content_width": HELP_WIDTH},
        )
        self.program = name
        self.description = help
        self.env_only = tuple(env_only)

    def main_command(self) -> Callable[[CommandFunction], CommandFunction]:
        """The decorator of the app's one command: :meth:`typer.Typer.command` with the app's
        help and the environment-only variables as the help's last paragraph (the command's
        docstring is for readers of the code)."""
        epilog = _epilog([*self.env_only, *COMMON_ENV])
        return self.command(help=self.description, epilog=epilog, cls=_Command)

    def run(self, argv: Sequence[str] | None = None) -> int:
        """Parse ``argv`` (default ``sys.argv[1:]``), run the command and return its exit
        code: what the command returned (``None``: 0), 0 after ``--help``/``--version``,
        :data:`EXIT_USAGE` for a command-line error, :data:`EXIT_INTERRUPTED` for Ctrl-C,
        :data:`EXIT_UNEXPECTED` for an exception (each error printed as one line on stderr)."""
        command = typer.main.get_command(self)
        try:
            returned = command.main(
                args=list(sys.argv[1:] if argv is None else argv),
                prog_name=self.program,
                standalone_mode=False,
            )
        except click.UsageError as exc:
            _error(f"{exc.format_message()} (see {self.program} --help)")
            return EXIT_USAGE
        except click.ClickException as exc:
            _error(exc.format_message())
            return exc.exit_code
        except click.Abort:
            _error("interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:
            if _debugging():
                traceback.print_exception(exc)
            _error(
                f"unexpected error ({type(exc).__name__}: {_first_line(exc)}); set {DEBUG_ENV}=1 "
                "for the traceback, and report it"
            )
            return EXIT_UNEXPECTED
        return 0 if returned is None else int(returned)


class _Command(typer.core.TyperCommand):
    """Click's plain help (it wraps long variable names where rich's tables cut them), without
    the backslashes typer puts before ``[`` for rich even then."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        formatter.buffer = [part.replace("\\[", "[") for part in formatter.buffer]


def export_options(ctx: typer.Context) -> dict[str, str]:
    """Set the environment variable of each option given on the command line (in
    ``os.environ``, so the processes the role starts see it too) and return the variables
    set: how a role that reads its configuration from the environment
    (:mod:`flops_utils.env_vars`) takes options.

    Only options with an ``envvar`` count; their values are set as given (the role checks them
    and names the variable in its error)."""
    exported: dict[str, str] = {}
    for param in ctx.command.params:
        name = param.name
        if name is None or not isinstance(param.envvar, str):
            continue
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            exported[param.envvar] = str(ctx.params[name])
    os.environ.update(exported)
    return exported


def deprecated_alias(value: str | None, name: str, old_name: str, env: Mapping[str, str]) -> str:
    """``value`` (of the variable ``name`` or its option) when set, else the deprecated
    variable ``old_name`` from ``env`` with a one-line warning, else ``""``."""
    if value:
        return value
    old_value = env.get(old_name, "")
    if old_value:
        logger.warning("%s is deprecated; set %s instead (the same value)", old_name, name)
    return old_value


def _epilog(env_only: Sequence[EnvVar]) -> str | None:
    """The help's last paragraph: the environment-only variables, one line each."""
    if not env_only:
        return None
    lines = [
        f"{var.name}: {var.meaning}{f' (default: {var.default})' if var.default else ''}"
        for var in env_only
    ]
    return "Read from the environment only:\n\n" + "\n\n".join(lines)


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def _error(message: str) -> None:
    """Print ``message`` as one ``error:`` line on stderr."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


# -- options and variables several roles share ---------------------------------------------

ProjectIdOption = Annotated[
    str | None,
    typer.Option(
        envvar=env_vars.PROJECT_ID,
        help="The project's id; status messages go to flops/<id>/... (required).",
        show_default=False,
    ),
]
MqttUrlOption = Annotated[
    str | None,
    typer.Option(
        envvar=env_vars.MQTT_URL,
        help="The broker status messages go to, mqtt://HOST:PORT (required).",
        show_default=False,
    ),
]
RepoDirOption = Annotated[
    str | None,
    typer.Option(
        envvar=env_vars.ML_REPO_DIR,
        help="The ML repository's root (holding model_manager.py).",
        show_default="the working directory",
    ),
]
UserPythonOption = Annotated[
    str | None,
    typer.Option(
        envvar=env_vars.USER_PYTHON,
        help="Interpreter of the repository's own environment; the model worker runs the "
        "repository's ModelManager with it.",
        show_default="this interpreter",
    ),
]

STATUS_ENV = (
    EnvVar(env_vars.MQTT_USERNAME, "MQTT user name issued by the manager", "anonymous"),
    EnvVar(env_vars.MQTT_PASSWORD, "its password"),
    EnvVar(
        env_vars.MQTT_DRAIN_TIMEOUT_S,
        "seconds the final status message waits for the broker to take what is queued",
        "60",
    ),
)
"""Variables of every role that publishes status messages (learner, aggregator, builder)."""

COMMON_ENV = (
    EnvVar(env_vars.LOG_LEVEL, "level of the flops logger (DEBUG, INFO, ...)", "INFO"),
    EnvVar(DEBUG_ENV, "1: print the traceback of an unexpected error"),
)
"""Variables every entry point reads."""


# -- the README's configuration table --------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of an entry point's configuration table: its ``option`` (``--port``; empty for
    a variable without one), environment ``variable``, ``default`` in words and ``meaning``."""

    option: str
    variable: str
    default: str
    meaning: str


def settings_of(app: RoleApp) -> list[Setting]:
    """The options of ``app``'s command (without ``--version``), then its
    environment-only variables, as :class:`Setting` rows."""
    command = typer.main.get_command(app)
    rows = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "version":
            continue
        variable = param.envvar if isinstance(param.envvar, str) else ""
        rows.append(Setting(", ".join(param.opts), variable, _default_of(param), param.help or ""))
    rows.extend(Setting("", var.name, var.default, var.meaning) for var in app.env_only)
    return rows


def _default_of(param: click.Option) -> str:
    """The default of ``param`` as its help shows it (empty: none)."""
    if isinstance(param.show_default, str):
        return param.show_default
    default = param.default
    if param.show_default is False or default is None or isinstance(default, bool):
        return ""
    return str(default)


def markdown_table(app: RoleApp) -> str:
    """The configuration table of ``app`` in Markdown: ``| option | variable | default |
    meaning |``, one row per :class:`Setting`."""

    def cell(text: str, code: bool = False) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        if not code:
            text = text.replace("<", "\\<")
        return f"`{text}`" if code and text else text

    lines = ["| option | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for row in settings_of(app):
        names = " / ".join(cell(name.strip(), code=True) for name in row.variable.split("/"))
        lines.append(
            f"| {cell(row.option, code=True)} | {names} | {cell(row.default)} "
            f"| {cell(row.meaning)} |"
        )
    return "\n".join(lines)
