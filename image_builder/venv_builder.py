"""The ``venv`` builder: one cached virtualenv per (repository commit, dependencies, runtime).

:meth:`VenvBuilder.build` fetches and validates the ML repository (:mod:`image_builder.repo`),
reads its requirements (:mod:`image_builder.dependencies`) and returns a virtualenv that holds

- the repository's requirements (mlflow requirements dropped, FLOps pins it);
- the packages the FLOps learner and aggregator need (:data:`RUNTIME_PACKAGES`) pinned to the
  versions installed in the manager's own environment (read with ``importlib.metadata``), so
  the manager, learners and aggregators run identical versions; every other distribution of
  the manager's environment is passed as a constraint, so shared transitive dependencies
  (protobuf, grpcio, ...) match too unless the repository asks for other versions;
- the FLOps source (``learner``, ``aggregator``, ``flops_utils``, ...) made importable by a
  ``.pth`` file pointing at the FLOps checkout and ``utils_pkg`` (code changes there need no
  rebuild), then at the environment's copy of the repository (so ``import model_manager`` works).

Layout of ``cache_dir``::

    envs/<key>/venv/            the virtualenv (``uv venv --relocatable``)
    envs/<key>/repo/            the repository at ``commit`` (no ``.git``)
    envs/<key>/flops-env.json   what was built, written last (its presence marks a complete env)
    envs/.tmp-<key>-*/          an environment being built, renamed to ``envs/<key>`` when done
    locks/<key>.lock            ``flock`` held while ``<key>`` is built

``key`` hashes the commit, the dependency hash, the runtime versions (the manager's whole
environment), the Python interpreter, the FLOps source location and :data:`FORMAT_VERSION`. Two
projects building the same key at once build it once: the second waits on the lock, then reuses
the result. Installs go through uv's cache (hard links on the same file system); the builder
tries ``uv pip install --offline`` first and goes online only if that fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from flops_utils.logging import logger
from image_builder.dependencies import (
    dependency_hash,
    read_requirements,
    requirement_name,
    resolve_local_paths,
)
from image_builder.errors import DependencyInstallError, EnvironmentBuildError
from image_builder.repo import (
    DEFAULT_GIT_TIMEOUT_S,
    FetchedRepo,
    copy_repo_files,
    fetch_repo,
    validate_repo,
)

FORMAT_VERSION = 1
"""Bumped when the environment layout changes, so old cache entries are not reused."""

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

ENV_MARKER = "flops-env.json"
"""File written last into an environment; an ``envs/<key>`` directory without it is unused."""

_EXCLUDED_FROM_CONSTRAINTS = frozenset({"flops", "flops-utils"})
_NETWORK_ERROR = re.compile(
    r"failed to fetch|error sending request|dns error|could not connect|connection refused|"
    r"network is unreachable|timed out|failed to download",
    re.IGNORECASE,
)
_MISSING_PACKAGE = re.compile(r"not found in the package registry", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BOX_CHARS = re.compile("[\u00d7\u2500-\u257f\u25b6]+")
"""uv's diagnostic drawing: the cross mark and box-drawing characters."""
_NOISE_PREFIXES = ("using python", "resolved ", "prepared ", "installed ", "audited ", "warning:")


@dataclass(frozen=True)
class BuiltEnvironment:
    """A ready environment for one project.

    ``python``: the virtualenv's interpreter (``envs/<key>/venv/bin/python``); run
    ``python -m learner`` / ``python -m aggregator`` with it. ``repo_dir``: the environment's copy
    of the repository (use as ``FLOPS_ML_REPO_DIR``). ``commit``: git SHA (40 hex) or content hash
    (64 hex) of a plain directory. ``key``: the cache key (32 hex). ``cache_hit``: ``True`` if
    the environment existed already. ``seconds``: wall time of :meth:`VenvBuilder.build`.
    """

    python: Path
    repo_dir: Path
    commit: str
    key: str
    cache_hit: bool
    seconds: float

    @property
    def env_dir(self) -> Path:
        """The cache entry ``envs/<key>`` holding ``venv/``, ``repo/`` and the marker file."""
        return self.repo_dir.parent


