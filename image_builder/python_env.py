"""What every builder backend installs, and how: shared by the ``venv`` and ``oci`` builders.

- The FLOps runtime's Python packages (:data:`RUNTIME_PACKAGES`) are pinned to the versions
  installed in the manager's own environment (:func:`manager_versions`, :func:`runtime_pins`),
  so the manager, learners and aggregators run identical versions; every other distribution of
  the manager's environment becomes a constraint (:func:`plan_install`), so shared transitive
  dependencies (protobuf, grpcio, ...) match too unless the repository asks for other versions.
- uv installs everything (:func:`uv_command` runs it on this machine, :func:`uv_binary` is the
  executable an image build mounts); builders try offline first (uv's cache), then online with
  the constraints, then online without them, and report the most telling failure in a sentence
  or two (:func:`dependency_install_error`, :func:`condense_uv_error`);
  :func:`run_uv_with_fallbacks` runs that sequence for a uv command on this machine.
- The FLOps source roots (:func:`default_source_roots`) and the per-key build lock
  (:func:`file_lock`).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from flops_utils.logging import logger
from image_builder.build_processes import run_bounded
from image_builder.dependencies import requirement_name
from image_builder.errors import BuilderError, DependencyInstallError, EnvironmentBuildError

RUNTIME_PACKAGES = (
    "flwr",
    "mlflow",
    "pyarrow",
    "datasets",
    "numpy",
    "paho-mqtt",
    "requests",
)
"""Distributions the learner, the aggregator and ``flops_utils`` import, pinned to the
manager's installed versions."""

USER_ENV_REQUIREMENTS = ("numpy>=1.22", "pyarrow>=14", "datasets>=2.14")
"""What ``flops_utils`` needs in the repository's own environment (the model worker and
``load_dataset()``): wide ranges, so that the resolver fits them to the repository's pins.
The model worker and ``flops_utils.data_client`` are tested at both ends of these ranges."""

USER_ENV_MLFLOW = "mlflow-skinny>=2.12"
"""Added to the repository's environment when it requires no MLflow itself: the model worker
saves the final model with it (``mlflow.<flavor>.save_model``)."""

MLFLOW_DISTRIBUTIONS = frozenset({"mlflow", "mlflow-skinny"})
"""Distributions that provide the ``mlflow`` package (a repository pinning one keeps it)."""

NETWORK_ERROR = re.compile(
    r"failed to fetch|error sending request|dns error|could not connect|connection refused|"
    r"network is unreachable|timed out|failed to download",
    re.IGNORECASE,
)
"""uv stderr that means the package index could not be reached."""

MISSING_PACKAGE = re.compile(r"not found in the package registry", re.IGNORECASE)
"""uv stderr that means the index does not know a requested name."""

_FIX_SENTENCE = " Fix the requirement in the repository's dependency file."
_EXCLUDED_FROM_CONSTRAINTS = frozenset({"flops", "flops-utils"})
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BOX_CHARS = re.compile("[\u00d7\u2500-\u257f\u25b6]+")
"""uv's diagnostic drawing: the cross mark and box-drawing characters."""
_NOISE_PREFIXES = ("using python", "resolved ", "prepared ", "installed ", "audited ", "warning:")


def manager_versions() -> dict[str, str]:
    """``{normalized name: version}`` of the manager environment's index-installed dists.

    Distributions installed from a path or URL (``direct_url.json``: editable FLOps itself,
    local wheels) are left out: they cannot be pinned by version.
    """
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        normalized = canonicalize_name(name)
        if normalized in versions or normalized in _EXCLUDED_FROM_CONSTRAINTS:
            continue
        if dist.read_text("direct_url.json") is not None:
            continue
        versions[normalized] = dist.version
    return versions


