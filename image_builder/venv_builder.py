"""The ``venv`` builder: one cached virtualenv per (repository commit, dependencies).

:meth:`VenvBuilder.build` fetches and validates the ML repository (:mod:`image_builder.repo`),
reads its requirements (:mod:`image_builder.dependencies`) and returns the repository's own
environment: a virtualenv that holds

- the repository's requirements exactly as pinned (conda ``dependencies`` and ``pip:``,
  ``requirements.txt`` or ``pyproject.toml``; its MLflow pin included), for the manager's
  Python (a note says so when the file asks for another one);
- what ``flops_utils`` needs there, as wide ranges the resolver fits to those pins
  (:data:`~image_builder.python_env.USER_ENV_REQUIREMENTS`, and ``mlflow-skinny`` when the
  repository requires no MLflow): the model worker runs the repository's ``ModelManager`` in
  this environment, while the learner and aggregator themselves (Flower, MQTT, the MLflow
  tracking client) run in FLOps' own pinned environment, the manager's
  (:mod:`flops_utils.model_worker_client`);
- ``flops_utils`` made importable by a ``.pth`` file pointing at its source (code changes there
  need no rebuild), then at the environment's copy of the repository (``import model_manager``).

The manager's installed versions are passed as constraints on a first attempt (offline, then
online), so that an environment whose pins allow it shares the manager's versions and uv's
cache; the last attempt drops them and lets the repository's pins decide alone.

Layout of ``cache_dir``::

    envs/<key>/venv/            the virtualenv (``uv venv --relocatable``)
    envs/<key>/repo/            the repository at ``commit`` (no ``.git``)
    envs/<key>/flops-env.json   what was built, written last (its presence marks a complete env)
    envs/.tmp-<key>-*/          an environment being built, renamed to ``envs/<key>`` when done
    locks/<key>.lock            ``flock`` held while ``<key>`` is built

``key`` hashes the commit, the dependency hash, FLOps' additions, the manager's environment
(the constraints), the Python interpreter, the ``flops_utils`` source location and
:data:`FORMAT_VERSION`. Two projects building the same key at once build it once: the second
waits on the lock, then reuses the result. Installs go through uv's cache (hard links on the
same file system). Local wheel directories named by ``UV_FIND_LINKS`` or ``PIP_FIND_LINKS``
(space-separated) are searched too, e.g. a CPU build of torch.
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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from flops_utils.logging import logger
from image_builder.build_processes import run_bounded
from image_builder.dependencies import (
    python_mismatch_note,
    requested_python,
    resolve_local_paths,
)
from image_builder.errors import EnvironmentBuildError
from image_builder.python_env import (
    USER_ENV_IMPORT_CHECK,
    USER_ENV_REQUIREMENTS,
    attributed_install_error,
    base_interpreter,
    condense_uv_error,
    default_source_roots,
    file_lock,
    find_links,
    installed_versions,
    manager_versions,
    plan_install,
    redact_paths,
    run_uv,
    run_uv_with_fallbacks,
    undeclared_conflicts,
    user_env_support_lines,
    uv_command,
)
from image_builder.repo import (
    DEFAULT_GIT_TIMEOUT_S,
    FetchedRepo,
    FetchLimits,
    checked_out_repo,
    copy_repo_files,
)

FORMAT_VERSION = 2
"""Bumped when the environment layout changes, so old cache entries are not reused."""

ENV_MARKER = "flops-env.json"
"""File written last into an environment; an ``envs/<key>`` directory without it is unused."""


@dataclass(frozen=True)
class BuiltEnvironment:
    """A ready environment for one project.

    ``python``: the virtualenv's interpreter (``envs/<key>/venv/bin/python``), the
    repository's environment: pass it as ``FLOPS_USER_PYTHON`` to a learner or aggregator run
    with FLOps' own interpreter. ``repo_dir``: the environment's copy of the repository (use as
    ``FLOPS_ML_REPO_DIR``). ``commit``: git SHA (40 hex) or content hash (64 hex) of a plain
    directory. ``key``: the cache key (32 hex). ``cache_hit``: ``True`` if the environment
    existed already. ``seconds``: wall time of :meth:`VenvBuilder.build`. ``notes``: sentences
    for the user about how the dependency file was read (e.g. another Python version asked
    for). ``versions``: ``{distribution: version}`` of the key packages installed (numpy,
    datasets, pyarrow, mlflow, the frameworks).
    """

    python: Path
    repo_dir: Path
    commit: str
    key: str
    cache_hit: bool
    seconds: float
    notes: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def env_dir(self) -> Path:
        """The cache entry ``envs/<key>`` holding ``venv/``, ``repo/`` and the marker file."""
        return self.repo_dir.parent


class VenvBuilder:
    """Builds and caches the repositories' environments under ``cache_dir`` (created if missing).

    ``support_requirements``: what FLOps adds to every environment (default
    :data:`~image_builder.python_env.USER_ENV_REQUIREMENTS`; ``mlflow-skinny`` is added too when
    the repository requires no MLflow). ``source_roots``: directories the ``.pth`` file puts on
    ``sys.path`` (default: the directory holding ``flops_utils``). ``base_python``: interpreter
    for ``uv venv`` (default: the manager's own base interpreter). Timeouts are seconds:
    ``install_timeout_s`` per uv call (default 900), ``lock_timeout_s`` to wait for a
    concurrent build of the same key (default 1800), ``git_timeout_s`` for the whole fetch
    (default 300) unless ``fetch_limits`` (:class:`~image_builder.repo.FetchLimits`) bound it.
    ``allow_local_packages``: install local package requirements (``./pkg``, ``-e .``) that
    stay inside the repository; default ``False`` refuses them, since building one runs its
    code on this machine (:mod:`image_builder.confinement`). Every program a build runs is
    stopped when its build scope is cancelled (:mod:`image_builder.build_processes`).
    """

    produces_images = False
    """This backend makes local virtualenvs, not OCI images (orchestrator compatibility check)."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        support_requirements: Sequence[str] = USER_ENV_REQUIREMENTS,
        source_roots: Sequence[Path] | None = None,
        base_python: Path | None = None,
        install_timeout_s: float = 900.0,
        lock_timeout_s: float = 1800.0,
        git_timeout_s: float = DEFAULT_GIT_TIMEOUT_S,
        fetch_limits: FetchLimits | None = None,
        allow_local_packages: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir).resolve()
        self.fetch_limits = fetch_limits or FetchLimits(timeout_s=git_timeout_s)
        self.allow_local_packages = allow_local_packages
        self.support_requirements = tuple(support_requirements)
        self.source_roots = tuple(
            Path(root).resolve() for root in (source_roots or default_source_roots()[-1:])
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
    def python_tag(self) -> str:
        """The interpreter identity in the key: implementation, version, machine, path."""
        impl = sys.implementation.name
        return f"{impl}-{platform.python_version()}-{platform.machine()}-{self.base_python}"

    def environment_key(self, commit: str, dependencies_hash: str) -> str:
        """Return the 32-hex cache key of (commit, dependency hash, FLOps' additions, the
        manager's versions, local wheel directories, Python, source)."""
        material = {
            "format": FORMAT_VERSION,
            "commit": commit,
            "dependencies": dependencies_hash,
            "support_requirements": self.support_requirements,
            "find_links": find_links(),
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
            exclude=[self.cache_dir],
            limits=self.fetch_limits,
            allow_local_packages=self.allow_local_packages,
        ) as checked_out:
            fetched = checked_out.fetched
            key = self.environment_key(fetched.commit, checked_out.dependencies_hash)
            env_dir = self.cache_dir / "envs" / key
            cache_hit = _is_complete(env_dir)
            if not cache_hit:
                note = python_mismatch_note(
                    requested_python(checked_out.layout.dependency_file),
                    platform.python_version(),
                )
                cache_hit = self._build_locked(
                    key, fetched, ref, checked_out.layout.dependency_file.name,
                    checked_out.requirements, [note] if note else [],
                )  # fmt: skip
        metadata = json.loads((env_dir / ENV_MARKER).read_text())
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
            notes=tuple(metadata.get("notes", ())),
            versions=dict(metadata.get("versions", {})),
        )

    def _build_locked(
        self,
        key: str,
        fetched: FetchedRepo,
        ref: str | None,
        dependency_file: str,
        requirements: list[str],
        notes: list[str],
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
                mode, corrections = self._make_venv(staging, requirements, dependency_file)
                metadata = {
                    "key": key,
                    "commit": fetched.commit,
                    "source": fetched.source,
                    "ref": ref,
                    "dependency_file": dependency_file,
                    "requirements": requirements,
                    "support_requirements": self.support_lines(requirements),
                    "corrections": corrections,
                    "python": self.python_tag,
                    "notes": notes,
                    "versions": installed_versions(staging / "venv"),
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

    def support_lines(self, requirements: Sequence[str]) -> list[str]:
        """What FLOps adds to an environment with ``requirements``: :attr:`support_requirements`
        and, when no line requires ``mlflow`` or ``mlflow-skinny``,
        :data:`~image_builder.python_env.USER_ENV_MLFLOW`."""
        return user_env_support_lines(requirements, self.support_requirements)

    def _make_venv(
        self, staging: Path, requirements: list[str], dependency_file: str
    ) -> tuple[str, list[str]]:
        """Create ``staging/venv`` and install into it; return (``"offline"`` or ``"online"``,
        the requirements added for :func:`~image_builder.python_env.undeclared_conflicts`)."""
        venv = staging / "venv"
        self._uv(
            ["venv", "--relocatable", "--no-project", "--python", str(self.base_python),
             str(venv)],
            cwd=staging,
        )  # fmt: skip
        site_packages = next((venv / "lib").glob("python*/site-packages"), None)
        if site_packages is None:
            raise EnvironmentBuildError("uv venv made no site-packages; retry.")
        # .pth lines are joined with site-packages, so the relative repo entry survives renames.
        pth_lines = [str(root) for root in self.source_roots]
        pth_lines.append(os.path.relpath(staging / "repo", site_packages))
        (site_packages / "_flops_source.pth").write_text("\n".join(pth_lines) + "\n")

        support = self.support_lines(requirements)
        _, constraints = plan_install(requirements, (), self.installed_versions)
        install_lines = resolve_local_paths(requirements, staging / "repo") + support
        (staging / "requirements.txt").write_text("\n".join(install_lines) + "\n")
        (staging / "constraints.txt").write_text("\n".join(constraints) + "\n")
        install = ["pip", "install", "--python", str(venv / "bin" / "python"),
                   "-r", str(staging / "requirements.txt"),
                   *[arg for link in find_links() for arg in ("--find-links", link)]]  # fmt: skip
        hidden = self._hidden(staging)

        def run(args: list[str]) -> tuple[int, str]:
            result = self._uv(args, cwd=staging, check=False)
            if result.returncode != 0:
                logger.debug("uv pip install failed: %s", result.stderr)
            return result.returncode, redact_paths(result.stderr, hidden)

        mode, errors = run_uv_with_fallbacks(run, install, staging / "constraints.txt")
        if mode is None:
            raise attributed_install_error(errors, support, dependency_file)
        corrections = undeclared_conflicts(installed_versions(venv))
        if corrections:  # install again with the missing bounds as requirements
            logger.info("adding %s: %s", ", ".join(corrections), "; ".join(corrections.values()))
            lines = [*install_lines, *corrections]
            (staging / "requirements.txt").write_text("\n".join(lines) + "\n")
            mode, errors = run_uv_with_fallbacks(run, install, staging / "constraints.txt")
            if mode is None:
                raise attributed_install_error(errors, [*support, *corrections], dependency_file)
        self._check_imports(venv)
        logger.info("installed requirements %s", mode)
        return mode, list(corrections)

    def _check_imports(self, venv: Path) -> None:
        """Import what the model worker and ``load_dataset()`` need with the environment's
        interpreter; :class:`EnvironmentBuildError` with the import error otherwise."""
        code = f"{USER_ENV_IMPORT_CHECK}, mlflow, flops_utils.model_worker"
        result = run_bounded(
            [str(venv / "bin" / "python"), "-c", code],
            timeout_s=self.install_timeout_s,
            timeout_error=lambda: EnvironmentBuildError(
                "Importing numpy, pyarrow, datasets and mlflow in the repository's environment "
                f"did not finish within {self.install_timeout_s:.0f} s; the machine may be "
                "overloaded."
            ),
            cwd="/",
        )
        if result.returncode != 0:
            lines = [line for line in str(result.stderr).strip().splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"exit status {result.returncode}"
            last = redact_paths(last, self._hidden(venv.parent))
            raise EnvironmentBuildError(
                f"The repository's environment installed, but FLOps cannot use it: {last}. "
                "Pin versions of numpy, pyarrow, datasets and mlflow that work together in the "
                "repository's dependency file."
            )

    def _uv(
        self, args: list[str], *, cwd: Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = run_uv(
            uv_command(),
            args,
            timeout_s=self.install_timeout_s,
            timeout_error=lambda: EnvironmentBuildError(
                f"uv {args[0]} did not finish within {self.install_timeout_s:.0f} s; check the "
                "package index connection or raise install_timeout_s."
            ),
            cwd=cwd,
        )
        if check and result.returncode != 0:
            stderr = redact_paths(str(result.stderr), self._hidden(cwd))
            raise EnvironmentBuildError(
                f"uv {args[0]} failed: {condense_uv_error(stderr)}; check the uv setup."
            )
        return result

    def _hidden(self, staging: Path) -> dict[str, str]:
        """Paths of this machine replaced in messages for users (:func:`redact_paths`)."""
        return {
            str(staging / "repo"): "<repository>",
            str(staging): "<build directory>",
            str(self.cache_dir): "<environment cache>",
        }


def _is_complete(env_dir: Path) -> bool:
    return (env_dir / ENV_MARKER).is_file() and (env_dir / "venv" / "bin" / "python").exists()
