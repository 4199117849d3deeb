"""Images for another architecture, assembled on this machine from wheels without running them.

This machine cannot run code of another architecture (no binfmt/qemu), so the oci builder makes
an image for another platform (``linux/arm64`` on an amd64 build host) of ``COPY`` steps only
(``templates/Containerfile.cross.in``), from an environment assembled here:

- the base image of that platform is pulled and mounted
  (:meth:`~image_builder.buildah.Buildah.mounted_base_image`) and :func:`read_base_facts` reads
  its files: the interpreter (an ELF of the target machine, :func:`elf_machine`; Python of the
  manager's minor version, which compiles the bytecode), its glibc version (the newest
  ``GLIBC_2.N`` in ``libc.so.6``, giving the ``manylinux_2_N`` wheel tag,
  :meth:`BaseFacts.uv_platform`) and ``/etc/passwd`` and ``/etc/group``, to which the ``flops``
  user is added (:func:`add_passwd_user`, :func:`add_group`);
- uv (:class:`HostUv`) installs the requirements, constraints and excludes on this machine into
  a ``--target`` directory for the target (``--python-platform aarch64-manylinux_2_36
  --python-version 3.11 --only-binary :all:``); then the test suites are removed and every ELF
  file is checked to be of the target machine (:func:`foreign_elf_files`);
- each virtual environment is laid out by hand: ``pyvenv.cfg``, ``bin/python`` a symlink to the
  base image's interpreter, ``lib/python3.11/site-packages``, console scripts pointing at it.
  There are two, as in the images built natively: FLOps' runtime (``/opt/flops/venv``, the same
  for every project; :meth:`PlatformEnvironments.link`) and the ML repository's own
  (``/opt/flops/user-venv``; :meth:`PlatformEnvironments.link_user`);
- :class:`PlatformEnvironments` keeps each in the builder's ``cache_dir/platforms/`` and
  hard-links it into each build context, so that a code-only change (and, for the runtime, any
  other project) reuses the very files and so buildah's ``COPY`` layers and the registry's
  blobs.

This covers dependencies that publish wheels for the target platform (manylinux ``aarch64``
wheels: numpy, scipy, pandas, scikit-learn, pyarrow, torch, grpcio, ...) or pure-Python wheels.
A dependency with only a source distribution, or wheels for other platforms only, fails the
build before any image is made (:func:`platform_install_error`).

:data:`PLATFORMS` lists the platforms images are built for; :func:`host_platform` is this
machine's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as platform_module
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flops_utils.logging import logger
from image_builder.build_context import TEMPLATES, link_or_copy
from image_builder.buildah import run_tool
from image_builder.dependencies import requirement_name
from image_builder.errors import BaseImageError, DependencyInstallError, ImageBuildError
from image_builder.python_env import (
    base_interpreter,
    condense_uv_error,
    dependency_install_error,
    file_lock,
    pick_error,
    run_uv,
    run_uv_with_fallbacks,
    uv_binary,
)


@dataclass(frozen=True)
class TargetPlatform:
    """A platform images are built for.

    ``name``: ``os/arch`` as in the SLA (``linux/arm64``); ``arch``: the OCI architecture
    (``arm64``); ``machine``: the machine name in wheel tags and uv's ``--python-platform``
    (``aarch64``); ``elf_machine``: the ``e_machine`` of its ELF binaries (183, ``EM_AARCH64``;
    62 is ``EM_X86_64``; from the System V ABI's ``elf.h``).
    """

    name: str
    arch: str
    machine: str
    elf_machine: int


PLATFORMS: Mapping[str, TargetPlatform] = {
    target.name: target
    for target in (
        TargetPlatform("linux/amd64", "amd64", "x86_64", 62),
        TargetPlatform("linux/arm64", "arm64", "aarch64", 183),
    )
}
"""The platforms :meth:`~image_builder.oci_builder.OciBuilder.build` makes images for."""

MANYLINUX_GLIBC_MINORS = (17, 28, *range(31, 41))
"""glibc minor versions uv's ``--python-platform <machine>-manylinux_2_N`` accepts (uv 0.12
and 0.13, ``uv pip install --help``); a base image's glibc 2.N selects the largest one <= N."""