def runtime_pins(packages: Iterable[str]) -> list[str]:
    """``["flwr==1.41.0", ...]``: ``packages`` at the manager's installed versions, in order.

    A package missing from the manager's environment is listed unpinned (logged).
    """
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            logger.warning("%s is not installed in the manager; installing it unpinned", name)
            pins.append(name)
    return pins


def plan_install(
    requirements: Sequence[str], runtime_packages: Iterable[str], installed: dict[str, str]
) -> tuple[list[str], list[str]]:
    """Split a repository's requirements into (lines to install, constraint lines).

    ``installed``: :func:`manager_versions`. A repository requirement on one of
    ``runtime_packages`` that excludes the manager's version is dropped (logged): both sides
    must run identical versions. The constraints pin every manager distribution (``name==v``,
    sorted) that the repository does not ask for at another version, runtime packages excluded
    (those are pinned as requirements).
    """
    runtime = {canonicalize_name(name) for name in runtime_packages}
    user_lines: list[str] = []
    unconstrained: set[str] = set()
    for line in requirements:
        name = requirement_name(line)
        if name is None:
            user_lines.append(line)
            continue
        satisfied = satisfied_by(line, installed.get(name))
        if name in runtime and not satisfied:
            logger.warning(
                "ignoring the repository's %r: FLOps runs %s==%s", line, name, installed.get(name)
            )
            continue
        if not satisfied:
            unconstrained.add(name)
        user_lines.append(line)
    constraints = [
        f"{name}=={version}"
        for name, version in sorted(installed.items())
        if name not in unconstrained and name not in runtime
    ]
    return user_lines, constraints


def satisfied_by(line: str, version: str | None) -> bool:
    """True if ``version`` (installed in the manager) meets the requirement ``line``."""
    if version is None:
        return False
    try:
        requirement = Requirement(line)
        return requirement.url is None and requirement.specifier.contains(
            Version(version), prereleases=True
        )
    except (InvalidRequirement, InvalidVersion):
        return False


def condense_uv_error(stderr: str) -> str:
    """Return uv's error output as one or two sentences (<= 500 characters).

    Drops progress and summary lines, ``hint:`` paragraphs, ANSI codes and the tree drawing
    characters of uv's diagnostics; an ``error:`` and its ``cause:`` lines become
    ``error: cause: cause``; a trailing period is removed.
    """
    text = ""
    for raw in _ANSI.sub("", stderr).splitlines():
        line = _BOX_CHARS.sub(" ", raw).strip()
        lowered = line.lower()
        if lowered.startswith("hint:"):
            break
        if not line or lowered.startswith(_NOISE_PREFIXES):
            continue
        separator = " "
        for prefix in ("error:", "caused by:", "cause:"):
            if lowered.startswith(prefix):
                line = line[len(prefix) :].strip()
                separator = "; " if prefix == "error:" else ": "
                break
        if line.startswith("Because "):
            line = "b" + line[1:]
        if text and separator != " ":
            text = text.rstrip(":. ")
        text = f"{text}{separator}{line}" if text else line
    text = " ".join(text.split()).rstrip(".")
    if not text:
        return "uv failed without a message"
    return text if len(text) <= 500 else text[:497] + "..."


