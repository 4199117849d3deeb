"""Fetch a project's ML repository into a work directory and check the user contract.

``ml_repo_url`` (the SLA field) may be

- a remote git URL: ``https://``, ``http://``, ``ssh://``, ``git://`` or scp-like
  ``user@host:path``;
- a ``file://`` URL or a local path (relative paths are resolved against the current directory)
  to a git repository: a work tree whose root holds ``.git``, or a bare repository;
- a local directory that is not the root of a git repository (e.g. ``examples/mnist_sklearn``):
  it is copied, and its "commit" is :func:`content_hash` of the copied files.

Git repositories are fetched shallowly (``git fetch --depth 1 origin <ref or HEAD>``, which works
for branches, tags and full commit SHAs); a short SHA, or a server that refuses fetching a commit
by SHA, falls back to a full fetch. Only committed content is fetched: uncommitted changes in a
local git work tree are ignored. Submodules and Git LFS objects are not fetched.

Errors: :class:`RepoFetchError`, :class:`RepoRefError`, :class:`RepoLayoutError` (all
:class:`flops_utils.errors.FlopsError`); messages never carry credentials from the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flops_utils.logging import logger
from image_builder.build_processes import run_bounded
from image_builder.confinement import (
    check_contract_files,
    check_dependency_file,
    check_requirement_lines,
)
from image_builder.dependencies import DEPENDENCY_FILES, dependency_hash, read_requirements
from image_builder.errors import (
    EnvironmentBuildError,
    RepoFetchError,
    RepoFetchLimitError,
    RepoLayoutError,
    RepoRefError,
)
from image_builder.python_env import redact_paths

REQUIRED_FILES = ("model_manager.py", "data_manager.py")
"""Files the user contract (README, "Your ML repository") requires at the repository root,
besides one of
:data:`image_builder.dependencies.DEPENDENCY_FILES`."""

IGNORED_NAMES = frozenset(
    {".git", "__pycache__", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
"""Names skipped when a plain directory is copied or hashed (with ``*.pyc`` files)."""

MAX_COPY_BYTES = 1 << 30
"""A plain directory larger than this (1 GiB, skipped names excluded) is refused, not copied."""

MAX_COPY_FILES = 50_000
"""A plain directory with more files than this is refused, not copied."""

DEFAULT_GIT_TIMEOUT_S = 300.0
"""Seconds the whole fetch of a git repository (every git command) may take."""

DEFAULT_LOW_SPEED_BYTES_PER_S = 1000
"""A git HTTP transfer slower than this for :data:`DEFAULT_LOW_SPEED_TIME_S` is aborted
(git's ``http.lowSpeedLimit``, curl's ``CURLOPT_LOW_SPEED_LIMIT``)."""

DEFAULT_LOW_SPEED_TIME_S = 30
"""Seconds below :data:`DEFAULT_LOW_SPEED_BYTES_PER_S` before git aborts (``http.lowSpeedTime``)."""

DEFAULT_MAX_FETCH_BYTES = 2 << 30
"""A git checkout (``.git`` included) larger than this (2 GiB) is stopped and refused."""


@dataclass(frozen=True)
class FetchLimits:
    """Bounds of one repository fetch, so that a slow or huge repository (a tarpit git server)
    cannot hold a build worker.

    ``timeout_s``: seconds for the whole fetch (every git command together).
    ``low_speed_bytes_per_s`` / ``low_speed_time_s``: an HTTP(S) transfer slower than this
    rate for that many seconds is aborted by git (other transports: ``timeout_s`` only).
    ``max_bytes``: size of the checkout, ``.git`` included, checked every
    ``size_check_interval_s`` seconds while git runs.
    """

    timeout_s: float = DEFAULT_GIT_TIMEOUT_S
    low_speed_bytes_per_s: int = DEFAULT_LOW_SPEED_BYTES_PER_S
    low_speed_time_s: int = DEFAULT_LOW_SPEED_TIME_S
    max_bytes: int = DEFAULT_MAX_FETCH_BYTES
    size_check_interval_s: float = 1.0

    def git_options(self) -> list[str]:
        """git's ``-c`` options for these bounds."""
        return [
            "-c", f"http.lowSpeedLimit={max(1, self.low_speed_bytes_per_s)}",
            "-c", f"http.lowSpeedTime={max(1, self.low_speed_time_s)}",
            "-c", "protocol.ext.allow=never",
        ]  # fmt: skip