BYTECODE_EPOCH = "315532800"
"""``SOURCE_DATE_EPOCH`` (1980-01-01) of every install (here and in ``templates/install.sh``):
it makes uv compile hash-checked bytecode (PEP 552), which stays valid in the image.
Timestamp-checked bytecode does not after a ``COPY``, which rounds file times to the nearest
second: measured, 55 % of the ``.pyc`` files of a learner environment went stale, and its
imports took 5.0 s instead of 1.9 s with all of them stale; hash checking cost no measurable
time (1.91 s against 1.90 s)."""

PLATFORM_TREES_KEPT = 6
"""Environments of other platforms kept by :class:`PlatformEnvironments` (a build uses two: the
runtime and the repository's; each about 150 MB of its own: bytecode and scripts; the packages
are hard links into uv's cache where it shares the file system)."""

_MACHINE_TO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm", 243: "riscv", 22: "s390"}
_NO_WHEEL = re.compile(
    r"(?:because|and) (?:all versions of |only )?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*?)"
    r"(?:[<>=!~]=?[^\s,]*(?:,[<>=!~]=?[^\s,]*)*)? (?:has|have) no "
    r"(?P<what>usable wheels|wheels with a matching [\w ]*?tag)",
    re.IGNORECASE,
)
_WHEELS_AVAILABLE = re.compile(
    r"Wheels are available for `[^`]+` .*? on the following platforms?: (.+)"
)
_GLIBC_VERSION = re.compile(rb"GLIBC_2\.(\d+)")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def host_platform() -> str:
    """This machine's platform as ``os/arch`` (``linux/amd64``, ``linux/arm64``)."""
    machine = platform_module.machine().lower()
    return f"linux/{_MACHINE_TO_ARCH.get(machine, machine)}"