def pick_error(errors: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """The most telling failure ``(mode, stderr)``: the last one not caused by a network error."""
    for mode, stderr in reversed(errors):
        if not NETWORK_ERROR.search(stderr):
            return mode, stderr
    return errors[0] if errors else ("offline", "")


def dependency_install_error(errors: Sequence[tuple[str, str]]) -> DependencyInstallError:
    """The :class:`DependencyInstallError` for failed install attempts ``[(mode, stderr)]``.

    ``mode`` is ``"offline"`` or ``"online"``, in the order tried. The message carries the most
    telling failure (:func:`pick_error`) condensed by :func:`condense_uv_error`, and says when
    only uv's cache could be used; ``details`` holds every attempt's condensed error.
    """
    mode, stderr = pick_error(errors)
    offline_only = mode == "offline" and len(errors) > 1
    return DependencyInstallError(
        f"Cannot install the ML repository's dependencies: {condense_uv_error(stderr)}"
        + (
            " (the package index was unreachable, so only uv's cache was used)"
            if offline_only
            else ""
        )
        + "."
        + _FIX_SENTENCE,
        details=[condense_uv_error(text) for _, text in errors],
    )


def attributed_install_error(
    errors: Sequence[tuple[str, str]], flops_lines: Sequence[str], dependency_file: str
) -> DependencyInstallError:
    """:func:`dependency_install_error` with the requirements sorted by whose they are.

    ``flops_lines``: what FLOps added to the repository's requirements (e.g. ``numpy>=1.22``);
    those whose names the resolver's message mentions are named as FLOps', everything else as
    the repository's own, from ``dependency_file``. The fix stays the repository's: FLOps'
    ranges are as wide as ``flops_utils`` allows.
    """
    error = dependency_install_error(errors)
    _, stderr = pick_error(errors)
    lowered = stderr.lower()
    mentioned = [
        line
        for line in flops_lines
        if (name := requirement_name(line))
        and re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", lowered.replace("_", "-"))
    ]
    if mentioned:
        whose = (
            f"FLOps added {', '.join(mentioned)} (what flops_utils needs in the repository's "
            f"environment, as wide as it allows); every other requirement named is the "
            f"repository's own, from {dependency_file}"
        )
    else:
        whose = f"every requirement named is the repository's own, from {dependency_file}"
    message = error.message.removesuffix(
        " Fix the requirement in the repository's dependency file."
    )
    return DependencyInstallError(
        f"{message.rstrip('.')}. {whose[0].upper()}{whose[1:]}. Fix the requirement in "
        f"{dependency_file}.",
        details=error.details,
    )


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~>@-])/(?:[\w.@+~-]+/?)+")
"""An absolute POSIX path that is not part of a URL (``https://host/a`` has a word character
or ``/`` before each of its slashes)."""


def redact_paths(text: str, hidden: dict[str, str]) -> str:
    """``text`` with every path of ``hidden`` (longest first) replaced by its label, then every
    other absolute path (``/a/b``, not part of a URL) replaced by ``<path>``, so that output of
    git or an installer shown to users names no directory of the manager's host."""
    for path in sorted(hidden, key=len, reverse=True):
        text = text.replace(path, hidden[path])
    return _ABSOLUTE_PATH.sub("<path>", text)


def find_links() -> list[str]:
    """Local wheel directories or pages to search besides the index: ``UV_FIND_LINKS``, else
    ``PIP_FIND_LINKS`` (pip's variable; space- or comma-separated), existing entries only."""
    raw = os.environ.get("UV_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS") or ""
    entries = [entry for entry in re.split(r"[\s,]+", raw) if entry]
    return [e for e in entries if "://" in e or Path(e).exists()]


REPORTED_DISTRIBUTIONS = frozenset(
    {"numpy", "pandas", "pyarrow", "datasets", "mlflow", "mlflow-skinny", "scikit-learn",
     "scipy", "torch", "tensorflow", "keras", "flwr", "setuptools"}
)  # fmt: skip
"""Distributions :func:`installed_versions` reports."""


def installed_versions(venv: Path) -> dict[str, str]:
    """``{normalized name: version}`` of :data:`REPORTED_DISTRIBUTIONS` installed in ``venv``
    (read from the ``*.dist-info`` directory names, without running its interpreter)."""
    versions: dict[str, str] = {}
    for info in sorted((venv / "lib").glob("python*/site-packages/*.dist-info")):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        normalized = canonicalize_name(name)
        if normalized in REPORTED_DISTRIBUTIONS:
            versions[normalized] = version
    return versions


_PKG_RESOURCES = (
    "MLflow before 2.16 imports pkg_resources, which uv's virtualenvs do not have and "
    "setuptools 81 removed (ModuleNotFoundError: No module named 'pkg_resources')"
)