_REMOTE_SCHEMES = frozenset({"https", "http", "ssh", "git", "git+ssh", "ssh+git"})
_SCP_LIKE = re.compile(r"^(?:[\w.+-]+@)?[\w.-]+:(?!//)\S+$")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")
_HEX_REF = re.compile(r"^[0-9a-fA-F]{4,40}$")
_GIT_ENV = {
    # Fail instead of waiting for a password on a terminal that nobody watches.
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
    "LC_ALL": "C",
}
_LOW_SPEED_MARKERS = ("operation too slow", "curl 28", "low speed")
_GIT_NOISE_PREFIXES = (
    "hint:",
    "warning:",
    "cloning into",
    "remote: counting",
    "remote: enumerating",
)
_REF_MISSING_MARKERS = ("couldn't find remote ref", "unadvertised object", "not our ref")


@dataclass(frozen=True)
class FetchedRepo:
    """An ML repository fetched into ``path``.

    ``commit`` is the 40-hex git commit SHA checked out, or for a plain directory the 64-hex
    :func:`content_hash` of its files. ``source`` is ``ml_repo_url`` with credentials removed.
    ``is_git`` tells which of the two it is.
    """

    path: Path
    commit: str
    source: str
    is_git: bool


@dataclass(frozen=True)
class RepoLayout:
    """The contract files found at the root of a repository (absolute paths)."""

    model_manager: Path
    data_manager: Path
    dependency_file: Path


@dataclass(frozen=True)
class CheckedOutRepo:
    """A fetched, validated ML repository and what it asks to install: every builder's input.

    ``requirements``: pip lines read from the dependency file
    (:func:`~image_builder.dependencies.read_requirements`, mlflow pins kept);
    ``dependencies_hash``: their 64-hex :func:`~image_builder.dependencies.dependency_hash`.
    """

    fetched: FetchedRepo
    layout: RepoLayout
    requirements: list[str]
    dependencies_hash: str