def python_version() -> str:
    """The manager's Python ``major.minor`` (``3.11``), which every image runs."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


# -- base images of other platforms, read from their files ------------------------------------
@dataclass(frozen=True)
class BaseFacts:
    """What a base image for another platform holds, read from its files (nothing run).

    ``python``: the interpreter's absolute path in the image, symlinks resolved
    (``/usr/bin/python3.11``); ``version``: its ``major.minor``; ``glibc``: ``(2, N)`` of its
    C library; ``passwd``/``group``: the texts of ``/etc/passwd`` and ``/etc/group`` (``""``
    if missing).
    """

    python: str
    version: str
    glibc: tuple[int, int]
    passwd: str
    group: str

    def uv_platform(self, target: TargetPlatform) -> str:
        """uv's ``--python-platform`` for wheels this base can load (``aarch64-manylinux_2_36``).

        Raises :class:`BaseImageError` for a glibc older than 2.17 (no manylinux wheel fits).
        """
        fitting = [minor for minor in MANYLINUX_GLIBC_MINORS if minor <= self.glibc[1]]
        if self.glibc[0] != 2 or not fitting:
            raise BaseImageError(
                f"The {target.name} base image has glibc {self.glibc[0]}.{self.glibc[1]}, "
                "older than 2.17, which no manylinux wheel supports; use a newer base image."
            )
        return f"{target.machine}-manylinux_2_{fitting[-1]}"


def read_base_facts(root: Path, python: str, target: TargetPlatform) -> BaseFacts:
    """Read :class:`BaseFacts` from the mounted root file system ``root`` of a ``target``
    base image (nothing in it runs).

    ``python``: the interpreter's name (looked up in ``/usr/local/bin``, ``/usr/bin``,
    ``/bin``) or absolute path. Raises :class:`BaseImageError` when it is missing, not a
    ``target`` ELF binary, not the manager's Python minor version or without its standard
    library, or when the image has no glibc (``libc.so.6``: musl-based images such as Alpine
    cannot load manylinux wheels).
    """
    candidates = [python] if python.startswith("/") else [
        f"{directory}/{python}" for directory in ("/usr/local/bin", "/usr/bin", "/bin")
    ]  # fmt: skip
    interpreter = next(
        (
            resolved
            for resolved in (resolve_in_root(root, candidate) for candidate in candidates)
            if resolved is not None and (root / resolved.lstrip("/")).is_file()
        ),
        None,
    )
    if interpreter is None:
        raise BaseImageError(
            f"The {target.name} base image has no {python}; use a base image with Python "
            f"{python_version()} (or set the interpreter's path)."
        )
    machine = elf_machine(root / interpreter.lstrip("/"))
    if machine != target.elf_machine:
        kind = "no ELF binary" if machine is None else _ELF_MACHINES.get(machine, str(machine))
        raise BaseImageError(
            f"The {target.name} base image's {python} ({interpreter}) is {kind}, not "
            f"{target.machine}; push the right image for {target.name} in the base list."
        )
    named = re.search(r"python(\d+\.\d+)$", interpreter)
    prefix = os.path.dirname(os.path.dirname(interpreter))
    versions = sorted(
        path.parent.name.removeprefix("python")
        for path in (root / prefix.lstrip("/") / "lib").glob("python3.*/os.py")
    )
    version = named.group(1) if named else (versions[-1] if versions else "")
    if version != python_version() or version not in versions:
        found = f"Python {version}" if version in versions else "no Python standard library"
        raise BaseImageError(
            f"The {target.name} base image has {found} at {prefix}/lib; the images need "
            f"Python {python_version()} (the manager's), use such a base image."
        )
    return BaseFacts(
        python=interpreter,
        version=version,
        glibc=_glibc_version(root, target),
        passwd=_read_in_root(root, "/etc/passwd"),
        group=_read_in_root(root, "/etc/group"),
    )


def resolve_in_root(root: Path, path: str, max_links: int = 40) -> str | None:
    """``path`` (absolute, inside the image whose root file system is ``root``) with every
    symlink resolved as the image sees it (absolute links stay inside ``root``); ``None`` if a
    component is missing or there are more than ``max_links`` links."""
    pending = [part for part in path.split("/") if part]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > max_links:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [piece for piece in target.split("/") if piece] + pending
            continue
        if not candidate.exists():
            return None
        resolved.append(part)
    return "/" + "/".join(resolved)


def elf_machine(path: Path) -> int | None:
    """The ``e_machine`` of the ELF file ``path`` (183 aarch64, 62 x86_64), else ``None``."""
    try:
        with path.open("rb") as handle:
            header = handle.read(20)
    except OSError:
        return None
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def foreign_elf_files(root: Path, machine: int) -> list[tuple[Path, str]]:
    """``[(path, machine name)]`` of the ELF files under ``root`` (symlinks not followed,
    ``.py``/``.pyc`` skipped) whose ``e_machine`` is not ``machine``."""
    foreign = []
    for current, _, files in os.walk(root):
        for name in files:
            if name.endswith((".py", ".pyc", ".pyi", ".txt", ".json")):
                continue
            path = Path(current) / name
            if path.is_symlink():
                continue
            found = elf_machine(path)
            if found is not None and found != machine:
                foreign.append((path, _ELF_MACHINES.get(found, str(found))))
    return sorted(foreign)


def add_passwd_user(passwd: str, name: str, uid: int, home: str) -> str:
    """``passwd`` (an ``/etc/passwd`` text) with ``name:x:uid:uid::home:/usr/sbin/nologin``
    appended, as ``useradd --user-group`` would; :class:`BaseImageError` if the name or uid
    is taken."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) > 2 and (fields[0] == name or fields[2] == str(uid)):
            raise BaseImageError(
                f"The base image already has the user {fields[0]} (uid {fields[2]}); FLOps "
                f"adds {name} with uid {uid}, use a base image without it."
            )
    text = passwd if not passwd or passwd.endswith("\n") else passwd + "\n"
    return f"{text}{name}:x:{uid}:{uid}::{home}:/usr/sbin/nologin\n"


def add_group(group: str, name: str, gid: int) -> str:
    """``group`` (an ``/etc/group`` text) with ``name:x:gid:`` appended, unless present."""
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) > 2 and (fields[0] == name or fields[2] == str(gid)):
            return group
    text = group if not group or group.endswith("\n") else group + "\n"
    return f"{text}{name}:x:{gid}:\n"


def _glibc_version(root: Path, target: TargetPlatform) -> tuple[int, int]:
    """``(2, N)`` of the base image's C library: the newest ``GLIBC_2.N`` symbol version in
    its ``libc.so.6``."""
    for directory in (
        f"/usr/lib/{target.machine}-linux-gnu", f"/lib/{target.machine}-linux-gnu",
        "/usr/lib64", "/lib64", "/usr/lib", "/lib",
    ):  # fmt: skip
        resolved = resolve_in_root(root, f"{directory}/libc.so.6")
        if resolved is None or not (root / resolved.lstrip("/")).is_file():
            continue
        minors = [
            int(m) for m in _GLIBC_VERSION.findall((root / resolved.lstrip("/")).read_bytes())
        ]
        if minors:
            return (2, max(minors))
    raise BaseImageError(
        f"The {target.name} base image has no glibc (libc.so.6); the images install manylinux "
        "wheels, which need a glibc-based image (Debian, Ubuntu, python:3.11-slim; not Alpine)."
    )


