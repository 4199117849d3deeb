"""Repository input stays inside the repository: what every build checks in the files it reads
from an ML repository, before an installer sees any of them.

An ML repository is customer input, and builders run on the manager's host. An installer given
a path outside the repository reads that file, and its error output (which reaches the
project's ``status_message``) quotes it; an installer given a local package directory runs the
package's build script (``setup.py``) as the manager's user; pip and uv substitute
``${VARIABLE}`` from the manager's environment into requirement lines. So
:func:`check_contract_files` and :func:`check_requirement_lines` refuse, with an
:class:`~image_builder.errors.UnsafeRepoInputError` that names the repository file and line
(the customer's own text) but never what a path outside resolves to or whether it exists:

- a contract or dependency file (and every file a requirement line includes) that is a symbolic
  link resolving outside the checkout, is not a regular file, or is larger than
  :data:`MAX_DEPENDENCY_FILE_BYTES`;
- ``${`` anywhere in a requirement line;
- ``-r``/``--requirement``/``-c``/``--constraint`` naming an absolute path, ``~``, a URL, or a
  relative path whose normalization starts with ``..`` or whose resolution (symbolic links
  followed, relative to the including file's directory, as pip and uv read them) leaves the
  repository; included files are checked line by line the same way, to a depth of
  :data:`MAX_INCLUDE_DEPTH`;
- local package requirements (``-e``/``--editable`` paths, ``./pkg``, ``../pkg``, ``/abs``,
  ``~/pkg``, a bare ``*.whl``/sdist file name, ``file:`` URLs, ``name @ file:...``) and a local
  ``-f``/``--find-links`` directory: refused unless ``allow_local_packages``, and then only
  inside the repository. A trusted single-user setup may allow them; the default refuses, since
  building a local package runs its code on the build machine;
- URLs whose scheme is not ``http``/``https`` (``git+http``, ``git+https``, ``git+ssh`` for
  direct references) in ``-i``/``--index-url``/``--extra-index-url``/``-f`` and direct
  references;
- any option outside :data:`ALLOWED_FLAGS` / :data:`ALLOWED_VALUE_OPTIONS` and the ones above,
  and per-requirement options other than ``--hash``.

Packages from an index may still run build code (an sdist's ``setup.py``): that is the
installer's normal operation and is contained only by running builds unprivileged (the ``oci``
builder installs inside a buildah container).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from packaging.requirements import InvalidRequirement, Requirement

from image_builder.dependencies import requirements_txt_lines
from image_builder.errors import UnsafeRepoInputError

MAX_DEPENDENCY_FILE_BYTES = 1 << 20
"""A dependency file (or an included requirement file) larger than this (1 MiB) is refused."""

MAX_INCLUDE_DEPTH = 10
"""How deep ``-r``/``-c`` includes may nest."""

INCLUDE_OPTIONS = frozenset({"-r", "--requirement", "-c", "--constraint"})
EDITABLE_OPTIONS = frozenset({"-e", "--editable"})
INDEX_OPTIONS = frozenset({"-i", "--index-url", "--extra-index-url"})
FIND_LINKS_OPTIONS = frozenset({"-f", "--find-links"})
ALLOWED_FLAGS = frozenset({"--no-index", "--pre", "--prefer-binary", "--require-hashes"})
"""Options without a value a requirement file may hold."""
ALLOWED_VALUE_OPTIONS = frozenset({"--only-binary", "--no-binary", "--trusted-host"})
"""Options with a value that names no file or URL."""

REMOTE_URL_SCHEMES = frozenset({"http", "https"})
DIRECT_URL_SCHEMES = frozenset({"http", "https", "git+http", "git+https", "git+ssh"})
ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".zip",
                    ".tar")  # fmt: skip
"""File name endings installers read as a local package file, even without a path separator."""

_VALUE_OPTIONS = INCLUDE_OPTIONS | EDITABLE_OPTIONS | INDEX_OPTIONS | FIND_LINKS_OPTIONS
_SHORT = {"-r", "-c", "-e", "-i", "-f"}
_URL_START = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HASH_OPTION = re.compile(r"\s--hash[=\s]\S+")
_SHOWN_CHARS = 160


@dataclass(frozen=True)
class _Context:
    """Where a line comes from: the repository root, the file (repository-relative, for
    messages), the directory its relative paths are relative to, and the policy."""

    root: Path
    file_label: str
    base_dir: Path
    allow_local_packages: bool


def check_contract_files(repo_dir: Path, files: Sequence[Path]) -> None:
    """Refuse any of ``files`` (contract and dependency files under ``repo_dir``) that is a
    symbolic link resolving outside ``repo_dir`` or not a regular file; the dependency file is
    also checked against :data:`MAX_DEPENDENCY_FILE_BYTES` by :func:`check_dependency_file`.

    Raises :class:`UnsafeRepoInputError` naming the file, never its target.
    """
    root = repo_dir.resolve()
    for path in files:
        _check_inside(root, path, _label(root, path), "")


def check_dependency_file(repo_dir: Path, path: Path) -> None:
    """Refuse the dependency file ``path`` if it leaves ``repo_dir``, is not a regular file or
    is larger than :data:`MAX_DEPENDENCY_FILE_BYTES`; call before reading it."""
    root = repo_dir.resolve()
    _check_file(root, path, _label(root, path), "")


def check_requirement_lines(
    repo_dir: Path,
    dependency_file: Path,
    lines: Sequence[str],
    *,
    allow_local_packages: bool = False,
) -> None:
    """Check the requirement ``lines`` read from ``dependency_file`` (under ``repo_dir``) and,
    recursively, every file they include (see the module docstring).

    Relative paths of the dependency file's own lines are relative to its directory (the
    repository root), as :func:`~image_builder.dependencies.resolve_local_paths` makes them.
    Raises :class:`UnsafeRepoInputError` for the first refused line.
    """
    root = repo_dir.resolve()
    context = _Context(root, _label(root, dependency_file), root, allow_local_packages)
    _check_lines(context, lines, depth=0, seen={dependency_file.resolve()})


def _check_lines(context: _Context, lines: Sequence[str], depth: int, seen: set[Path]) -> None:
    for line in lines:
        if "${" in line:
            _refuse(context, line, "uses ${...}, which the installer would fill in from the "
                    "build machine's environment; write the value itself")  # fmt: skip
        if line.startswith("-"):
            _check_option(context, line, depth, seen)
        else:
            _check_requirement(context, line)


def _check_option(context: _Context, line: str, depth: int, seen: set[Path]) -> None:
    option, value = _split_option(line)
    if option in ALLOWED_FLAGS and not value:
        return
    if option in ALLOWED_VALUE_OPTIONS and value and "/" not in value:
        return
    if option not in _VALUE_OPTIONS or not value:
        _refuse(context, line, "is an installer option FLOps does not accept in a repository's "
                "requirements; remove it")  # fmt: skip
    if option in INDEX_OPTIONS:
        _check_url(context, line, value, REMOTE_URL_SCHEMES)
    elif option in FIND_LINKS_OPTIONS:
        if _URL_START.match(value) and not _is_windows_drive(value):
            _check_url(context, line, value, REMOTE_URL_SCHEMES)
        else:
            _check_local_package(context, line, value)
    elif option in EDITABLE_OPTIONS:
        if _URL_START.match(value) and not value.lower().startswith("file:"):
            _check_url(context, line, value.split("#", 1)[0], DIRECT_URL_SCHEMES)
        else:
            _check_local_package(context, line, value)
    else:
        _include(context, line, value, depth, seen)


def _split_option(line: str) -> tuple[str, str]:
    """``("-r", "base.txt")`` for ``-r base.txt``, ``-rbase.txt``, ``--requirement=base.txt``."""
    head, _, rest = line.partition(" ")
    if head.startswith("--"):
        name, equals, value = head.partition("=")
        return name, (value if equals else rest).strip()
    if head[:2] in _SHORT and len(head) > 2:
        return head[:2], (head[2:].lstrip("=") + " " + rest).strip()
    return head, rest.strip()


def _include(context: _Context, line: str, value: str, depth: int, seen: set[Path]) -> None:
    """Check an included requirement or constraint file and its lines."""
    if _URL_START.match(value) or value.startswith(("/", "~", "\\")):
        _refuse(context, line, "includes a file by absolute path or URL; include files of the "
                "repository by relative path")  # fmt: skip
    path = _relative_inside(context, line, value)
    _check_file(context.root, path, context.file_label, f": the file included by {line!r}")
    resolved = path.resolve()
    if resolved in seen:
        return  # a cycle: pip and uv read each file once as well
    if depth + 1 > MAX_INCLUDE_DEPTH:
        _refuse(context, line, f"nests includes deeper than {MAX_INCLUDE_DEPTH} files")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        _refuse(context, line, "includes a file that is not readable UTF-8 text")
    nested = _Context(context.root, _label(context.root, path), path.parent,
                      context.allow_local_packages)  # fmt: skip
    _check_lines(nested, requirements_txt_lines(text), depth + 1, {*seen, resolved})


def _check_requirement(context: _Context, line: str) -> None:
    """A requirement line: a name with specifiers, a direct reference, a URL or a path."""
    per_line = [token for token in line.split()[1:] if token.startswith("--")]
    bare = _HASH_OPTION.sub("", f" {line}").strip()
    if any(not token.startswith("--hash") for token in per_line) or " --" in f" {bare}":
        _refuse(context, line, "carries a per-requirement installer option other than --hash; "
                "remove it")  # fmt: skip
    target = bare.split(";", 1)[0].strip()
    if _URL_START.match(target) and not _is_windows_drive(target):
        _check_direct_url(context, line, target)
        return
    if target.split("#", 1)[0].lower().endswith(ARCHIVE_SUFFIXES) and "@" not in target:
        _check_local_package(context, line, target)
        return
    try:
        requirement = Requirement(bare)
    except InvalidRequirement:
        requirement = None
    if requirement is not None:
        if requirement.url:
            _check_direct_url(context, line, requirement.url)
        return
    if target.startswith((".", "/", "~", "\\")) or "/" in target or "\\" in target:
        _check_local_package(context, line, target)
    else:
        _refuse(context, line, "is not a requirement FLOps can read; write it as name, "
                "name==1.2 or name @ https://...")  # fmt: skip


def _check_direct_url(context: _Context, line: str, url: str) -> None:
    if not _URL_START.match(url) or _is_windows_drive(url):  # name @ ./path
        _check_local_package(context, line, url)
        return
    if url.lower().startswith("file:"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            _refuse(context, line, "names a file:// URL on another host; remove it")
        _check_local_package(context, line, urllib.parse.unquote(parsed.path) or ".")
        return
    _check_url(context, line, url.split("#", 1)[0], DIRECT_URL_SCHEMES)


def _check_url(context: _Context, line: str, url: str, schemes: frozenset[str]) -> None:
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        _refuse(context, line, "holds a malformed URL; fix it")
    if parsed.scheme.lower() not in schemes or not parsed.netloc:
        allowed = ", ".join(f"{scheme}://" for scheme in sorted(schemes))
        _refuse(context, line, f"names a URL FLOps does not fetch; use {allowed} URLs")


def _check_local_package(context: _Context, line: str, value: str) -> None:
    """A local package (or wheel directory): refused unless allowed, then only inside."""
    if not context.allow_local_packages:
        _refuse(context, line, "installs a local package or directory, whose build would run "
                "its code (setup.py) on the build machine; FLOps refuses local packages: "
                "publish the package to an index (name==version), or keep its modules in the "
                "repository, whose root is importable")  # fmt: skip
    path_text = re.sub(r"\[[^\]]*\]$", "", value.split("#", 1)[0].strip())
    if path_text.startswith(("/", "~", "\\")):
        _refuse(context, line, "names a path outside the repository; use a relative path")
    _check_inside(context.root, _relative_inside(context, line, path_text), context.file_label,
                  f": the path named by {line!r}", must_exist=False)  # fmt: skip


def _relative_inside(context: _Context, line: str, value: str) -> Path:
    """``base_dir / value`` if its normalization stays inside the repository, else refuse."""
    joined = os.path.normpath(os.path.join(context.base_dir, value))
    try:
        Path(joined).relative_to(context.root)
    except ValueError:
        _refuse(context, line, "names a path outside the repository; use a path inside it")
    return Path(joined)


def _check_file(root: Path, path: Path, label: str, suffix: str) -> None:
    _check_inside(root, path, label, suffix)
    if not path.is_file():
        raise UnsafeRepoInputError(
            f"{label}{suffix} is not a regular file of the repository; fix the path."
        )
    if path.stat().st_size > MAX_DEPENDENCY_FILE_BYTES:
        raise UnsafeRepoInputError(
            f"{label}{suffix} is larger than {MAX_DEPENDENCY_FILE_BYTES >> 20} MiB; a "
            "dependency file lists requirements, one a line."
        )


def _check_inside(
    root: Path, path: Path, label: str, suffix: str, *, must_exist: bool = True
) -> None:
    """Refuse ``path`` if following its symbolic links leaves ``root``."""
    resolved = Path(os.path.realpath(path))
    try:
        resolved.relative_to(root)
    except ValueError:
        raise UnsafeRepoInputError(
            f"{label}{suffix} leads outside the repository (a symbolic link or a path that "
            "leaves it); FLOps reads only files inside the repository: replace the link with "
            "the file itself."
        ) from None
    if must_exist and not os.path.lexists(path):
        raise UnsafeRepoInputError(f"{label}{suffix} does not exist in the repository.")


def _refuse(context: _Context, line: str, why: str) -> NoReturn:
    shown = line if len(line) <= _SHOWN_CHARS else line[: _SHOWN_CHARS - 3] + "..."
    raise UnsafeRepoInputError(
        f"{context.file_label}: the line {shown!r} {why}.",
        details=[{"file": context.file_label, "line": shown}],
    )


def _label(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or its name when it is not under ``root``."""
    try:
        return Path(os.path.normpath(path)).relative_to(root).as_posix()
    except ValueError:
        return path.name


def _is_windows_drive(value: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", value))