@contextlib.contextmanager
def checked_out_repo(
    ml_repo_url: str,
    ref: str | None,
    workdir: Path,
    *,
    timeout_s: float = DEFAULT_GIT_TIMEOUT_S,
    exclude: Sequence[Path] = (),
    limits: FetchLimits | None = None,
    allow_local_packages: bool = False,
) -> Iterator[CheckedOutRepo]:
    """Fetch ``ml_repo_url`` at ``ref`` into a scratch directory under ``workdir``, validate it
    and read its requirements; the scratch directory is removed when the ``with`` block ends.

    ``workdir`` is created if missing and never copied from a plain directory, nor is anything
    in ``exclude``. ``limits`` bound the fetch (default: :class:`FetchLimits` with
    ``timeout_s``). The contract files, the dependency file and every file its lines include
    must stay inside the repository, and local package requirements are refused unless
    ``allow_local_packages`` (:mod:`image_builder.confinement`), all before an installer sees
    them. Raises what :func:`fetch_repo`, :func:`validate_repo`,
    :func:`~image_builder.dependencies.read_requirements` and the confinement checks
    (:class:`~image_builder.errors.UnsafeRepoInputError`) raise.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ml-repo-", dir=workdir))
    try:
        fetched = fetch_repo(
            ml_repo_url,
            ref,
            scratch / "repo",
            timeout_s=timeout_s,
            exclude=[workdir.resolve(), *exclude],
            limits=limits,
        )
        layout = validate_repo(fetched.path, fetched.source)
        requirements = read_checked_requirements(
            fetched.path, layout, allow_local_packages=allow_local_packages
        )
        yield CheckedOutRepo(fetched, layout, requirements, dependency_hash(requirements))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_checked_requirements(
    repo_dir: Path, layout: RepoLayout, *, allow_local_packages: bool = False
) -> list[str]:
    """The requirement lines of ``layout.dependency_file`` (mlflow pins kept), after checking
    that the contract files and the dependency file stay inside ``repo_dir``; the lines (and
    the files they include) are checked too. Raises
    :class:`~image_builder.errors.UnsafeRepoInputError` or ``DependencyFileError``."""
    check_contract_files(repo_dir, [layout.model_manager, layout.data_manager])
    check_dependency_file(repo_dir, layout.dependency_file)
    requirements = read_requirements(layout.dependency_file, keep_mlflow=True)
    check_requirement_lines(
        repo_dir, layout.dependency_file, requirements, allow_local_packages=allow_local_packages
    )
    return requirements


def redact_url(text: str) -> str:
    """Return ``text`` with the user-info (``user:token@``) of every URL replaced by ``***@``."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def fetch_repo(
    ml_repo_url: str,
    ref: str | None,
    dest: Path,
    *,
    timeout_s: float = DEFAULT_GIT_TIMEOUT_S,
    exclude: Sequence[Path] = (),
    limits: FetchLimits | None = None,
) -> FetchedRepo:
    """Fetch ``ml_repo_url`` at ``ref`` into ``dest`` (created; must not exist or be empty).

    ``ref``: branch, tag or commit SHA (full or abbreviated); ``None`` is the remote's HEAD.
    ``limits``: bounds of a git fetch (default ``FetchLimits(timeout_s=timeout_s)``; a fetch
    beyond them raises :class:`RepoFetchLimitError`). ``exclude``: directories never copied
    from a plain directory (``dest`` is always excluded, so a work dir inside the source is
    safe). Returns a :class:`FetchedRepo`. Raises :class:`RepoFetchError` if the URL is
    unsupported, the path does not exist, a plain directory exceeds :data:`MAX_COPY_BYTES` /
    :data:`MAX_COPY_FILES`, or git cannot fetch (the message carries git's error in one
    sentence); :class:`RepoRefError` if ``ref`` does not exist or is given for a directory that
    is not a git repository.
    """
    url = ml_repo_url.strip()
    source = redact_url(url)
    if not url or url.startswith("-"):
        raise RepoFetchError(
            f"ml_repo_url {source!r} is not a repository URL or path; give an https:// or "
            "file:// URL or a local path."
        )
    if ref is not None and (not ref.strip() or ref.startswith("-")):
        raise RepoRefError(f"ref {ref!r} is not a valid branch, tag or commit; fix the ref.")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")

    bounds = limits or FetchLimits(timeout_s=timeout_s)
    local = _local_path(url, source)
    if local is None:
        return _fetch_git(url, source, ref, dest, bounds)
    if _is_git_repo(local):
        return _fetch_git(local.as_uri(), source, ref, dest, bounds)
    if ref is not None:
        raise RepoRefError(
            f"ref {ref!r} was given but {source} is not a git repository; drop the ref or "
            "point ml_repo_url at a git repository."
        )
    excluded = [dest, *exclude]
    _check_copy_size(local, source, excluded)
    copy_repo_files(local, dest, exclude=excluded)
    return FetchedRepo(path=dest, commit=content_hash(dest), source=source, is_git=False)


def validate_repo(repo_dir: Path, source: str | None = None) -> RepoLayout:
    """Check that ``repo_dir`` holds the contract files at its root and return them.

    The dependency file is the first of :data:`~image_builder.dependencies.DEPENDENCY_FILES`
    present. ``source`` names the repository in the message (defaults to ``repo_dir``).
    Raises :class:`RepoLayoutError` naming every missing file; ``details`` lists them.
    """
    missing = [name for name in REQUIRED_FILES if not _present(repo_dir / name)]
    dependency_file = next(
        (repo_dir / name for name in DEPENDENCY_FILES if _present(repo_dir / name)), None
    )
    if dependency_file is None:
        missing.append(f"a dependency file ({_or_list(DEPENDENCY_FILES)})")
    if missing:
        raise RepoLayoutError(
            f"The ML repository {source or repo_dir} lacks {_and_list(missing)} at its root; "
            "FLOps expects model_manager.py (class ModelManager), data_manager.py (class "
            f"DataManager) and one of {_or_list(DEPENDENCY_FILES)} there.",
            details=missing,
        )
    assert dependency_file is not None
    return RepoLayout(
        model_manager=repo_dir / REQUIRED_FILES[0],
        data_manager=repo_dir / REQUIRED_FILES[1],
        dependency_file=dependency_file,
    )