def _read_in_root(root: Path, path: str) -> str:
    resolved = resolve_in_root(root, path)
    if resolved is None or not (root / resolved.lstrip("/")).is_file():
        return ""
    return (root / resolved.lstrip("/")).read_text(encoding="utf-8", errors="replace")


# -- uv on this machine -------------------------------------------------------------------------
class HostUv:
    """uv run on this machine for images (:func:`~image_builder.python_env.uv_binary`, the one
    builds mount), with the host's uv cache and hash-checked bytecode (:data:`BYTECODE_EPOCH`).

    ``cache_dir``: uv's cache (the one builds mount). ``timeout_s``: seconds per uv run.
    """

    def __init__(self, cache_dir: Path, timeout_s: float) -> None:
        self.cache_dir = cache_dir
        self.timeout_s = timeout_s

    def run(self, arguments: list[str]) -> tuple[int, str]:
        """Run ``uv arguments``; ``(exit status, stderr)``. Raises :class:`ImageBuildError`
        after ``timeout_s``."""
        env = {
            "UV_PYTHON_DOWNLOADS": "never", "UV_COMPILE_BYTECODE": "1",
            "UV_CACHE_DIR": str(self.cache_dir), "SOURCE_DATE_EPOCH": BYTECODE_EPOCH,
        }  # fmt: skip
        result = run_uv(
            [str(uv_binary())],
            arguments,
            timeout_s=self.timeout_s,
            timeout_error=lambda: ImageBuildError(
                f"uv {' '.join(arguments[:2])} did not finish within {self.timeout_s:.0f} "
                "s; check the package index connection, or raise build_timeout_s."
            ),
            env=env,
        )
        return result.returncode, result.stderr

    def resolved_names(
        self, requirements: Path, uv_platforms: Mapping[str, str], constraints: Path
    ) -> set[str]:
        """Normalized names of the distributions ``requirements`` (a file) resolves to (``uv
        pip compile`` with ``constraints``, offline first) on every platform of
        ``uv_platforms`` (``os/arch`` → ``--python-platform`` value, ``""`` for this
        machine's). The resolutions are written next to ``requirements`` (``<stem>-<arch>.txt``).
        Raises :class:`DependencyInstallError` (:func:`install_failure`)."""
        names: set[str] = set()
        for versions in self.resolved_versions(requirements, uv_platforms, constraints).values():
            names.update(versions)
        return names

    def resolved_versions(
        self,
        requirements: Path,
        uv_platforms: Mapping[str, str],
        constraints: Path,
        on_failure: Callable[[str, list[tuple[str, str]]], Exception] | None = None,
    ) -> dict[str, dict[str, str]]:
        """``{platform: {normalized name: version}}``: what ``requirements`` resolves to on
        each platform, as :meth:`resolved_names` resolves it (written to
        ``<stem>-<arch>.txt``). A failure raises ``on_failure(platform, [(mode, stderr)])``
        (default :func:`install_failure`)."""
        resolved: dict[str, dict[str, str]] = {}
        for platform, uv_platform in uv_platforms.items():
            output = requirements.with_name(f"{requirements.stem}-{PLATFORMS[platform].arch}.txt")
            args = [
                "pip", "compile", "--quiet", "--no-header", "--no-annotate",
                "--output-file", str(output), *uv_target_options(uv_platform), str(requirements),
            ]  # fmt: skip
            mode, errors = run_uv_with_fallbacks(self.run, args, constraints)
            if mode is None:
                raise (on_failure or install_failure)(platform, errors)
            versions: dict[str, str] = {}
            for line in output.read_text(encoding="utf-8").splitlines():
                spec = line.split(";")[0].strip()
                name = requirement_name(spec) if line[:1].isalnum() else None
                if name:
                    versions[name] = spec.partition("==")[2].strip() if "==" in spec else ""
            resolved[platform] = versions
        return resolved