UNDECLARED_CONFLICTS: tuple[tuple[str, str, str, str], ...] = (
    (
        "numpy",
        "<2",
        "pyarrow<26",
        "pyarrow 26 imports only with NumPy 2 or newer but does not declare it "
        "(ImportError: pyarrow requires NumPy 2.0 or newer); pyarrow 25 works with NumPy 1.26",
    ),
    (
        "datasets",
        "<3.6",
        "pyarrow<20",
        "datasets before 3.6 cannot read Array2D columns with pyarrow 20 or newer "
        "(TypeError: ArrayExtensionArray.to_pylist() got an unexpected keyword argument "
        "'maps_as_pydicts'); datasets 3.6 added it",
    ),
    ("mlflow", "<2.16", "setuptools<81", _PKG_RESOURCES),
    ("mlflow-skinny", "<2.16", "setuptools<81", _PKG_RESOURCES),
)
"""Incompatibilities the packages' metadata does not declare, so no resolver can avoid them:
``(distribution, installed version range, requirement to add, why)``. Measured here by
importing each combination in a fresh uv environment (pyarrow 25.0.1 and 26.0.1 with NumPy
1.26.4; mlflow-skinny 2.12.1 to 2.16.2 without setuptools)."""


def undeclared_conflicts(versions: dict[str, str]) -> dict[str, str]:
    """``{requirement to add: why}`` for the :data:`UNDECLARED_CONFLICTS` that apply to an
    environment with ``versions`` (``{normalized name: version}``, e.g.
    :func:`installed_versions`) and that it violates (a missing distribution violates)."""
    corrections: dict[str, str] = {}
    for name, range_text, requirement, why in UNDECLARED_CONFLICTS:
        installed = versions.get(name)
        if installed is None or not satisfied_by(f"{name}{range_text}", installed):
            continue
        needed = Requirement(requirement)
        current = versions.get(canonicalize_name(needed.name))
        if current is None or not needed.specifier.contains(current, prereleases=True):
            corrections[requirement] = why
    return corrections


def run_uv_with_fallbacks(
    run: Callable[[list[str]], tuple[int, str]], args: Sequence[str], constraints: Path
) -> tuple[str | None, list[tuple[str, str]]]:
    """Run a uv command the way every builder installs: offline with ``constraints`` (uv's
    cache only), online with them, online without them (the manager's versions may clash with
    what the repository needs).

    ``run(arguments)`` runs uv with ``arguments`` (``args`` plus the attempt's options) and
    returns ``(exit status, stderr)``. Stops early when the index is unreachable or does not know a
    name (more attempts cannot help). Returns ``(mode of the attempt that succeeded, or None;
    [(mode, stderr)] of the failed attempts])``; modes are ``"offline"`` / ``"online"``, as
    :func:`dependency_install_error` takes them.
    """
    constrained = [*args, "-c", str(constraints)]
    attempts = [("offline", [*constrained, "--offline"]), ("online", constrained)]
    attempts.append(("online", list(args)))
    errors: list[tuple[str, str]] = []
    for mode, arguments in attempts:
        if errors and errors[-1][0] == "online" and NETWORK_ERROR.search(errors[-1][1]):
            break  # the index is unreachable (offline, uv says "failed to download" anyway)
        if len(errors) == 2 and MISSING_PACKAGE.search(errors[-1][1]):
            break
        returncode, stderr = run(arguments)
        if returncode == 0:
            return mode, errors
        errors.append((mode, stderr))
    return None, errors


FOREIGN_ENVIRONMENT = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")
"""Variables of the caller's own Python environment that must not steer uv."""


