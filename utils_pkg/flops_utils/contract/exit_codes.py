"""One exit-code catalogue for every FLOps process: the learner, the aggregator, the image
builder and the data server.

Each number has one meaning for all of them (:class:`ExitCode`); :data:`EXIT_CODES` gives its
meaning, its fix and the roles that use it. :func:`exit_code_for` maps an exception to its code
(by the ``code`` of the FLOps errors, :data:`ERROR_EXIT_CODES`), and :func:`describe_exit`
turns a process's return code into the sentence the manager shows when a service exits.
"""

import signal
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from flops_utils.errors import FlopsError

__all__ = [
    "ERROR_EXIT_CODES",
    "EXIT_CODES",
    "UNKNOWN_EXIT",
    "ExitCode",
    "ExitMeaning",
    "Role",
    "describe_exit",
    "exit_code_for",
    "role_named",
]


class Role(StrEnum):
    """The FLOps processes that exit with an :class:`ExitCode`."""

    LEARNER = "learner"
    AGGREGATOR = "aggregator"
    BUILDER = "builder"
    """The image builder (its status messages' component is ``builder``)."""
    DATA_SERVER = "data_server"


class ExitCode(IntEnum):
    """How a FLOps process ended; :data:`EXIT_CODES` gives each one's meaning and fix."""

    OK = 0
    USER_CODE_ERROR = 1
    CONFIG_ERROR = 2
    AGGREGATOR_UNREACHABLE = 3
    DATA_UNAVAILABLE = 4
    INTERNAL_ERROR = 5
    TRAINING_FAILED = 6
    TRACKING_UNAVAILABLE = 7
    MODEL_LOGGING_FAILED = 8
    BUILD_FAILED = 9
    ADDRESS_UNAVAILABLE = 10
    TERMINATED = 143
    """128 + SIGTERM: the aggregator's own exit when stopped."""

    @property
    def label(self) -> str:
        """The name in words, e.g. ``"training failed"``."""
        return self.name.lower().replace("_", " ")


@dataclass(frozen=True)
class ExitMeaning:
    """What an exit code means (``meaning``), what to do about it (``fix``, empty when there
    is nothing to fix) and which ``roles`` exit with it."""

    meaning: str
    fix: str
    roles: frozenset[Role]


_ALL = frozenset(Role)
_FL = frozenset({Role.LEARNER, Role.AGGREGATOR})