def uv_target_options(uv_platform: str) -> list[str]:
    """uv options selecting the interpreter and, for another platform (``uv_platform`` not
    empty), its wheels: binary only, for the manager's Python minor version."""
    options = ["--python", base_interpreter()]
    if uv_platform:
        options += [
            "--python-version", python_version(), "--python-platform", uv_platform,
            "--only-binary", ":all:",
        ]  # fmt: skip
    return options


# -- the environments of other platforms --------------------------------------------------------
@dataclass(frozen=True)
class EnvironmentFiles:
    """The files (on this machine) an environment of another platform is installed from.

    ``learner``: requirements of FLOps' runtime environment (the learner's runtime pins, the
    same for every project); ``aggregator``: the aggregator's (``-r`` the learner's, plus its
    extras); ``learner_excludes``/``aggregator_excludes``: names left out (``uv pip install
    --excludes``; may be empty); ``constraints``: the manager's versions.
    """

    learner: Path
    aggregator: Path
    learner_excludes: Path
    aggregator_excludes: Path
    constraints: Path


@dataclass(frozen=True)
class CrossEnvironment:
    """An environment in a build context: ``directory`` (``cross-arm64``) and whether the
    aggregator's image shares the learner's ``deps/`` layer (else it has ``aggregator-deps/``).

    The directory holds ``deps/`` (the learner's ``/opt/flops/venv``: FLOps' runtime, the shared
    layer), ``aggregator-extras/`` (the files the aggregator's install added) or, when that
    install removed files of the learner's, ``aggregator-deps/`` (its whole environment) and an
    empty ``aggregator-extras/``; ``learner-extras/`` (empty); ``etc/`` (``passwd`` and
    ``group`` with the images' user) and ``home/<user>/``; and, once
    :meth:`PlatformEnvironments.link_user` added it, ``user/`` (``/opt/flops/user-venv``, the
    repository's environment).
    """

    directory: str
    aggregator_shares_deps: bool

    def deps_dir(self, role: str) -> str:
        """The ``directory`` subdirectory ``role``'s dependency layer is copied from."""
        return "deps" if role == "learner" or self.aggregator_shares_deps else f"{role}-deps"