def run_uv(
    command: Sequence[str],
    arguments: Sequence[str],
    *,
    timeout_s: float,
    timeout_error: Callable[[], Exception],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run uv (``command``: :func:`uv_command` or ``[uv_binary()]``) with ``arguments`` and
    return its result (text stdout and stderr captured; the exit status is not checked).

    uv gets this process's environment without :data:`FOREIGN_ENVIRONMENT`, with plain
    output (``NO_COLOR``, ``UV_NO_PROGRESS``) and ``env`` on top. ``timeout_s`` is in seconds;
    after it the process is killed and ``timeout_error()`` is raised. It runs through
    :func:`~image_builder.build_processes.run_bounded`: in its own process group, stopped when
    the build is cancelled (:class:`~image_builder.errors.BuildCancelled`).
    """
    environment = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENVIRONMENT}
    environment.update({"NO_COLOR": "1", "UV_NO_PROGRESS": "1", **(env or {})})
    return run_bounded(
        [*command, *arguments],
        timeout_s=timeout_s,
        timeout_error=timeout_error,
        env=environment,
        cwd=cwd,
    )


def uv_command() -> list[str]:
    """``[uv]`` from PATH, else ``[python, -m, uv]``; :class:`EnvironmentBuildError` if neither."""
    found = shutil.which("uv")
    if found:
        return [found]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    raise EnvironmentBuildError("uv is not installed; install it with `pip install uv`.")


def uv_binary() -> Path:
    """The uv executable itself (an ELF file, not a shim script), to mount into an image build.

    Prefers the ``uv`` Python package of the manager's environment (``uv.find_uv_bin()``), then
    ``uv`` on PATH if it is a binary. Raises :class:`EnvironmentBuildError` if neither exists.
    """
    candidates: list[Path] = []
    if importlib.util.find_spec("uv") is not None:
        import uv

        with suppress(FileNotFoundError):
            candidates.append(Path(uv.find_uv_bin()))
    found = shutil.which("uv")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        try:
            with candidate.resolve().open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    return candidate.resolve()
        except OSError:
            continue
    raise EnvironmentBuildError(
        "No uv executable found to install packages with; install it with `pip install uv`."
    )


def default_source_roots() -> list[Path]:
    """The directories holding the FLOps packages: the checkout and, if apart, ``utils_pkg``."""
    import flops_utils
    import image_builder

    flops_root = Path(image_builder.__file__).resolve().parent.parent
    utils_root = Path(flops_utils.__file__).resolve().parent.parent
    return [flops_root] if utils_root == flops_root else [flops_root, utils_root]


def base_interpreter() -> str:
    """The manager's base interpreter (outside its virtualenv), for ``uv venv --python``."""
    base: str = getattr(sys, "_base_executable", "") or sys.executable
    return base


@contextmanager
def file_lock(
    path: Path, timeout_s: float, error: type[BuilderError] = EnvironmentBuildError
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Raises ``error`` (default :class:`EnvironmentBuildError`) after ``timeout_s`` seconds of
    waiting for another holder.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise error(
                        f"Another build of the same environment held {path.name} for over "
                        f"{timeout_s:.0f} s; retry, or remove the stale lock file."
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


USER_ENV_IMPORT_CHECK = "import numpy, pyarrow, pyarrow.flight, datasets"
"""What must import in a repository's environment for the model worker and ``load_dataset()``
(``flops_utils`` itself needs only the standard library and numpy)."""


def user_env_support_lines(
    requirements: Sequence[str], support: Sequence[str] = USER_ENV_REQUIREMENTS
) -> list[str]:
    """What FLOps adds to a repository's environment with ``requirements``: ``support``
    (default :data:`USER_ENV_REQUIREMENTS`) and, when no line requires ``mlflow`` or
    ``mlflow-skinny``, :data:`USER_ENV_MLFLOW` (what ``VenvBuilder.support_lines`` adds)."""
    names = {requirement_name(line) for line in requirements}
    mlflow = [] if names & MLFLOW_DISTRIBUTIONS else [USER_ENV_MLFLOW]
    return [*support, *mlflow]