EXIT_CODES: dict[ExitCode, ExitMeaning] = {
    ExitCode.OK: ExitMeaning(
        "It finished its work: training ended (learner, aggregator: the model is logged and "
        "registered in MLflow), the images are pushed (image builder), or it was asked to "
        "stop (data server: SIGTERM or SIGINT).",
        "",
        _ALL,
    ),
    ExitCode.USER_CODE_ERROR: ExitMeaning(
        "The ML repository's code raised (model_manager.py / data_manager.py: the "
        "ModelManager constructor, set_model_data, fit_model, evaluate_model, "
        "get/set_model_parameters or get_model).",
        "Correct the repository; the failed message names the method and the exception. "
        "ModelManager() must work without data.",
        _FL,
    ),
    ExitCode.CONFIG_ERROR: ExitMeaning(
        "A FLOPS_* variable or command-line option is missing or malformed, the SLA is "
        "invalid, FLOPS_ML_REPO_DIR holds no model_manager.py, or the repository's "
        "environment (FLOPS_USER_PYTHON) cannot run the model worker.",
        "Start it through FLOps (the manager and the orchestrator set these) or fix the value "
        "the message names.",
        _ALL,
    ),
    ExitCode.AGGREGATOR_UNREACHABLE: ExitMeaning(
        "The learner could not reach the aggregator (a cluster aggregator: the root "
        "aggregator), or the connection broke before training ended.",
        "Check the aggregator's status messages and FLOPS_AGGREGATOR_ADDRESS (cluster "
        "aggregator: FLOPS_ROOT_AGGREGATOR_ADDRESS).",
        frozenset({Role.LEARNER, Role.AGGREGATOR}),
    ),
    ExitCode.DATA_UNAVAILABLE: ExitMeaning(
        "The node's data server is unreachable or holds none of the SLA's data tags.",
        "Start the node's data server and push data with the SLA's tags (e.g. POST /mocks).",
        frozenset({Role.LEARNER}),
    ),
    ExitCode.INTERNAL_ERROR: ExitMeaning(
        "An unexpected error inside FLOps.",
        "Report it with the service's log.",
        _ALL,
    ),
    ExitCode.TRAINING_FAILED: ExitMeaning(
        "Too few learners (or, for a root aggregator, cluster aggregators) connected in time, "
        "or a round kept fewer results than the SLA's minimum because clients failed, "
        "disconnected or exceeded round_timeout_s.",
        "Read the learners' failed messages; check min_available_clients and round_timeout_s.",
        frozenset({Role.AGGREGATOR}),
    ),
    ExitCode.TRACKING_UNAVAILABLE: ExitMeaning(
        "The MLflow tracking server is unreachable or rejected a request.",
        "Start the tracking server (flops-observatory) and check FLOPS_MLFLOW_URL.",
        frozenset({Role.AGGREGATOR}),
    ),
    ExitCode.MODEL_LOGGING_FAILED: ExitMeaning(
        "The final model could not be logged with the SLA's ml_model_flavor (library missing "
        "or wrong model type).",
        "Install the flavor's library in the repository's dependencies or fix ml_model_flavor.",
        frozenset({Role.AGGREGATOR}),
    ),
    ExitCode.BUILD_FAILED: ExitMeaning(
        "The ML repository could not be fetched or is invalid, its dependencies could not be "
        "resolved or installed, or building or pushing an image failed.",
        "Read the failed message (it quotes the failing step, e.g. the resolver's output) and "
        "fix the repository, its ref or the registry settings.",
        frozenset({Role.BUILDER}),
    ),
    ExitCode.ADDRESS_UNAVAILABLE: ExitMeaning(
        "The address to listen on cannot be bound: the port is in use or the host is not an "
        "address of this machine.",
        "Choose a free port or another address (FLOPS_AGGREGATOR_ADDRESS for the aggregator, "
        "--host/--port for the data server).",
        frozenset({Role.AGGREGATOR, Role.DATA_SERVER}),
    ),
    ExitCode.TERMINATED: ExitMeaning(
        "Stopped by SIGTERM (128 + 15), e.g. because the project was cancelled; the "
        "aggregator marks its MLflow run KILLED.",
        "",
        _ALL,
    ),
}
"""Exit code → meaning, fix and roles; one entry per :class:`ExitCode`."""

ERROR_EXIT_CODES: dict[str, ExitCode] = {
    "user_code_error": ExitCode.USER_CODE_ERROR,
    "learner_config_error": ExitCode.CONFIG_ERROR,
    "aggregator_config_error": ExitCode.CONFIG_ERROR,
    "image_builder_config_error": ExitCode.CONFIG_ERROR,
    "model_worker_start_error": ExitCode.CONFIG_ERROR,
    "invalid_manager_url": ExitCode.CONFIG_ERROR,
    "mqtt_connection_refused": ExitCode.CONFIG_ERROR,
    "data_storage_error": ExitCode.CONFIG_ERROR,
    "aggregator_unreachable": ExitCode.AGGREGATOR_UNREACHABLE,
    "root_aggregator_unreachable": ExitCode.AGGREGATOR_UNREACHABLE,
    "data_unavailable": ExitCode.DATA_UNAVAILABLE,
    "training_failed": ExitCode.TRAINING_FAILED,
    "tracking_error": ExitCode.TRACKING_UNAVAILABLE,
    "model_logging_error": ExitCode.MODEL_LOGGING_FAILED,
    "builder_error": ExitCode.BUILD_FAILED,
    "aggregator_address_unavailable": ExitCode.ADDRESS_UNAVAILABLE,
    "data_server_start_failed": ExitCode.ADDRESS_UNAVAILABLE,
}
"""The ``code`` of a FLOps error class → its exit code. A subclass without an entry of its own
takes its nearest base's (``learners_missing`` → ``training_failed``); any other exception is
:attr:`ExitCode.INTERNAL_ERROR`."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The :class:`ExitCode` of ``exc``: the :data:`ERROR_EXIT_CODES` entry of the first class
    in its MRO whose ``code`` has one, else :attr:`ExitCode.INTERNAL_ERROR`."""
    for cls in type(exc).__mro__:
        if issubclass(cls, FlopsError) and "code" in vars(cls):
            code = ERROR_EXIT_CODES.get(cls.code)
            if code is not None:
                return code
    return ExitCode.INTERNAL_ERROR