class PlatformEnvironments:
    """Environments of images for other platforms, assembled on this machine and cached.

    ``directory``: the cache (the oci builder's ``cache_dir/platforms/``). ``uv``: installs
    them. ``user``/``uid``: the user added to ``/etc/passwd`` and ``/etc/group`` (the group
    has the same id); ``venv``: the environment's path in the images (console scripts run its
    ``bin/python``). ``lock_timeout_s``: seconds to wait for a concurrent assembly of the same
    environment (then :class:`ImageBuildError`). ``keep``: how many of the most recently used
    environments stay (default :data:`PLATFORM_TREES_KEPT`).
    """

    def __init__(
        self,
        directory: Path,
        uv: HostUv,
        *,
        user: str,
        uid: int,
        venv: str,
        lock_timeout_s: float,
        keep: int = PLATFORM_TREES_KEPT,
    ) -> None:
        self.directory = directory
        self.uv = uv
        self.user = user
        self.uid = uid
        self.venv = venv
        self.lock_timeout_s = lock_timeout_s
        self.keep = keep

    def link(
        self,
        dest: Path,
        target: TargetPlatform,
        facts: BaseFacts,
        files: EnvironmentFiles,
        inputs: Mapping[str, Any],
    ) -> CrossEnvironment:
        """The ``target`` environment of ``files`` hard-linked into ``dest`` (a new directory
        in the build context, e.g. ``cross-arm64``), from the cache when the same inputs were
        assembled before.

        Reusing the very files (same contents and times) lets buildah's layer cache reuse the
        ``COPY`` layers and the registry skip their blobs: without it a code-only change
        re-assembled and re-pushed the whole 580 MB dependency layer (73 s instead of seconds).
        Keyed by ``inputs`` (the caller's: hashes of the generated requirement and constraint
        files, the excludes, the templates, ...), the target and its wheel tag, the base
        image's facts, the uid and this Python's version. Raises
        :class:`DependencyInstallError` (a requirement has no wheel for the target, or cannot
        be resolved) and :class:`ImageBuildError`.
        """

        def assemble(root: Path, work: Path) -> dict[str, Any]:
            return {"aggregator_shares_deps": self._assemble(root, work, target, facts, files)}

        tree, metadata = self._cached("runtime", target, facts, inputs, assemble)
        _link_tree(tree, dest)
        self._evict_oldest()
        return CrossEnvironment(
            directory=dest.name, aggregator_shares_deps=bool(metadata["aggregator_shares_deps"])
        )

    def link_user(
        self,
        dest: Path,
        target: TargetPlatform,
        facts: BaseFacts,
        requirements: Path,
        constraints: Path,
        inputs: Mapping[str, Any],
        venv: str,
    ) -> None:
        """The ``target`` environment of the ML repository (``requirements``, local paths and
        find-links absolute on this machine, with ``constraints`` on the first attempts)
        hard-linked into ``dest/user`` (``dest``: the directory :meth:`link` made), from the
        cache when the same ``inputs`` were assembled before; ``venv``: its path in the images
        (``/opt/flops/user-venv``). Raises as :meth:`link` does."""

        def assemble(root: Path, work: Path) -> dict[str, Any]:
            started = time.monotonic()
            self._install(work, requirements, None, constraints, target, facts, venv)
            _link_tree(work, root / "user")
            shutil.rmtree(work)
            logger.info(
                "assembled the %s repository environment in %.1f s",
                target.name, time.monotonic() - started,
            )  # fmt: skip
            return {}

        tree, _ = self._cached("user", target, facts, {**inputs, "venv": venv}, assemble)
        _link_tree(tree / "user", dest / "user")
        self._evict_oldest()

    def _cached(
        self,
        kind: str,
        target: TargetPlatform,
        facts: BaseFacts,
        inputs: Mapping[str, Any],
        assemble: Callable[[Path, Path], dict[str, Any]],
    ) -> tuple[Path, dict[str, Any]]:
        """``(tree, metadata)`` of the cached ``kind`` environment of these inputs, made by
        ``assemble(tree, scratch directory)`` (returning its metadata) unless cached; the entry
        is marked most recently used. Its lock is held while it is made."""
        material = {
            **inputs,
            "kind": kind,
            "platform": target.name,
            "wheels": facts.uv_platform(target),
            "base": [facts.python, facts.version, facts.glibc, facts.passwd, facts.group],
            "uid": self.uid,
            "python": sys.version_info[:3],
        }
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
        self.directory.mkdir(parents=True, exist_ok=True)
        prefix = target.arch if kind == "runtime" else f"{target.arch}-{kind}"
        cached = self.directory / f"{prefix}-{key}"
        lock = self.directory / f"{cached.name}.lock"
        with file_lock(lock, self.lock_timeout_s, error=ImageBuildError):
            if not (cached / "tree.json").is_file():
                staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=self.directory))
                try:
                    (staging / "tree").mkdir()
                    metadata = assemble(staging / "tree", staging / "work")
                    (staging / "tree.json").write_text(json.dumps(metadata), encoding="utf-8")
                    shutil.rmtree(cached, ignore_errors=True)
                    staging.rename(cached)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            else:
                logger.info("reusing the assembled %s %s environment %s", target.name, kind, key)
            os.utime(cached / "tree.json")  # most recently used
            metadata = json.loads((cached / "tree.json").read_text(encoding="utf-8"))
        return cached / "tree", dict(metadata)

    def _assemble(
        self,
        root: Path,
        work: Path,
        target: TargetPlatform,
        facts: BaseFacts,
        files: EnvironmentFiles,
    ) -> bool:
        """Assemble the :class:`CrossEnvironment` layout of the ``target`` images in ``root``
        (FLOps' runtime, the user), using ``work``; returns whether the aggregator shares
        ``deps/``."""
        started = time.monotonic()
        uv_platform = facts.uv_platform(target)
        constraints = files.constraints
        self._install(
            work, files.learner, files.learner_excludes, constraints, target, facts, self.venv
        )
        _link_tree(work, root / "deps")
        before = _tree_snapshot(work)
        self._install(
            work, files.aggregator, files.aggregator_excludes, constraints, target, facts, self.venv
        )
        changed, removed = _tree_changes(before, work)
        (root / "learner-extras").mkdir()
        (root / "aggregator-extras").mkdir()
        shared = not removed
        if shared:
            for relative in changed:
                _link_entry(work / relative, root / "aggregator-extras" / relative)
        else:  # files of the learner's environment went away: no COPY on top can say that
            logger.info("the %s aggregator gets its own environment layer", target.name)
            _link_tree(work, root / "aggregator-deps")
        etc = root / "etc"
        etc.mkdir()
        home = f"/home/{self.user}"
        (etc / "passwd").write_text(
            add_passwd_user(facts.passwd, self.user, self.uid, home), encoding="utf-8"
        )
        (etc / "group").write_text(add_group(facts.group, self.user, self.uid), encoding="utf-8")
        (root / home.lstrip("/")).mkdir(parents=True)
        shutil.rmtree(work)
        logger.info(
            "assembled the %s runtime environment (%s) in %.1f s",
            target.name, uv_platform, time.monotonic() - started,
        )  # fmt: skip
        return shared

    def _install(
        self,
        venv: Path,
        requirements: Path,
        excludes: Path | None,
        constraints: Path,
        target: TargetPlatform,
        facts: BaseFacts,
        image_venv: str,
    ) -> None:
        """Install ``requirements`` (with ``constraints``, without ``excludes``) into ``venv``
        (laid out as ``image_venv``, its path in the images, will be) for ``target``, remove
        the test suites, point console scripts and ``bin/python`` at the image's interpreter and
        check that every ELF file is a ``target`` binary."""
        site_packages = venv / "lib" / f"python{facts.version}" / "site-packages"
        args = [
            "pip", "install", "--quiet", "--target", str(site_packages),
            *uv_target_options(facts.uv_platform(target)), "-r", str(requirements),
        ]  # fmt: skip
        if excludes is not None and excludes.is_file() and excludes.stat().st_size:
            args += ["--excludes", str(excludes)]
        mode, errors = run_uv_with_fallbacks(self.uv.run, args, constraints)
        if mode is None:
            raise install_failure(target.name, errors)
        _move_scripts(site_packages / "bin", venv / "bin", f"{image_venv}/bin/python")
        _write_venv_skeleton(venv, facts)
        slim = run_tool(
            [sys.executable, "-I", "-B", str(TEMPLATES / "slim_site_packages.py"), str(venv)],
            600, "slim_site_packages.py",
        )  # fmt: skip
        if slim.returncode != 0:
            raise ImageBuildError(
                f"Removing the test suites from the {target.name} environment failed: "
                f"{(slim.stderr.strip().splitlines() or ['no output'])[-1]}."
            )
        foreign = foreign_elf_files(venv, target.elf_machine)
        if foreign:
            path, machine = foreign[0]
            raise ImageBuildError(
                f"{len(foreign)} files installed for {target.name} are not {target.machine} "
                f"binaries, e.g. {path.relative_to(venv)} ({machine}); uv installed a wheel "
                "for another platform, report this with the repository's requirements."
            )

    def _evict_oldest(self) -> None:
        """Remove all but the :attr:`keep` most recently used environments (by ``tree.json``'s
        mtime); those being assembled or used (locked) are left alone."""
        trees = sorted(
            (path for path in self.directory.iterdir() if (path / "tree.json").is_file()),
            key=lambda path: (path / "tree.json").stat().st_mtime,
            reverse=True,
        )
        for tree in trees[self.keep :]:
            try:
                with file_lock(self.directory / f"{tree.name}.lock", 0, error=ImageBuildError):
                    shutil.rmtree(tree, ignore_errors=True)
            except ImageBuildError:
                continue  # in use