def _present(path: Path) -> bool:
    """A regular file or a symbolic link (whose target is not looked at: where it leads is
    checked by :mod:`image_builder.confinement`, without telling whether it exists)."""
    return path.is_symlink() or path.is_file()


def copy_repo_files(src: Path, dest: Path, exclude: Sequence[Path] = ()) -> None:
    """Copy the tree ``src`` to ``dest`` (may exist), skipping :data:`IGNORED_NAMES` and ``*.pyc``.

    ``dest`` and the directories in ``exclude`` are never copied (a destination inside ``src``
    would otherwise copy itself without end). Symlinks are copied as symlinks. Raises
    ``OSError`` on I/O failure.
    """
    skipped = {Path(path).resolve() for path in (dest, *exclude)}

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory).resolve()
        return {
            name
            for name in names
            if name in IGNORED_NAMES or name.endswith(".pyc") or here / name in skipped
        }

    shutil.copytree(src, dest, symlinks=True, ignore=ignore, dirs_exist_ok=True)


def content_hash(directory: Path) -> str:
    """Return the 64-hex SHA-256 of the files under ``directory`` (the "commit" of a plain dir).

    Covers each file's relative POSIX path, executable bit and bytes, and each symlink's target,
    in sorted path order; :data:`IGNORED_NAMES` and ``*.pyc`` are skipped. Empty directories
    do not count.
    """
    digest = hashlib.sha256()
    for path in sorted(_walk(directory), key=lambda p: p.relative_to(directory).as_posix()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        if path.is_symlink():
            digest.update(b"L" + os.readlink(path).encode() + b"\0")
            continue
        executable = bool(path.stat().st_mode & stat.S_IXUSR)
        file_digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(b"X" if executable else b"F")
        digest.update(file_digest.digest())
    return digest.hexdigest()


def _walk(directory: Path) -> Iterator[Path]:
    for root, dirnames, filenames in os.walk(directory):
        dirnames[:] = [name for name in dirnames if name not in IGNORED_NAMES]
        for name in filenames:
            if name not in IGNORED_NAMES and not name.endswith(".pyc"):
                yield Path(root) / name
        for name in dirnames:  # symlinks to directories are not descended into by os.walk
            if (Path(root) / name).is_symlink():
                yield Path(root) / name


def _check_copy_size(src: Path, source: str, excluded: Sequence[Path]) -> None:
    """Refuse a plain directory above :data:`MAX_COPY_BYTES` or :data:`MAX_COPY_FILES`."""
    skipped = {Path(path).resolve() for path in excluded}
    total_bytes = total_files = 0
    for root, dirnames, filenames in os.walk(src):
        here = Path(root)
        dirnames[:] = [
            name for name in dirnames if name not in IGNORED_NAMES and here / name not in skipped
        ]
        for name in filenames:
            if name in IGNORED_NAMES or name.endswith(".pyc"):
                continue
            total_files += 1
            with contextlib.suppress(OSError):
                total_bytes += (here / name).lstat().st_size
            if total_files > MAX_COPY_FILES or total_bytes > MAX_COPY_BYTES:
                raise RepoFetchError(
                    f"ml_repo_url {source!r} is a directory with over {MAX_COPY_FILES} files or "
                    f"{MAX_COPY_BYTES >> 20} MiB; point it at the ML repository's root.",
                )


def _local_path(url: str, source: str) -> Path | None:
    """The local directory ``url`` names, or ``None`` for a remote git URL."""
    if "::" in url.split("://", 1)[0]:
        raise RepoFetchError(
            f"ml_repo_url {source!r} uses a git remote helper, which FLOps does not allow; use "
            "https://, ssh://, git://, file:// or a local path."
        )
    if "://" in url:
        try:
            parsed = urllib.parse.urlparse(url)
            parsed.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            raise RepoFetchError(
                f"ml_repo_url {source!r} is not a well-formed URL; fix it."
            ) from None
        scheme = parsed.scheme.lower()
        if scheme in _REMOTE_SCHEMES:
            return None
        if scheme != "file":
            raise RepoFetchError(
                f"ml_repo_url {source!r} uses the unsupported scheme {scheme!r}; use https://, "
                "ssh://, git://, file:// or a local path."
            )
        if parsed.netloc not in ("", "localhost"):
            raise RepoFetchError(
                f"ml_repo_url {source!r} names the remote host {parsed.netloc!r} in a file:// "
                "URL; use file:///absolute/path for a local repository."
            )
        path = Path(urllib.parse.unquote(parsed.path))
    else:
        path = Path(url).expanduser()
        if not path.exists() and _SCP_LIKE.match(url):
            return None
    path = path.resolve()
    if not path.is_dir():
        raise RepoFetchError(
            f"ml_repo_url {source!r} is not a reachable URL, and as a path it does not exist "
            "or is not a directory; fix the URL or path."
        )
    return path


def _is_git_repo(path: Path) -> bool:
    """True for the root of a work tree (``.git`` dir or file) or a bare repository."""
    if (path / ".git").exists():
        return True
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


def _fetch_git(
    url: str, source: str, ref: str | None, dest: Path, limits: FetchLimits
) -> FetchedRepo:
    git = _Git(dest, source, limits)
    git.run("init", "--quiet", str(dest), cwd=dest.parent)
    git.run("remote", "add", "origin", url)
    target = ref or "HEAD"
    try:
        git.run("fetch", "--depth", "1", "--no-tags", "origin", target)
        checkout = "FETCH_HEAD"
    except RepoFetchLimitError:
        raise
    except RepoFetchError as exc:
        stderr = str(exc.details[0]) if exc.details else ""
        if ref is None or not any(marker in stderr for marker in _REF_MISSING_MARKERS):
            raise
        if not _HEX_REF.match(ref):
            raise RepoRefError(
                f"ref {ref!r} is not a branch, tag or commit of {source}; fix the ref."
            ) from None
        # An abbreviated SHA, or a server refusing to serve a commit by SHA: fetch it all.
        logger.info("fetching all of %s to find commit %s", source, ref)
        git.run("fetch", "--tags", "origin")
        resolved = git.resolve_commit(ref)
        if resolved is None:
            raise RepoRefError(
                f"ref {ref!r} is not a branch, tag or commit of {source}; fix the ref."
            ) from None
        checkout = resolved
    git.run("checkout", "--quiet", "--detach", "--force", checkout)
    commit = git.run("rev-parse", "HEAD").strip()
    return FetchedRepo(path=dest, commit=commit, source=source, is_git=True)


class _Git:
    """git commands on the repository at ``dest``, within one fetch's ``limits``: a deadline
    shared by every command, git's low-speed abort, a size cap on ``dest``; each command runs
    in its own process group through :func:`~image_builder.build_processes.run_bounded`, so
    that cancelling the build stops it."""

    def __init__(self, dest: Path, source: str, limits: FetchLimits) -> None:
        self.dest = dest
        self.source = source
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.executable = shutil.which("git") or "git"
        self.env = {**os.environ, **_GIT_ENV}

    def run(self, *args: str, cwd: Path | None = None) -> str:
        """Run ``git <args>`` in ``dest`` (or ``cwd``); its stdout. Raises
        :class:`RepoFetchError` with git's error in one sentence (the raw redacted stderr as
        ``details[0]``), :class:`RepoFetchLimitError` beyond a bound."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout()
        try:
            result = run_bounded(
                [self.executable, *self.limits.git_options(), *args],
                timeout_s=remaining,
                timeout_error=self._timeout,
                env=self.env,
                cwd=cwd or self.dest,
                watch=self._size_watch(),
            )
        except FileNotFoundError:
            raise EnvironmentBuildError(
                "git is not installed on the build machine; install it (apt-get install git)."
            ) from None
        if result.returncode == 0:
            too_big = self._size_error()  # a command may finish between two checks
            if too_big is not None:
                raise too_big
            return str(result.stdout)
        stderr = redact_url(str(result.stderr))
        logger.debug("git %s failed for %s: %s", args[0], self.source, stderr)
        if any(marker in stderr.lower() for marker in _LOW_SPEED_MARKERS):
            raise RepoFetchLimitError(
                f"The git server of {self.source} sent less than "
                f"{self.limits.low_speed_bytes_per_s} bytes/s for "
                f"{self.limits.low_speed_time_s} s, so the fetch was stopped; check that the "
                "repository's server is reachable and not overloaded.",
                details=[stderr],
            )
        raise RepoFetchError(
            f"Cannot fetch the ML repository {self.source}: "
            f"{condense_git_error(redact_paths(stderr, {str(self.dest): '<repo>'}))}; check "
            "ml_repo_url and that the repository is reachable without a password prompt.",
            details=[stderr],
        )

    def resolve_commit(self, ref: str) -> str | None:
        """The full SHA of commit ``ref``, or ``None`` if it names none."""
        try:
            sha = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        except RepoFetchLimitError:
            raise
        except RepoFetchError:
            return None
        return sha.strip() or None

    def _timeout(self) -> RepoFetchLimitError:
        return RepoFetchLimitError(
            f"Fetching the ML repository {self.source} did not finish within "
            f"{self.limits.timeout_s:.0f} s, so it was stopped; check that the repository's "
            "server is reachable, or use a smaller repository."
        )

    def _size_watch(self) -> Callable[[], Exception | None]:
        """A ``watch`` for :func:`run_bounded`: the error once ``dest`` exceeds the size cap
        (checked every ``size_check_interval_s`` seconds)."""
        next_check = time.monotonic() + self.limits.size_check_interval_s

        def watch() -> Exception | None:
            nonlocal next_check
            if time.monotonic() < next_check:
                return None
            next_check = time.monotonic() + self.limits.size_check_interval_s
            return self._size_error()

        return watch

    def _size_error(self) -> RepoFetchLimitError | None:
        """The error when ``dest`` is above ``limits.max_bytes``, else ``None``."""
        if tree_bytes(self.dest, self.limits.max_bytes) <= self.limits.max_bytes:
            return None
        size = f"{self.limits.max_bytes / (1 << 20):g} MiB"
        return RepoFetchLimitError(
            f"The ML repository {self.source} is larger than {size} (its checkout, history "
            "included), so the fetch was stopped; keep large data and models out of the "
            "repository."
        )


def tree_bytes(directory: Path, stop_above: int | None = None) -> int:
    """Bytes of the files under ``directory`` (``lstat`` sizes, links not followed); stops
    counting once above ``stop_above``."""
    total = 0
    for root, _, filenames in os.walk(directory):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
            if stop_above is not None and total > stop_above:
                return total
    return total


def condense_git_error(stderr: str) -> str:
    """Return git's error output as one short clause (credentials removed, <= 240 characters).

    Prefers the first ``fatal:`` line, then ``error:``, then the first other line; when the
    fatal line is git's generic "Could not read from remote repository", the transport's own
    line before it (e.g. ssh's "Could not resolve hostname ...") is used. Strips the prefix and
    a trailing period.
    """
    lines = [line.strip() for line in redact_url(stderr).splitlines() if line.strip()]
    lines = [line for line in lines if not line.lower().startswith(_GIT_NOISE_PREFIXES)]
    chosen = ""
    for prefix in ("fatal:", "error:"):
        index = next((i for i, line in enumerate(lines) if line.lower().startswith(prefix)), None)
        if index is not None:
            chosen = lines[index][len(prefix) :].strip()
            if chosen.lower().startswith("could not read from remote") and index > 0:
                chosen = lines[0]
            break
    if not chosen:
        chosen = lines[0] if lines else "git failed without a message"
    chosen = chosen.rstrip(".")
    return chosen if len(chosen) <= 240 else chosen[:237] + "..."


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _or_list(items: tuple[str, ...]) -> str:
    return ", ".join(items[:-1]) + " or " + items[-1]