def role_named(name: str) -> Role | None:
    """The role of a role or service name (``learner-node1`` → learner, ``image_builder`` →
    builder); ``None`` for another name."""
    head = name.strip().lower().replace("-", "_")
    if head in ("image_builder", "builder") or head.startswith("builder_"):
        return Role.BUILDER
    if head.startswith("data_server"):
        return Role.DATA_SERVER
    for role in (Role.LEARNER, Role.AGGREGATOR):
        if head == role.value or head.startswith(f"{role.value}_"):
            return role
    return None


_SIGNAL_MEANINGS: dict[int, tuple[str, str]] = {
    signal.SIGKILL: (
        "it was stopped at once by the operating system or an orchestrator, most often because it "
        "ran out of memory (the kernel's OOM killer).",
        "Raise resource_constraints.memory in the SLA or use smaller batches; if a stop was "
        "forced, nothing to fix.",
    ),
    signal.SIGTERM: (
        "it was asked to stop, e.g. because the project was cancelled or the manager stopped it.",
        "",
    ),
    signal.SIGINT: ("it was interrupted (Ctrl-C).", ""),
    signal.SIGSEGV: (
        "it crashed in native code (a segmentation fault), usually in a library of the ML "
        "repository.",
        "Check the repository's native libraries (e.g. torch, numpy) and their versions; run "
        "the repository locally to reproduce it.",
    ),
    signal.SIGILL: (
        "it ran an instruction this CPU does not have, usually in a native library built for "
        "another CPU.",
        "Install builds of the repository's native libraries for this machine's CPU.",
    ),
    signal.SIGABRT: (
        "it was aborted by native code (an assertion or a fatal error in a library).",
        "Read the end of the service's log; check the repository's native libraries.",
    ),
}

_GENERIC_SIGNAL = (
    "it does not handle that signal.",
    "Read the service's log and check who sent the signal.",
)


UNKNOWN_EXIT = -1000
"""Return code of a service that ended without an exit code anyone reported: an orchestrator
that marks a crash (Oakestra's ``DEAD``) or a failure to start (``FAILED``, a scheduling
failure) without the process's own code. It is below every signal number, so no real return
code (``0``..``255``, or ``-N`` for signal ``N``) equals it."""


def describe_exit(role: str, returncode: int) -> str:
    """The sentence the manager shows when a process of ``role`` (a role or service name,
    e.g. ``learner-node1``) ends with ``returncode``.

    - A catalogue code: ``"exited with code 6 (training failed): <meaning> Fix: <fix>"``
      (no ``Fix:`` when there is nothing to fix).
    - A negative return code ``-N`` (killed by signal N, as ``subprocess`` reports it) and a
      code ``128 + N`` that is not in the catalogue (a shell or container runtime reporting
      signal N): ``"was killed by signal 9 (SIGKILL): <meaning> Fix: <fix>"``.
    - :data:`UNKNOWN_EXIT`: ``"crashed or could not start, exit code unknown: ..."``.
    - Any other code: says that FLOps does not define it and where to look.
    """
    if returncode == UNKNOWN_EXIT:
        return (
            "crashed or could not start, exit code unknown: the orchestrator reported how it "
            "ended but not its exit code. Fix: read the orchestrator's status below and the "
            "service's log."
        )
    code = _catalogued(returncode)
    if code is not None:
        entry = EXIT_CODES[code]
        return _sentence(
            f"exited with code {returncode} ({code.label}): ", entry.meaning, entry.fix
        )
    if returncode < 0 or 128 < returncode < 128 + 65:
        number = -returncode if returncode < 0 else returncode - 128
        meaning, fix = _SIGNAL_MEANINGS.get(number, _GENERIC_SIGNAL)
        name = _signal_name(number)
        how = (
            f"was killed by signal {number} ({name})"
            if returncode < 0
            else f"exited with code {returncode} (killed by signal {number}, {name})"
        )
        return _sentence(f"{how}: ", meaning, fix)
    name = (role_named(role) or role).replace("_", " ")
    return (
        f"exited with code {returncode}, which FLOps does not define for the {name}: the "
        "process ended outside FLOps' control (e.g. sys.exit in the ML repository's code or "
        "a crash of the interpreter). Fix: read the service's log."
    )


def _catalogued(returncode: int) -> ExitCode | None:
    try:
        return ExitCode(returncode)
    except ValueError:
        return None


def _sentence(head: str, meaning: str, fix: str) -> str:
    return f"{head}{meaning}" + (f" Fix: {fix}" if fix else "")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