# -- the hand-made virtual environment ----------------------------------------------------------
def _write_venv_skeleton(venv: Path, facts: BaseFacts) -> None:
    """Make ``venv`` a virtual environment of the image's interpreter without running it:
    ``pyvenv.cfg``, ``bin/python`` → ``facts.python`` (absolute, resolved in the image),
    ``bin/python3`` and ``bin/python<version>`` → ``python``, ``lib64`` → ``lib``."""
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "pyvenv.cfg").write_text(
        f"home = {os.path.dirname(facts.python)}\n"
        "include-system-site-packages = false\n"
        f"version = {facts.version}\n",
        encoding="utf-8",
    )
    for name, target in (
        ("python", facts.python), ("python3", "python"), (f"python{facts.version}", "python"),
    ):  # fmt: skip
        link = venv / "bin" / name
        if not link.is_symlink():
            link.symlink_to(target)
    if not (venv / "lib64").is_symlink():
        (venv / "lib64").symlink_to("lib")


def _move_scripts(source: Path, dest: Path, interpreter: str) -> None:
    """Move the console scripts uv wrote to ``source`` (``--target``'s ``bin``) into ``dest``,
    their ``#!`` line pointing at ``interpreter`` (the image's) instead of this machine's."""
    if not source.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for script in sorted(source.iterdir()):
        target = dest / script.name
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if data.startswith(b"#!"):
                first, newline, rest = data.partition(b"\n")
                if b"python" in first:
                    data = b"#!" + interpreter.encode() + newline + rest
            target.unlink(missing_ok=True)  # a new file: never write through a hard link
            target.write_bytes(data)
            target.chmod(script.stat().st_mode & 0o7777)
            script.unlink()
        else:
            os.replace(script, target)
    shutil.rmtree(source)


