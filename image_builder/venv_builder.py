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

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from flops_utils.logging import logger
from image_builder.dependencies import resolve_local_paths
from image_builder.errors import EnvironmentBuildError
from image_builder.python_env import (
    RUNTIME_PACKAGES,
    base_interpreter,
    condense_uv_error,
    default_source_roots,
    dependency_install_error,
    file_lock,
    manager_versions,
    plan_install,
    run_uv_with_fallbacks,
    runtime_pins,
    uv_command,
)
from image_builder.repo import DEFAULT_GIT_TIMEOUT_S, FetchedRepo, checked_out_repo, copy_repo_files

FORMAT_VERSION = 1
"""Bumped when the environment layout changes, so old cache entries are not reused."""

ENV_MARKER = "flops-env.json"
"""File written last into an environment; an ``envs/<key>`` directory without it is unused."""


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
            Path(root).resolve() for root in (source_roots or default_source_roots())
        )
        self.base_python = Path(base_python or base_interpreter())
        self.install_timeout_s = install_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.git_timeout_s = git_timeout_s

    @cached_property
    def installed_versions(self) -> dict[str, str]:
        """``{normalized name: version}`` of the manager environment's index-installed dists
        (:func:`~image_builder.python_env.manager_versions`)."""
        return manager_versions()

    @cached_property
    def runtime_pins(self) -> list[str]:
        """``["flwr==1.41.0", ...]``: :attr:`runtime_packages` at the manager's versions.

        A runtime package missing from the manager's environment is listed unpinned (logged).
        """
        return runtime_pins(self.runtime_packages)

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
        with checked_out_repo(
            ml_repo_url,
            ref,
            Path(workdir),
            timeout_s=self.git_timeout_s,
            exclude=[self.cache_dir],
        ) as checked_out:
            fetched = checked_out.fetched
            key = self.environment_key(fetched.commit, checked_out.dependencies_hash)
            env_dir = self.cache_dir / "envs" / key
            cache_hit = _is_complete(env_dir)
            if not cache_hit:
                cache_hit = self._build_locked(
                    key, fetched, ref, checked_out.layout.dependency_file.name,
                    checked_out.requirements,
                )  # fmt: skip
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
        with file_lock(locks / f"{key}.lock", self.lock_timeout_s):
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

        def run(args: list[str]) -> tuple[int, str]:
            result = self._uv(args, cwd=staging, check=False)
            if result.returncode != 0:
                logger.debug("uv pip install failed: %s", result.stderr)
            return result.returncode, result.stderr

        mode, errors = run_uv_with_fallbacks(run, install, staging / "constraints.txt")
        if mode is None:
            raise dependency_install_error(errors)
        logger.info("installed requirements %s", mode)
        return mode

    def _plan(self, requirements: list[str]) -> tuple[list[str], list[str]]:
        """Split into (repository lines to install, constraint lines); see
        :func:`~image_builder.python_env.plan_install`."""
        return plan_install(requirements, self.runtime_packages, self.installed_versions)

    def _uv(
        self, args: list[str], *, cwd: Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [*uv_command(), *args]
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


def _is_complete(env_dir: Path) -> bool:
    return (env_dir / ENV_MARKER).is_file() and (env_dir / "venv" / "bin" / "python").exists()