class VenvBuilder:
    """Builds and caches project virtualenvs under ``cache_dir`` (created if missing).

    ``runtime_packages``: distributions pinned to the manager's versions (default
    :data:`RUNTIME_PACKAGES`). ``source_roots``: directories the ``.pth`` file puts on
    ``sys.path`` (default: the FLOps checkout holding ``image_builder`` and the directory holding
    ``flops_utils``). ``base_python``: interpreter for ``uv venv`` (default: the manager's own
    base interpreter). Timeouts are seconds: ``install_timeout_s`` per uv call (default 900),
    ``lock_timeout_s`` to wait for a concurrent build of the same key (default 1800),
    ``git_timeout_s`` per git command (default 300).
    """

    produces_images = False
    """This backend makes local virtualenvs, not OCI images (orchestrator compatibility check)."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        runtime_packages: Sequence[str] = RUNTIME_PACKAGES,
        source_roots: Sequence[Path] | None = None,
        base_python: Path | None = None,
        install_timeout_s: float = 900.0,
        lock_timeout_s: float = 1800.0,
        git_timeout_s: float = DEFAULT_GIT_TIMEOUT_S,
    ) -> None:
        self.cache_dir = Path(cache_dir).resolve()
        self.runtime_packages = tuple(runtime_packages)
        self.source_roots = tuple(
            Path(root).resolve() for root in (source_roots or _default_source_roots())
        )
        self.base_python = Path(base_python or _base_interpreter())
        self.install_timeout_s = install_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.git_timeout_s = git_timeout_s

    @cached_property
    def installed_versions(self) -> dict[str, str]:
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

    @cached_property
    def runtime_pins(self) -> list[str]:
        """``["flwr==1.41.0", ...]``: :attr:`runtime_packages` at the manager's versions.

        A runtime package missing from the manager's environment is listed unpinned (logged).
        """
        pins = []
        for name in self.runtime_packages:
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                logger.warning("%s is not installed in the manager; installing it unpinned", name)
                pins.append(name)
        return pins

    @cached_property
    def python_tag(self) -> str:
        """The interpreter identity in the key: implementation, version, machine, path."""
        impl = sys.implementation.name
        return f"{impl}-{platform.python_version()}-{platform.machine()}-{self.base_python}"

    def environment_key(self, commit: str, dependencies_hash: str) -> str:
        """Return the 32-hex cache key of (commit, dependency hash, runtime, Python, source)."""
        material = {
            "format": FORMAT_VERSION,
            "commit": commit,
            "dependencies": dependencies_hash,
            "runtime_pins": self.runtime_pins,
            "runtime_env": sorted(f"{n}=={v}" for n, v in self.installed_versions.items()),
            "python": self.python_tag,
            "source_roots": [str(root) for root in self.source_roots],
        }
        encoded = json.dumps(material, sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:32]

    def build(self, ml_repo_url: str, ref: str | None, workdir: Path) -> BuiltEnvironment:
        """Return the environment for ``ml_repo_url`` at ``ref``, building it if not cached.

        ``ref``: branch, tag or commit; ``None`` for the default branch. ``workdir``: scratch
        directory for the clone (created if missing; the builder removes what it put there).
        Raises :class:`~image_builder.errors.RepoFetchError`, ``RepoRefError``,
        ``RepoLayoutError``, ``DependencyFileError`` (repository problems),
        :class:`~image_builder.errors.DependencyInstallError` (a requirement cannot be
        installed; the resolver's message in a sentence or two) and
        :class:`~image_builder.errors.EnvironmentBuildError` (uv missing, a timeout).
        """
        started = time.monotonic()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="ml-repo-", dir=workdir))
        try:
            fetched = fetch_repo(
                ml_repo_url,
                ref,
                scratch / "repo",
                timeout_s=self.git_timeout_s,
                exclude=[workdir.resolve(), self.cache_dir],
            )
            layout = validate_repo(fetched.path, fetched.source)
            requirements = read_requirements(layout.dependency_file)
            key = self.environment_key(fetched.commit, dependency_hash(requirements))
            env_dir = self.cache_dir / "envs" / key
            cache_hit = _is_complete(env_dir)
            if not cache_hit:
                cache_hit = self._build_locked(key, fetched, ref, layout.dependency_file.name,
                                               requirements)  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.monotonic() - started
        logger.info(
            "environment %s for %s@%s %s in %.2f s",
            key, fetched.source, fetched.commit[:12], "reused" if cache_hit else "built", seconds,
        )  # fmt: skip
        return BuiltEnvironment(
            python=env_dir / "venv" / "bin" / "python",
            repo_dir=env_dir / "repo",
            commit=fetched.commit,
            key=key,
            cache_hit=cache_hit,
            seconds=seconds,
        )

    def _build_locked(
        self,
        key: str,
        fetched: FetchedRepo,
        ref: str | None,
        dependency_file: str,
        requirements: list[str],
    ) -> bool:
        """Build ``envs/<key>`` under the key's lock; ``True`` if another build made it first."""
        envs = self.cache_dir / "envs"
        locks = self.cache_dir / "locks"
        envs.mkdir(parents=True, exist_ok=True)
        locks.mkdir(parents=True, exist_ok=True)
        final = envs / key
        with _file_lock(locks / f"{key}.lock", self.lock_timeout_s):
            if _is_complete(final):
                return True
            for stale in envs.glob(f".tmp-{key}-*"):  # left by a build that died
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # incomplete: no marker
                shutil.rmtree(final, ignore_errors=True)
            staging = envs / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                started = time.monotonic()
                copy_repo_files(fetched.path, staging / "repo")
                mode = self._make_venv(staging, requirements)
                metadata = {
                    "key": key,
                    "commit": fetched.commit,
                    "source": fetched.source,
                    "ref": ref,
                    "dependency_file": dependency_file,
                    "requirements": requirements,
                    "runtime_pins": self.runtime_pins,
                    "python": self.python_tag,
                    "install_mode": mode,
                    "build_seconds": round(time.monotonic() - started, 3),
                    "created_at": time.time(),
                }
                (staging / ENV_MARKER).write_text(json.dumps(metadata, indent=2) + "\n")
                try:
                    os.rename(staging, final)
                except OSError:
                    if not _is_complete(final):
                        raise
                    return True  # built concurrently by a process that ignored the lock
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        return False

    def _make_venv(self, staging: Path, requirements: list[str]) -> str:
        """Create ``staging/venv`` and install into it; return ``"offline"`` or ``"online"``."""
        venv = staging / "venv"
        self._uv(
            ["venv", "--relocatable", "--no-project", "--python", str(self.base_python),
             str(venv)],
            cwd=staging,
        )  # fmt: skip
        site_packages = next((venv / "lib").glob("python*/site-packages"), None)
        if site_packages is None:
            raise EnvironmentBuildError(f"uv venv made no site-packages under {venv}; retry.")
        # .pth lines are joined with site-packages, so the relative repo entry survives renames.
        pth_lines = [str(root) for root in self.source_roots]
        pth_lines.append(os.path.relpath(staging / "repo", site_packages))
        (site_packages / "_flops_source.pth").write_text("\n".join(pth_lines) + "\n")

        user_lines, constraints = self._plan(requirements)
        install_lines = resolve_local_paths(user_lines, staging / "repo") + self.runtime_pins
        (staging / "requirements.txt").write_text("\n".join(install_lines) + "\n")
        (staging / "constraints.txt").write_text("\n".join(constraints) + "\n")
        install = ["pip", "install", "--python", str(venv / "bin" / "python"),
                   "-r", str(staging / "requirements.txt")]  # fmt: skip
        constrained = [*install, "-c", str(staging / "constraints.txt")]
        attempts = [
            ("offline", [*constrained, "--offline"]),
            ("online", constrained),
            ("online", install),  # the manager's versions may clash with the repo's needs
        ]
        errors: list[tuple[str, str]] = []
        for mode, args in attempts:
            if errors and mode == "online" and _NETWORK_ERROR.search(errors[-1][1]):
                break  # no index reachable: further online attempts cannot help
            if len(errors) == 2 and _MISSING_PACKAGE.search(errors[-1][1]):
                break  # a name the index does not know: constraints are not the cause
            result = self._uv(args, cwd=staging, check=False)
            if result.returncode == 0:
                logger.info("installed requirements %s", mode)
                return mode
            errors.append((mode, result.stderr))
            logger.debug("uv pip install (%s) failed: %s", mode, result.stderr)
        mode, stderr = _pick_error(errors)
        offline_only = mode == "offline" and len(errors) > 1
        raise DependencyInstallError(
            f"Cannot install the ML repository's dependencies: {condense_uv_error(stderr)}"
            + (
                " (the package index was unreachable, so only uv's cache was used)"
                if offline_only
                else ""
            )
            + ". Fix the requirement in the repository's dependency file.",
            details=[condense_uv_error(stderr) for _, stderr in errors],
        )

    def _plan(self, requirements: list[str]) -> tuple[list[str], list[str]]:
        """Split into (repository lines to install, constraint lines).

        A repository requirement on a runtime package that excludes the manager's version is
        dropped (logged): both sides must run identical versions. Constraints pin every
        manager distribution the repository does not ask for at another version.
        """
        runtime = {canonicalize_name(name) for name in self.runtime_packages}
        installed = self.installed_versions
        user_lines: list[str] = []
        unconstrained: set[str] = set()
        for line in requirements:
            name = requirement_name(line)
            if name is None:
                user_lines.append(line)
                continue
            satisfied = _satisfied_by(line, installed.get(name))
            if name in runtime and not satisfied:
                logger.warning(
                    "ignoring the repository's %r: FLOps runs %s==%s",
                    line,
                    name,
                    installed.get(name),
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

    def _uv(
        self, args: list[str], *, cwd: Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [*_uv_command(), *args]
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
        env.update({"NO_COLOR": "1", "UV_NO_PROGRESS": "1"})
        try:
            result = subprocess.run(
                command,
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=self.install_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise EnvironmentBuildError(
                f"uv {args[0]} did not finish within {self.install_timeout_s:.0f} s; check the "
                "package index connection or raise install_timeout_s."
            ) from None
        if check and result.returncode != 0:
            raise EnvironmentBuildError(
                f"uv {args[0]} failed: {condense_uv_error(result.stderr)}; check the uv setup."
            )
        return result


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


def _pick_error(errors: list[tuple[str, str]]) -> tuple[str, str]:
    """The most telling failure ``(mode, stderr)``: the last one not caused by a network error."""
    for mode, stderr in reversed(errors):
        if not _NETWORK_ERROR.search(stderr):
            return mode, stderr
    return errors[0] if errors else ("offline", "")


def _satisfied_by(line: str, version: str | None) -> bool:
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


def _is_complete(env_dir: Path) -> bool:
    return (env_dir / ENV_MARKER).is_file() and (env_dir / "venv" / "bin" / "python").exists()


@contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; ``EnvironmentBuildError`` after ``timeout_s``."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EnvironmentBuildError(
                        f"Another build of the same environment held {path.name} for over "
                        f"{timeout_s:.0f} s; retry, or remove the stale lock file."
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _uv_command() -> list[str]:
    """``[uv]`` from PATH, else ``[python, -m, uv]``; :class:`EnvironmentBuildError` if neither."""
    found = shutil.which("uv")
    if found:
        return [found]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    raise EnvironmentBuildError("uv is not installed; install it with `pip install uv`.")


def _base_interpreter() -> str:
    base: str = getattr(sys, "_base_executable", "") or sys.executable
    return base


def _default_source_roots() -> list[Path]:
    import flops_utils
    import image_builder

    flops_root = Path(image_builder.__file__).resolve().parent.parent
    utils_root = Path(flops_utils.__file__).resolve().parent.parent
    return [flops_root] if utils_root == flops_root else [flops_root, utils_root]