def _link_tree(source: Path, dest: Path) -> None:
    """Copy the tree ``source`` to ``dest`` as hard links (symlinks as symlinks)."""
    shutil.copytree(source, dest, symlinks=True, copy_function=_hard_link)


def _hard_link(source: str, dest: str) -> None:
    link_or_copy(Path(source), Path(dest))


def _link_entry(source: Path, dest: Path) -> None:
    """Hard-link the file (or copy the symlink) ``source`` to ``dest``, making its parents."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        dest.symlink_to(os.readlink(source))
    else:
        link_or_copy(source, dest)


def _tree_snapshot(root: Path) -> dict[str, int]:
    """``{relative path: inode}`` of the files and symlinks under ``root``."""
    snapshot: dict[str, int] = {}
    for current, directories, files in os.walk(root):
        for name in files + [d for d in directories if (Path(current) / d).is_symlink()]:
            path = Path(current) / name
            snapshot[str(path.relative_to(root))] = path.lstat().st_ino
    return snapshot


def _tree_changes(before: Mapping[str, int], root: Path) -> tuple[list[str], list[str]]:
    """``(added or replaced, removed)`` relative paths of ``root`` since ``before``."""
    after = _tree_snapshot(root)
    changed = sorted(path for path, inode in after.items() if before.get(path) != inode)
    removed = sorted(path for path in before if path not in after)
    return changed, removed


# -- errors -------------------------------------------------------------------------------------
def install_failure(platform: str, errors: Sequence[tuple[str, str]]) -> DependencyInstallError:
    """The error for failed uv attempts ``[(mode, stderr)]`` resolving or installing for
    ``platform``: :func:`platform_install_error` for another platform than this machine's,
    else :func:`~image_builder.python_env.dependency_install_error`."""
    if platform == host_platform():
        return dependency_install_error(errors)
    return platform_install_error(platform, python_version(), errors)


def platform_install_error(
    platform: str, python_version: str, errors: Sequence[tuple[str, str]]
) -> DependencyInstallError:
    """The :class:`DependencyInstallError` for failed attempts to install for ``platform``
    (``linux/arm64``) on this machine, which takes wheels only.

    When uv says a package has no wheel that fits (``has no wheels with a matching platform
    tag``, or ``has no usable wheels``: only a source distribution), the message is
    ":samp:`{package} has no wheel for {platform} (Python {python_version})` (where its wheels
    are, if uv says); ...", naming the fixes; anything else is
    :func:`~image_builder.python_env.dependency_install_error`'s message. ``details`` holds
    every attempt's condensed error.
    """
    _, stderr = pick_error(errors)
    match = _NO_WHEEL.search(" ".join(_ANSI_ESCAPE.sub("", stderr).split()))
    if match is None:
        return dependency_install_error(errors)
    name = match.group("name")
    available = _WHEELS_AVAILABLE.search(stderr)
    if available:
        where = available.group(1).replace("`", "").strip().rstrip(".")
        where = where if len(where) <= 120 else where[:117] + "..."
        found = f" (its wheels are for {where})"
    elif match.group("what").lower() == "usable wheels":
        found = " (it publishes a source distribution only)"
    else:
        found = ""
    return DependencyInstallError(
        f"{name} has no wheel for {platform} (Python {python_version}){found}; images for "
        f"{platform} are assembled on this {host_platform()} machine from wheels only, without "
        f"running code. Require a version of {name} with {platform} wheels, drop it, or "
        f"remove {platform} from supported_platforms.",
        details=[condense_uv_error(text) for _, text in errors],
    )
