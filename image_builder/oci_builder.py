"""The ``oci`` builder: learner and aggregator OCI images per project inputs, in a registry.

:meth:`OciBuilder.build` runs the same fetch-and-validate step as the ``venv`` builder
(:func:`image_builder.repo.checked_out_repo`) and plans the same installs
(:mod:`image_builder.python_env`: the runtime packages pinned to the manager's versions, the
manager's other distributions as constraints). For this machine's platform it builds, with
buildah (``buildah build --isolation chroot --layers``, daemonless, no OCI runtime needed),
from ``templates/Containerfile.in``:

=========================  =====================================================================
layer                      content
=========================  =====================================================================
base image                 ``base_image``, pinned by digest (any image with Python 3 and
                           ``useradd``; tests use a debootstrapped Debian 12)
user                       ``flops`` (uid :data:`IMAGE_UID`), the user the role runs as
dependencies               ``/opt/flops/venv``: the repository's requirements + the learner's
                           runtime pins, installed by uv (:file:`templates/install.sh`) from the
                           host's uv cache (offline first); uv and its cache are mounted, not kept
role extras                the aggregator's MLflow (and pydantic); empty for the learner
FLOps runtime              ``/opt/flops/runtime``: ``flops_utils`` and the role's package (the
                           aggregator also gets ``flops_manager/sla.py``), copied
ML repository              ``/opt/flops/repo`` (no ``.git``), owned by the ``flops`` user
=========================  =====================================================================

plus ``ENV`` (``PYTHONPATH``, ``FLOPS_ML_REPO_DIR``), OCI labels (``org.opencontainers.image.
source``/``.revision``, :data:`LABEL_INPUTS_HASH`, ...), ``USER`` and the entrypoint
``python -m learner`` / ``python -m aggregator``. Only the last two layers depend on code, so a
code-only change rebuilds in seconds; the dependency layers are shared between the learner and
the aggregator and between projects through buildah's layer cache.

Slim images: Flower 1.41 requires its server-side stack, which neither role imports (traced:
the distributions in ``sys.modules`` of ``python -m learner`` and ``python -m aggregator``
during a real two-learner training). The installs leave out :data:`UNUSED_DEPENDENCIES`
(``uv pip install --excludes``): uv's 40 MB binary, uvicorn and its ``[standard]`` extras, the
interactive CLI's prompt-toolkit, greenlet, hf-xet; every name the repository's own
requirements need (and, for the aggregator, MLflow's: uvicorn, python-dotenv, wcwidth) is
kept, found by resolving those alone (:meth:`OciBuilder._excludes`). Then
:file:`templates/slim_site_packages.py` removes the test suites of numpy, scipy, pandas,
scikit-learn, pyarrow and matplotlib in the same step. Bytecode stays, hash-checked
(:data:`BYTECODE_EPOCH`). Measured for ``examples/mnist_sklearn`` (uncompressed): learner
892 MB to 696 MB, its dependency layer 770 MB to 573 MB (82 MB of left-out distributions,
108 MB of test suites); aggregator 1098 MB to 903 MB.

Multi-platform (``platforms=["linux/amd64", "linux/arm64"]``, the SLA's
``supported_platforms``): one image per platform and role, pushed as one manifest list per role
(``buildah manifest create/add/push --all``) tagged by the key, which covers the platform set;
the pushed list's digest is checked against ``skopeo inspect --raw``. (A single platform gives
a plain image, as before.) The base image must be a manifest list holding every platform (or a
single image of the only platform asked for). This machine cannot run code of another
architecture (no binfmt/qemu), so an image for another platform is assembled without running
any of its code (``templates/Containerfile.cross.in``, only ``COPY`` steps, the same layers,
environment, labels, user and entrypoint as this machine's):

- the base image is pulled and mounted to read its interpreter (an ELF of the target machine,
  Python 3.11, the same minor version as the manager, which compiles the bytecode), its glibc
  version (the newest ``GLIBC_2.N`` in ``libc.so.6``, giving the ``manylinux_2_N`` wheel tag)
  and ``/etc/passwd`` and ``/etc/group``, to which the ``flops`` user is added;
- uv installs the same requirements, constraints and excludes on this machine into a
  ``--target`` directory for the target (``--python-platform aarch64-manylinux_2_36
  --python-version 3.11 --only-binary :all:``), then the test suites are removed and every
  ELF file is checked to be of the target machine;
- the virtual environment is laid out by hand: ``pyvenv.cfg``, ``bin/python`` a symlink to the
  base image's interpreter, ``lib/python3.11/site-packages``, console scripts pointing at it;
  it is kept in ``cache_dir/platforms/`` so that a code-only change reuses its layers.

This covers repositories whose dependencies all publish wheels for the target platform
(manylinux ``aarch64`` wheels, which numpy, scipy, pandas, scikit-learn, pyarrow, torch,
grpcio and most of the scientific stack have) or pure-Python wheels (``py3-none-any``). A
dependency with only a source distribution, or with wheels for other platforms only, fails the
build before any image is made, with a :class:`~image_builder.errors.DependencyInstallError`
naming it (":samp:`{package} has no wheel for linux/arm64 (Python 3.11) ...`"); build such
images on a machine of that platform instead. Measured here (2 cores, the example, warm uv
cache): learner and aggregator for linux/amd64 + linux/arm64 cold 89-140 s (the arm64
environment 17-26 s of it), code-only change 17 s, no-op 0.1 s; arm64 learner 707 MB, aggregator
918 MB uncompressed.

Images are pushed as ``<registry>/<namespace>/learner:<key>`` and ``.../aggregator:<key>``
(:meth:`OciBuilder.image_key`: a hash of the commit, dependency hash, base image digest, ML
model flavor, platforms, the runtime versions, the generated requirement and constraint files,
the FLOps runtime code and the templates). A tag already in the registry with the same
:data:`LABEL_INPUTS_HASH` (and, for a list, the same platforms) is reused without building.
After a push the registry's digest is checked against buildah's.

Scope: repositories whose requirements install from wheels or pure-Python sources (the images
carry no compilers) on the base image's Python. ``cache_dir`` holds build locks, the last build
log per image (``logs/<key>-<role>[-<arch>].log``) and the assembled environments of other
platforms (``platforms/``); layers live in buildah's storage (``/var/lib/containers/storage``
for root).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform as platform_module
import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from flops_utils.logging import logger
from flops_utils.processes import stop_process_groups
from flops_utils.types import MLModelFlavor
from image_builder.dependencies import requirement_name, resolve_local_paths
from image_builder.errors import (
    BaseImageError,
    BuilderError,
    BuildToolMissingError,
    DependencyInstallError,
    ImageBuildError,
    ImagePushError,
    RegistryUnreachableError,
)
from image_builder.python_env import (
    RUNTIME_PACKAGES,
    base_interpreter,
    condense_uv_error,
    dependency_install_error,
    file_lock,
    manager_versions,
    pick_error,
    plan_install,
    run_uv_with_fallbacks,
    runtime_pins,
    uv_binary,
    uv_command,
)
from image_builder.repo import (
    DEFAULT_GIT_TIMEOUT_S,
    CheckedOutRepo,
    checked_out_repo,
    content_hash,
    copy_repo_files,
)

IMAGE_FORMAT_VERSION = 2
"""Bumped when the image layout changes, so images built by older code are not reused."""

ROLES = ("learner", "aggregator")
"""The images built per project, in build order (the aggregator reuses the learner's layers)."""

ROLE_SOURCES: Mapping[str, tuple[str, ...]] = {
    "learner": ("flops_utils", "learner"),
    "aggregator": (
        "flops_utils",
        "aggregator",
        "flops_manager/__init__.py",
        "flops_manager/sla.py",
    ),
}
"""FLOps code copied into each role's image: packages (directories) or single module files,
located through the manager's own imports."""

LEARNER_PACKAGES = tuple(name for name in RUNTIME_PACKAGES if name != "mlflow")
"""Runtime distributions both images get (pinned); the learner does not need MLflow."""

AGGREGATOR_EXTRA_PACKAGES = ("mlflow", "pydantic")
"""Runtime distributions only the aggregator gets (MLflow tracking; ``flops_manager.sla``)."""

UNUSED_DEPENDENCIES = (
    "uv",  # flwr's app packaging (`flwr build`): a 40 MB binary
    "prompt-toolkit",  # flwr's interactive CLI
    "wcwidth",  # prompt-toolkit's
    "uvicorn",  # flwr's REST and control servers (uvicorn[standard] and its extras below)
    "uvloop",
    "httptools",
    "watchfiles",
    "websockets",
    "python-dotenv",
    "greenlet",  # sqlalchemy[asyncio], for the SuperLink's async state
    "hf-xet",  # huggingface-hub's Xet transfers; learners never download from the Hub
)
"""Distributions the runtime pins pull in that neither role imports, left out of the installs.

Source: the distributions owning a module in ``sys.modules`` at the exit of ``python -m
learner`` and ``python -m aggregator`` in a real training (``tests/aggregator``, two learners,
the sklearn example) with flwr 1.41.0, datasets 4.8.5, mlflow 3.17.2, against the resolution of
the runtime pins. ``flwr.client`` imports sqlalchemy, alembic, fastapi, starlette, httpx, typer
and rich at import time, so those stay. A name the repository's requirements need (or, for the
aggregator, MLflow's) is not excluded (:meth:`OciBuilder._excludes`)."""

IMAGE_UID = 10001
"""uid and gid of the non-root ``flops`` user the images run as."""

IMAGE_USER = "flops"
"""Name of that user (home ``/home/flops``)."""

LABEL_INPUTS_HASH = "org.flops.inputs-hash"
"""Image label holding :meth:`OciBuilder.image_key`; a registry tag is reused only if it matches."""

TEMPLATES = Path(__file__).resolve().parent / "templates"
"""``Containerfile.in``, ``Containerfile.cross.in`` (:class:`string.Template`), ``install.sh``
and ``slim_site_packages.py``."""

TEMPLATE_FILES = (
    "Containerfile.in",
    "Containerfile.cross.in",
    "install.sh",
    "slim_site_packages.py",
)
"""The templates of the learner and aggregator images (hashed into the key)."""

REPO_MOUNT = Path("/opt/flops/build/repo")
"""Where the install steps see the repository (for requirements naming local paths)."""

VENV = "/opt/flops/venv"
"""The images' virtual environment (the entrypoint is its ``bin/python``)."""

BYTECODE_EPOCH = "315532800"
"""``SOURCE_DATE_EPOCH`` (1980-01-01) of every install: it makes uv compile hash-checked
bytecode (PEP 552), which stays valid in the image. Timestamp-checked bytecode does not after a
``COPY``, which rounds file times to the nearest second: measured, 55 % of the ``.pyc`` files of
a learner environment went stale, and its imports took 5.0 s instead of 1.9 s with all of them
stale; hash checking cost no measurable time (1.91 s against 1.90 s)."""

PLATFORM_TREES_KEPT = 4
"""Environments of other platforms kept in ``cache_dir/platforms/`` (each about 150 MB of its
own: bytecode and scripts; the packages are hard links into uv's cache where it shares the
file system)."""

DEPENDENCY_INSTALL_EXIT = 42
"""Exit status of ``install.sh`` when no uv attempt could install the requirements."""


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
"""The platforms :meth:`OciBuilder.build` makes images for."""

MANYLINUX_GLIBC_MINORS = (17, 28, *range(31, 41))
"""glibc minor versions uv's ``--python-platform <machine>-manylinux_2_N`` accepts (uv 0.12
and 0.13, ``uv pip install --help``); a base image's glibc 2.N selects the largest one <= N."""

_MACHINE_TO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm", 243: "riscv", 22: "s390"}
_NOT_FOUND = re.compile(r"manifest unknown|name unknown|not found|no such image", re.IGNORECASE)
_LOGRUS_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_STEP = re.compile(r"^STEP (\d+/\d+): (.*)$")
_BUILDAH_NOISE = re.compile(
    r"^(subprocess exited with status|error building at step|error: building at step|"
    r"time=|\[\d+/\d+\] step)",
    re.IGNORECASE,
)
_LIST_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
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


@dataclass(frozen=True)
class BuiltImage:
    """One image (or manifest list) in the registry.

    ``role``: ``"learner"`` or ``"aggregator"``. ``repository``: ``registry/namespace/role``;
    ``tag``: the inputs key (32 hex); ``digest``: the manifest digest in the registry
    (``sha256:...``): a manifest list's when the image was built for several platforms.
    ``reused``: ``True`` if the tag was in the registry already (nothing built). ``seconds``:
    wall time spent on this image (build and push, or the registry check).
    ``platform_digests``: ``{"linux/amd64": "sha256:...", ...}``, the image manifest of each
    platform (for a single-platform image, its own digest; empty if not known).
    """

    role: str
    repository: str
    tag: str
    digest: str
    reused: bool
    seconds: float
    platform_digests: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def ref(self) -> str:
        """``repository:tag``."""
        return f"{self.repository}:{self.tag}"

    @property
    def pinned_ref(self) -> str:
        """``repository@digest``: what an orchestrator should deploy."""
        return f"{self.repository}@{self.digest}"

    @property
    def is_manifest_list(self) -> bool:
        """``True`` if :attr:`digest` names a manifest list (several platforms)."""
        return len(self.platform_digests) > 1


@dataclass(frozen=True)
class BuiltImages:
    """The learner and aggregator images of one project's inputs.

    ``commit``: git SHA (40 hex) or content hash (64 hex) of a plain directory. ``key``: the
    shared tag (:meth:`OciBuilder.image_key`). ``cache_hit``: both images were reused.
    ``seconds``: wall time of :meth:`OciBuilder.build`. ``platforms``: the ``os/arch`` values
    built, sorted.
    """

    learner: BuiltImage
    aggregator: BuiltImage
    commit: str
    key: str
    cache_hit: bool
    seconds: float
    platforms: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[BuiltImage, BuiltImage]:
        """``(learner, aggregator)``."""
        return (self.learner, self.aggregator)


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


@dataclass(frozen=True)
class _Staged:
    """What :meth:`OciBuilder._stage_context` wrote: ``hashes`` (context directory → content
    hash, keyed into the image key) and ``user_lines`` (the repository's requirement lines to
    install, local paths relative to the repository as in its dependency file)."""

    hashes: dict[str, str]
    user_lines: list[str]


class OciBuilder:
    """Builds and pushes learner and aggregator images with buildah.

    ``cache_dir``: build locks and logs (created if missing). ``registry``: ``host[:port]`` the
    images are pushed to, e.g. ``"127.0.0.1:5000"``; ``namespace``: path under it (default
    ``"flops"``). ``base_image``: full reference of an image with Python 3.11 (matching the
    manager, whose package versions are pinned) and ``useradd``, e.g.
    ``"registry.local/flops/base:bookworm"``; for multi-platform builds a manifest list with
    every platform (the non-host entries need Python and glibc only, nothing is run in them).
    ``python``: the interpreter's name or path in the base image (default ``"python3"``).
    ``tls_verify``: ``False`` for a plain-HTTP registry (both the target and the base image's).
    Timeouts are seconds: ``build_timeout_s`` per ``buildah build`` or host-side uv run
    (default 1800), ``push_timeout_s`` per push or base image pull (default 900),
    ``registry_timeout_s`` per registry query (default 60), ``lock_timeout_s`` to wait for a
    concurrent build of the same key (default 3600), ``git_timeout_s`` per git command.
    """

    produces_images = True
    """This backend makes OCI images in a registry (orchestrator compatibility check)."""

    def __init__(
        self,
        cache_dir: Path,
        registry: str,
        base_image: str,
        *,
        namespace: str = "flops",
        python: str = "python3",
        tls_verify: bool = True,
        build_timeout_s: float = 1800.0,
        push_timeout_s: float = 900.0,
        registry_timeout_s: float = 60.0,
        lock_timeout_s: float = 3600.0,
        git_timeout_s: float = DEFAULT_GIT_TIMEOUT_S,
    ) -> None:
        self.cache_dir = Path(cache_dir).resolve()
        self.registry = registry.rstrip("/")
        self.base_image = base_image
        self.namespace = namespace.strip("/")
        self.python = python
        self.tls_verify = tls_verify
        self.build_timeout_s = build_timeout_s
        self.push_timeout_s = push_timeout_s
        self.registry_timeout_s = registry_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.git_timeout_s = git_timeout_s

    # -- inputs ------------------------------------------------------------------------
    @cached_property
    def installed_versions(self) -> dict[str, str]:
        """The manager's distributions (:func:`~image_builder.python_env.manager_versions`)."""
        return manager_versions()

    @cached_property
    def learner_pins(self) -> list[str]:
        """:data:`LEARNER_PACKAGES` at the manager's versions (both images)."""
        return runtime_pins(LEARNER_PACKAGES)

    @cached_property
    def aggregator_pins(self) -> list[str]:
        """:data:`AGGREGATOR_EXTRA_PACKAGES` at the manager's versions (aggregator only)."""
        return runtime_pins(AGGREGATOR_EXTRA_PACKAGES)

    @cached_property
    def templates_hash(self) -> str:
        """SHA-256 (hex) of :data:`TEMPLATE_FILES`."""
        digest = hashlib.sha256()
        for name in TEMPLATE_FILES:
            digest.update(name.encode() + b"\0" + (TEMPLATES / name).read_bytes())
        return digest.hexdigest()

    def repository(self, role: str) -> str:
        """``registry/namespace/role``: where the ``role`` image is pushed."""
        return "/".join(part for part in (self.registry, self.namespace, role) if part)

    def image_key(
        self,
        commit: str,
        dependencies_hash: str,
        base_digest: str,
        flavor: str,
        platform: str,
        staged: Mapping[str, str],
    ) -> str:
        """Return the 32-hex tag of the images for these inputs.

        Hashes :data:`IMAGE_FORMAT_VERSION`, ``commit``, ``dependencies_hash``, the base image's
        ``base_digest`` (not its name: a registry that moves keeps its images' keys; a manifest
        list's digest covers every platform's image), ``flavor``, ``platform`` (the platform
        set: ``linux/amd64`` or ``linux/amd64,linux/arm64``, sorted), the base image's
        interpreter name, the runtime pins, :data:`UNUSED_DEPENDENCIES`, the manager's
        distribution versions (the constraints), ``staged`` (build context directory → content
        hash: the generated requirement and constraint files and the FLOps runtime code copied
        into each image) and :attr:`templates_hash`.
        """
        material = {
            "format": IMAGE_FORMAT_VERSION,
            "commit": commit,
            "dependencies": dependencies_hash,
            "base": base_digest,
            "flavor": flavor,
            "platform": platform,
            "python": self.python,
            "uid": IMAGE_UID,
            "pins": [*self.learner_pins, *self.aggregator_pins],
            "excludes": list(UNUSED_DEPENDENCIES),
            "runtime_env": sorted(f"{n}=={v}" for n, v in self.installed_versions.items()),
            "staged": dict(sorted(staged.items())),
            "templates": self.templates_hash,
        }
        encoded = json.dumps(material, sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:32]

    @staticmethod
    def platforms(
        platform: str | None = None, platforms: Sequence[str] | None = None
    ) -> tuple[str, ...]:
        """The sorted, de-duplicated platform set a build makes (``("linux/amd64",)``).

        ``platforms``: the SLA's ``supported_platforms``; else ``[platform]``; else this
        machine's platform. Raises :class:`ImageBuildError` for an empty set or a platform not
        in :data:`PLATFORMS`, and ``ValueError`` if both arguments are given.
        """
        if platform is not None and platforms is not None:
            raise ValueError("pass platform or platforms, not both")
        requested = list(platforms) if platforms is not None else [platform or host_platform()]
        if not requested:
            raise ImageBuildError(
                f"No platform to build for; name at least one of {', '.join(PLATFORMS)} in "
                "supported_platforms."
            )
        unknown = sorted({name for name in requested if name not in PLATFORMS})
        if unknown:
            raise ImageBuildError(
                f"Building {', '.join(unknown)} images is not supported; FLOps builds "
                f"{' and '.join(PLATFORMS)} images, fix supported_platforms."
            )
        return tuple(sorted(set(requested)))

    # -- the build ---------------------------------------------------------------------
    def build(
        self,
        ml_repo_url: str,
        ref: str | None,
        workdir: Path,
        *,
        flavor: str = MLModelFlavor.PYTORCH,
        platform: str | None = None,
        platforms: Sequence[str] | None = None,
    ) -> BuiltImages:
        """Return the learner and aggregator images for ``ml_repo_url`` at ``ref``, building
        and pushing the ones the registry lacks.

        ``ref``: branch, tag or commit; ``None`` for the default branch. ``workdir``: scratch
        directory for the clone and the build context (created if missing; cleaned).
        ``flavor``: the SLA's ``ml_model_flavor`` (default ``pytorch``, as in the SLA).
        ``platforms``: ``os/arch`` values (the SLA's ``supported_platforms``, any of
        :data:`PLATFORMS`): two or more give one manifest list per role; ``platform``: a single
        one; default: this machine's. Raises the repository errors of
        :func:`~image_builder.repo.checked_out_repo`,
        :class:`~image_builder.errors.BuildToolMissingError` (buildah or skopeo missing),
        ``RegistryUnreachableError``, ``BaseImageError`` (missing, lacking a platform, or unfit
        for assembling another platform's image), ``DependencyInstallError`` (a requirement
        cannot be installed, or has no wheel for a non-host platform; uv's message condensed),
        ``ImageBuildError`` (a failed build step with its last output lines, an unsupported
        platform or flavor, a timeout) and ``ImagePushError``; ``ValueError`` if both
        ``platform`` and ``platforms`` are given.
        """
        started = time.monotonic()
        targets = self.platforms(platform, platforms)
        buildah, skopeo = _require_tools()
        if flavor not in {member.value for member in MLModelFlavor}:
            raise ImageBuildError(
                f"Unknown ML model flavor {flavor!r}; use one of "
                f"{', '.join(member.value for member in MLModelFlavor)}."
            )
        base_digest, base_refs = self._base_refs(skopeo, targets)
        workdir = Path(workdir)
        with checked_out_repo(
            ml_repo_url, ref, workdir, timeout_s=self.git_timeout_s, exclude=[self.cache_dir]
        ) as checked_out:
            context = Path(tempfile.mkdtemp(prefix="oci-context-", dir=workdir))
            try:
                staged = self._stage_context(context, checked_out)
                commit = checked_out.fetched.commit
                key = self.image_key(
                    commit, checked_out.dependencies_hash, base_digest, str(flavor),
                    ",".join(targets), staged.hashes,
                )  # fmt: skip
                labels = {
                    "org.opencontainers.image.source": checked_out.fetched.source,
                    "org.opencontainers.image.revision": commit,
                    "org.opencontainers.image.base.name": self.base_image,
                    "org.opencontainers.image.base.digest": base_digest,
                    LABEL_INPUTS_HASH: key,
                    "org.flops.dependencies-hash": checked_out.dependencies_hash,
                    "org.flops.ml-model-flavor": str(flavor),
                }
                images = self._build_roles(buildah, skopeo, context, key, base_refs, labels, staged)
            finally:
                shutil.rmtree(context, ignore_errors=True)
        seconds = time.monotonic() - started
        cache_hit = all(image.reused for image in images.values())
        logger.info(
            "images %s (%s) for %s@%s %s in %.2f s",
            key, ",".join(targets), checked_out.fetched.source, commit[:12],
            "reused" if cache_hit else "built", seconds,
        )  # fmt: skip
        return BuiltImages(
            learner=images["learner"],
            aggregator=images["aggregator"],
            commit=commit,
            key=key,
            cache_hit=cache_hit,
            seconds=seconds,
            platforms=targets,
        )

    def _build_roles(
        self,
        buildah: str,
        skopeo: str,
        context: Path,
        key: str,
        base_refs: Mapping[str, str],
        labels: Mapping[str, str],
        staged: _Staged,
    ) -> dict[str, BuiltImage]:
        """Reuse or build each role's image; builds of one key are serialized by a lock.

        ``base_refs``: platform → ``FROM`` reference (``name@sha256:...``), sorted by platform.
        """
        platforms = tuple(base_refs)
        images: dict[str, BuiltImage] = {}
        for role in ROLES:
            reused = self._find_reusable_for(skopeo, role, key, platforms)
            if reused is not None:
                images[role] = reused
        if len(images) == len(ROLES):
            return images
        locks = self.cache_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "logs").mkdir(parents=True, exist_ok=True)
        with file_lock(locks / f"{key}.lock", self.lock_timeout_s, error=ImageBuildError):
            missing = []
            for role in ROLES:
                if role in images:
                    continue
                reused = self._find_reusable_for(skopeo, role, key, platforms)  # built meanwhile
                if reused is None:
                    missing.append(role)
                else:
                    images[role] = reused
            if missing:
                trees = self._prepare(buildah, context, base_refs, staged)
                for role in missing:
                    images[role] = self._build_role(
                        buildah, skopeo, context, role, key, base_refs, labels, trees
                    )
        return images

    def _build_role(
        self,
        buildah: str,
        skopeo: str,
        context: Path,
        role: str,
        key: str,
        base_refs: Mapping[str, str],
        labels: Mapping[str, str],
        trees: Mapping[str, _CrossTree],
    ) -> BuiltImage:
        """Build ``role`` for every platform of ``base_refs`` and push it: the image itself for
        one platform, a manifest list of them for several."""
        started = time.monotonic()
        multi = len(base_refs) > 1
        local: dict[str, str] = {}
        for platform, base_ref in base_refs.items():
            target = PLATFORMS[platform]
            suffix = f"-{target.arch}" if multi else ""
            tag = f"{self.repository(role)}:{key}{suffix}"
            image_labels = {
                **labels,
                "org.opencontainers.image.base.digest": base_ref.split("@")[-1],
            }
            if platform in trees:
                tree = trees[platform]
                text = render_cross_containerfile(
                    role, base_ref, tree.directory, image_labels, deps_dir=tree.deps_dir(role)
                )
            else:
                text = render_containerfile(role, base_ref, self.python, image_labels)
            containerfile = context / f"Containerfile.{role}{suffix}"
            containerfile.write_text(text, encoding="utf-8")
            self._buildah_build(
                buildah, context, containerfile, role, key, platform, tag=tag,
                log_name=f"{key}-{role}{suffix}",
            )  # fmt: skip
            local[platform] = tag
        if multi:
            digest, platform_digests = self._push_manifest_list(buildah, skopeo, role, key, local)
        else:
            digest = self._push(buildah, skopeo, role, key)
            platform_digests = {next(iter(base_refs)): digest}
        return BuiltImage(
            role=role,
            repository=self.repository(role),
            tag=key,
            digest=digest,
            reused=False,
            seconds=time.monotonic() - started,
            platform_digests=platform_digests,
        )

    def _stage_context(self, context: Path, checked_out: CheckedOutRepo) -> _Staged:
        """Write the build context; return the content hash of each directory in it but the
        repository and the tools (those are keyed by the commit; uv's binary does not change
        what is installed), and the repository's lines to install.

        Layout: ``build/`` (requirements.txt, constraints.txt, install.sh,
        slim_site_packages.py; excludes.txt is added by :meth:`_prepare`), ``<role>-build/
        requirements.txt``, ``<role>-runtime/`` (FLOps code), ``repo/`` (the repository),
        ``tools/uv`` and, when ``SSL_CERT_FILE`` names a file, ``tools/ca-certificates.crt``.
        """
        user_lines, constraints = plan_install(
            checked_out.requirements,
            (*RUNTIME_PACKAGES, *AGGREGATOR_EXTRA_PACKAGES),
            self.installed_versions,
        )
        install_lines = resolve_local_paths(user_lines, REPO_MOUNT)
        header = ["# generated by the FLOps oci builder"]
        if install_lines != user_lines:
            # The repository is mounted, not copied, for the install step, and buildah's layer
            # cache does not see mounted files: key the dependency layer by the whole commit.
            header.append(f"# names local paths of the repository at {checked_out.fetched.commit}")
        build = context / "build"
        build.mkdir()
        _write_lines(build / "requirements.txt", [*header, *install_lines, *self.learner_pins])
        # The aggregator's extras are runtime packages (a repository's clashing pin on them is
        # dropped) and constraints too, so that the learner gets the same pydantic, if any.
        extras = [pin for pin in self.aggregator_pins if "==" in pin]
        _write_lines(build / "constraints.txt", sorted([*constraints, *extras]))
        for name in ("install.sh", "slim_site_packages.py"):
            shutil.copyfile(TEMPLATES / name, build / name)
        _write_lines(context / "learner-build" / "requirements.txt", [])
        _write_lines(
            context / "aggregator-build" / "requirements.txt",
            ["-r /opt/flops/build/requirements.txt", *self.aggregator_pins],
        )
        for role in ROLES:
            for entry in ROLE_SOURCES[role]:
                _copy_source(entry, context / f"{role}-runtime")
        hashes = {
            directory.name: content_hash(directory)
            for directory in sorted(context.iterdir())
            if directory.is_dir()
        }
        copy_repo_files(checked_out.fetched.path, context / "repo")
        (context / "tools").mkdir()
        _link_or_copy(uv_binary(), context / "tools" / "uv")
        ca_bundle = os.environ.get("SSL_CERT_FILE", "")
        if ca_bundle and Path(ca_bundle).is_file():
            # uv on this machine trusts this bundle (e.g. a proxy's CA); so does uv in the build
            shutil.copyfile(ca_bundle, context / "tools" / "ca-certificates.crt")
        return _Staged(hashes=hashes, user_lines=user_lines)

    # -- dependencies resolved on this machine ----------------------------------------
    def _prepare(
        self, buildah: str, context: Path, base_refs: Mapping[str, str], staged: _Staged
    ) -> dict[str, _CrossTree]:
        """Before the first build of a key: write the excludes files (``build/excludes.txt``
        for the shared dependency layer, ``<role>-build/excludes.txt``) and assemble the
        environment of every platform other than this machine's; returns those, by platform.

        Raises :class:`BaseImageError` (a base image unfit for assembling) and
        :class:`DependencyInstallError` (the requirements cannot be resolved, or a dependency
        has no wheel for a platform).
        """
        started = time.monotonic()
        host = host_platform()
        facts = {
            platform: self._read_base(buildah, ref, PLATFORMS[platform])
            for platform, ref in base_refs.items()
            if platform != host
        }
        uv_platforms = {
            platform: facts[platform].uv_platform(PLATFORMS[platform]) if platform in facts else ""
            for platform in base_refs
        }
        host_lines = resolve_local_paths(staged.user_lines, context / "repo")
        excludes = self._excludes(context, host_lines, uv_platforms)
        _write_lines(context / "build" / "excludes.txt", excludes["learner"])
        for role in ROLES:
            _write_lines(context / f"{role}-build" / "excludes.txt", excludes[role])
        logger.info(
            "leaving out %s (learner), %s (aggregator)",
            ", ".join(excludes["learner"]) or "nothing",
            ", ".join(excludes["aggregator"]) or "nothing",
        )
        trees = {
            platform: self._platform_tree(
                context, PLATFORMS[platform], facts[platform], host_lines, staged
            )
            for platform in facts
        }
        logger.info("prepared the dependencies in %.1f s", time.monotonic() - started)
        return trees

    def _excludes(
        self, context: Path, host_lines: Sequence[str], uv_platforms: Mapping[str, str]
    ) -> dict[str, list[str]]:
        """``{role: names}``: :data:`UNUSED_DEPENDENCIES` minus every distribution the role's
        own requirements resolve to on any of the platforms.

        The learner's own requirements are the repository's (``host_lines``, local paths
        absolute); the aggregator's add MLflow and pydantic, so MLflow keeps what it needs
        (uvicorn, python-dotenv, ...). ``uv_platforms``: platform → uv's
        ``--python-platform`` value, ``""`` for this machine's. Raises
        :class:`DependencyInstallError` when they cannot be resolved.
        """
        roots = {"learner": list(host_lines), "aggregator": [*host_lines, *self.aggregator_pins]}
        excludes = {}
        for role, lines in roots.items():
            needed = self._resolved_names(context, role, lines, uv_platforms) if lines else set()
            excludes[role] = [
                name for name in UNUSED_DEPENDENCIES if canonicalize_name(name) not in needed
            ]
        return excludes

    def _resolved_names(
        self, context: Path, role: str, lines: Sequence[str], uv_platforms: Mapping[str, str]
    ) -> set[str]:
        """Normalized names of the distributions ``lines`` resolve to (``uv pip compile``,
        with the manager's constraints, offline first), on every platform of
        ``uv_platforms``."""
        host = context / "host"
        host.mkdir(exist_ok=True)
        source = host / f"{role}-own.in"
        _write_lines(source, lines)
        names: set[str] = set()
        for platform, uv_platform in uv_platforms.items():
            output = host / f"{role}-own-{PLATFORMS[platform].arch}.txt"
            args = [
                "pip", "compile", "--quiet", "--no-header", "--no-annotate",
                "--output-file", str(output), *self._uv_target(uv_platform), str(source),
            ]  # fmt: skip
            mode, errors = run_uv_with_fallbacks(
                self._host_uv, args, context / "build" / "constraints.txt"
            )
            if mode is None:
                raise install_failure(platform, errors)
            for line in output.read_text(encoding="utf-8").splitlines():
                name = requirement_name(line.split(";")[0].strip()) if line[:1].isalnum() else None
                if name:
                    names.add(name)
        return names

    def _platform_tree(
        self,
        context: Path,
        target: TargetPlatform,
        facts: BaseFacts,
        host_lines: Sequence[str],
        staged: _Staged,
    ) -> _CrossTree:
        """The ``target`` environment (:meth:`_assemble`) hard-linked into
        ``context/cross-<arch>/``, from ``cache_dir/platforms/`` when the same inputs were
        assembled before.

        Reusing the very files (same contents and times) lets buildah's layer cache reuse the
        ``COPY`` layers and the registry skip their blobs: without it a code-only change
        re-assembled and re-pushed the whole 580 MB dependency layer (73 s instead of seconds).
        Keyed by the generated requirement and constraint files, the excludes, the target and
        its wheel tag, the base image's facts, the templates and the Python version; the
        :data:`PLATFORM_TREES_KEPT` most recently used environments are kept.
        """
        material = {
            "format": IMAGE_FORMAT_VERSION,
            "build": staged.hashes.get("build"),
            "aggregator-build": staged.hashes.get("aggregator-build"),
            "excludes": [
                (context / name / "excludes.txt").read_text(encoding="utf-8")
                for name in ("build", "aggregator-build")
            ],
            "platform": target.name,
            "wheels": facts.uv_platform(target),
            "base": [facts.python, facts.version, facts.glibc, facts.passwd, facts.group],
            "uid": IMAGE_UID,
            "templates": self.templates_hash,
            "python": sys.version_info[:3],
        }
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
        trees = self.cache_dir / "platforms"
        trees.mkdir(parents=True, exist_ok=True)
        cached = trees / f"{target.arch}-{key}"
        with file_lock(trees / f"{cached.name}.lock", self.lock_timeout_s, error=ImageBuildError):
            if not (cached / "tree.json").is_file():
                staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=trees))
                try:
                    shared = self._assemble(
                        staging / "tree", staging / "work", context, target, facts, host_lines
                    )
                    (staging / "tree.json").write_text(
                        json.dumps({"aggregator_shares_deps": shared}), encoding="utf-8"
                    )
                    shutil.rmtree(cached, ignore_errors=True)
                    staging.rename(cached)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            else:
                logger.info("reusing the assembled %s environment %s", target.name, key)
            os.utime(cached / "tree.json")  # most recently used
            shared = bool(json.loads((cached / "tree.json").read_text())["aggregator_shares_deps"])
            directory = f"cross-{target.arch}"
            _link_tree(cached / "tree", context / directory)
        _evict_oldest(trees, PLATFORM_TREES_KEPT)
        return _CrossTree(directory=directory, aggregator_shares_deps=shared)

    def _assemble(
        self,
        root: Path,
        work: Path,
        context: Path,
        target: TargetPlatform,
        facts: BaseFacts,
        host_lines: Sequence[str],
    ) -> bool:
        """Assemble ``/opt/flops/venv`` and the user files of the ``target`` images on this
        machine, in ``root`` (:data:`Containerfile.cross.in`'s sources), using ``work``.

        ``deps/``: the learner's environment (what the shared dependency layer holds);
        ``aggregator-extras/``: the files the aggregator's install added (or, when that install
        removed files of the learner's, ``aggregator-deps/``: its whole environment, and an
        empty ``aggregator-extras/``); ``learner-extras/``: empty; ``etc/``: ``passwd`` and
        ``group`` with the ``flops`` user; ``home/flops/``. Returns whether the aggregator
        shares ``deps/``. Reads the generated files of ``context``.
        """
        started = time.monotonic()
        host = context / "host"
        host.mkdir(exist_ok=True)
        learner_requirements = host / f"learner-{target.arch}.txt"
        _write_lines(learner_requirements, [*host_lines, *self.learner_pins])
        aggregator_requirements = host / f"aggregator-{target.arch}.txt"
        _write_lines(aggregator_requirements, [f"-r {learner_requirements}", *self.aggregator_pins])
        uv_platform = facts.uv_platform(target)
        constraints = context / "build" / "constraints.txt"
        self._install_for(
            work, learner_requirements, context / "build" / "excludes.txt", target, facts,
            uv_platform, constraints,
        )  # fmt: skip
        _link_tree(work, root / "deps")
        before = _tree_snapshot(work)
        self._install_for(
            work, aggregator_requirements, context / "aggregator-build" / "excludes.txt",
            target, facts, uv_platform, constraints,
        )  # fmt: skip
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
        (etc / "passwd").write_text(
            add_passwd_user(facts.passwd, IMAGE_USER, IMAGE_UID, f"/home/{IMAGE_USER}"),
            encoding="utf-8",
        )
        (etc / "group").write_text(add_group(facts.group, IMAGE_USER, IMAGE_UID), encoding="utf-8")
        (root / "home" / IMAGE_USER).mkdir(parents=True)
        shutil.rmtree(work)
        logger.info(
            "assembled the %s environment (%s) in %.1f s",
            target.name, uv_platform, time.monotonic() - started,
        )  # fmt: skip
        return shared

    def _install_for(
        self,
        venv: Path,
        requirements: Path,
        excludes: Path,
        target: TargetPlatform,
        facts: BaseFacts,
        uv_platform: str,
        constraints: Path,
    ) -> None:
        """Install ``requirements`` into ``venv`` (laid out as :data:`VENV` will be) for
        ``target``, remove the test suites, point console scripts and ``bin/python`` at the
        image's interpreter and check that every ELF file is a ``target`` binary."""
        site_packages = venv / "lib" / f"python{facts.version}" / "site-packages"
        args = [
            "pip", "install", "--quiet", "--target", str(site_packages),
            *self._uv_target(uv_platform), "-r", str(requirements),
        ]  # fmt: skip
        if excludes.is_file() and excludes.stat().st_size:
            args += ["--excludes", str(excludes)]
        mode, errors = run_uv_with_fallbacks(self._host_uv, args, constraints)
        if mode is None:
            raise install_failure(target.name, errors)
        _move_scripts(site_packages / "bin", venv / "bin", f"{VENV}/bin/python")
        _write_venv_skeleton(venv, facts)
        slim = _run(
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

    def _uv_target(self, uv_platform: str) -> list[str]:
        """uv options selecting the interpreter and, for another platform (``uv_platform``
        not empty), its wheels: binary only, for the manager's Python minor version."""
        options = ["--python", base_interpreter()]
        if uv_platform:
            options += [
                "--python-version", _python_version(), "--python-platform", uv_platform,
                "--only-binary", ":all:",
            ]  # fmt: skip
        return options

    def _host_uv(self, arguments: list[str]) -> tuple[int, str]:
        """Run uv (:func:`~image_builder.python_env.uv_binary`, the one builds mount) here with
        the host's uv cache and bytecode compilation; ``(exit status, stderr)``."""
        env = {
            name: value
            for name, value in os.environ.items()
            if name not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")
        }
        env.update(
            NO_COLOR="1", UV_NO_PROGRESS="1", UV_PYTHON_DOWNLOADS="never",
            UV_COMPILE_BYTECODE="1", UV_CACHE_DIR=str(self._uv_cache_dir),
            SOURCE_DATE_EPOCH=BYTECODE_EPOCH,
        )  # fmt: skip
        try:
            result = subprocess.run(
                [str(uv_binary()), *arguments],
                env=env,
                capture_output=True,
                text=True,
                timeout=self.build_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ImageBuildError(
                f"uv {' '.join(arguments[:2])} did not finish within {self.build_timeout_s:.0f} "
                "s; check the package index connection, or raise build_timeout_s."
            ) from None
        return result.returncode, result.stderr

    def _read_base(self, buildah: str, base_ref: str, target: TargetPlatform) -> BaseFacts:
        """Pull ``base_ref`` for ``target``, mount it and read :class:`BaseFacts` from its
        files (:func:`read_base_facts`); nothing in it runs."""
        command = [
            buildah, "from", "--quiet", "--pull", "--platform", target.name,
            f"--tls-verify={str(self.tls_verify).lower()}", f"docker://{base_ref}",
        ]  # fmt: skip
        result = _run(command, self.push_timeout_s, f"buildah from {base_ref}")
        if result.returncode != 0:
            raise BaseImageError(
                f"Cannot pull the {target.name} base image {base_ref}: "
                f"{condense_tool_error(result.stderr)}; check the base image and its registry."
            )
        container = result.stdout.strip().splitlines()[-1]
        try:
            mounted = _run([buildah, "mount", container], 120, "buildah mount")
            if mounted.returncode != 0:
                raise ImageBuildError(
                    f"Cannot mount the {target.name} base image: "
                    f"{condense_tool_error(mounted.stderr)}; the oci builder needs root."
                )
            return read_base_facts(Path(mounted.stdout.strip()), self.python, target)
        finally:
            _run([buildah, "rm", container], 120, "buildah rm")

    # -- registry ----------------------------------------------------------------------
    def _resolve_base(self, skopeo: str) -> tuple[str, str]:
        """``(base image name without tag or digest, manifest digest)`` of :attr:`base_image`."""
        info = self._inspect(skopeo, self.base_image)
        if info is None:
            raise BaseImageError(
                f"The base image {self.base_image} does not exist in its registry; push it "
                "there or configure another base image."
            )
        return strip_tag(self.base_image), str(info["Digest"])

    def _base_refs(self, skopeo: str, platforms: Sequence[str]) -> tuple[str, dict[str, str]]:
        """``(digest of base_image, {platform: FROM reference name@sha256:...})``.

        A manifest list gives each platform its entry; a single image serves only its own
        platform. Raises :class:`BaseImageError` if the image is missing or lacks a platform.
        """
        raw = self._inspect_raw(skopeo, self.base_image)
        if raw is None:
            raise BaseImageError(
                f"The base image {self.base_image} does not exist in its registry; push it "
                "there or configure another base image."
            )
        name = strip_tag(self.base_image)
        digest = manifest_digest(raw)
        entries = manifest_entries(json.loads(raw))
        if not entries:
            info = self._inspect(skopeo, f"{name}@{digest}") or {}
            entries = {f"{info.get('Os', 'linux')}/{info.get('Architecture', '')}": digest}
        missing = [platform for platform in platforms if platform not in entries]
        if missing:
            raise BaseImageError(
                f"The base image {self.base_image} has no {' or '.join(missing)} image (it "
                f"has {', '.join(sorted(entries))}); push a manifest list with every platform "
                "in supported_platforms, or build for fewer platforms."
            )
        return digest, {platform: f"{name}@{entries[platform]}" for platform in platforms}

    def _find_reusable(
        self, skopeo: str, role: str, key: str, platform: str | None = None
    ) -> BuiltImage | None:
        """The ``role`` image tagged ``key`` if the registry has it with matching inputs.

        ``platform``: the image's ``os/arch``, recorded in ``platform_digests``.
        """
        started = time.monotonic()
        info = self._inspect(skopeo, f"{self.repository(role)}:{key}")
        labels = (info or {}).get("Labels") or {}
        if info is None or labels.get(LABEL_INPUTS_HASH) != key:
            return None
        digest = str(info["Digest"])
        return BuiltImage(
            role=role,
            repository=self.repository(role),
            tag=key,
            digest=digest,
            reused=True,
            seconds=time.monotonic() - started,
            platform_digests={platform: digest} if platform else {},
        )

    def _find_reusable_for(
        self, skopeo: str, role: str, key: str, platforms: Sequence[str]
    ) -> BuiltImage | None:
        """:meth:`_find_reusable` for one platform; for several, the manifest list tagged
        ``key`` if it holds exactly ``platforms`` and its first image has matching inputs."""
        if len(platforms) == 1:
            return self._find_reusable(skopeo, role, key, platforms[0])
        started = time.monotonic()
        raw = self._inspect_raw(skopeo, f"{self.repository(role)}:{key}")
        if raw is None:
            return None
        entries = manifest_entries(json.loads(raw))
        if sorted(entries) != sorted(platforms):
            return None
        info = self._inspect(skopeo, f"{self.repository(role)}@{entries[platforms[0]]}")
        if info is None or ((info.get("Labels") or {}).get(LABEL_INPUTS_HASH) != key):
            return None
        return BuiltImage(
            role=role,
            repository=self.repository(role),
            tag=key,
            digest=manifest_digest(raw),
            reused=True,
            seconds=time.monotonic() - started,
            platform_digests=entries,
        )

    def _inspect(self, skopeo: str, image: str) -> dict[str, Any] | None:
        """``skopeo inspect`` of ``image`` (``host/path:tag``); ``None`` if it does not exist.

        Raises :class:`RegistryUnreachableError` for any other failure (connection, TLS,
        authentication), with skopeo's reason in the message.
        """
        output = self._skopeo_inspect(skopeo, image)
        if output is None:
            return None
        parsed: dict[str, Any] = json.loads(output)
        return parsed

    def _inspect_raw(self, skopeo: str, image: str) -> str | None:
        """The manifest (or manifest list) of ``image`` as the registry serves it
        (``skopeo inspect --raw``); ``None`` if it does not exist. Errors as :meth:`_inspect`."""
        return self._skopeo_inspect(skopeo, image, "--raw")

    def _skopeo_inspect(self, skopeo: str, image: str, *options: str) -> str | None:
        command = [
            skopeo, "inspect", *options, f"--tls-verify={str(self.tls_verify).lower()}",
            "--retry-times", "2", f"docker://{image}",
        ]  # fmt: skip
        result = _run(command, self.registry_timeout_s, f"skopeo inspect {image}")
        if result.returncode == 0:
            return result.stdout
        reason = condense_tool_error(result.stderr)
        if _NOT_FOUND.search(reason):
            return None
        host = image.split("/", 1)[0]
        fix = "log in with `buildah login " + host + "`" if "unauthorized" in reason.lower() else (
            "start it, or fix the registry address and its TLS setting"
        )  # fmt: skip
        raise RegistryUnreachableError(
            f"Cannot use the image registry {host}: {reason}; {fix}.", details=[result.stderr]
        )

    # -- buildah -----------------------------------------------------------------------
    def _buildah_build(
        self,
        buildah: str,
        context: Path,
        containerfile: Path,
        role: str,
        key: str,
        platform: str,
        *,
        tag: str | None = None,
        log_name: str | None = None,
    ) -> None:
        """Run ``buildah build`` for ``platform``; the image is named ``tag`` (default
        ``repository(role):key``) and the output goes to ``cache_dir/logs/<log_name>.log``
        (default ``<key>-<role>``)."""
        log_path = self.cache_dir / "logs" / f"{log_name or f'{key}-{role}'}.log"
        command = [
            buildah, "build", "--isolation", "chroot", "--layers", "--force-rm",
            "--platform", platform, f"--tls-verify={str(self.tls_verify).lower()}",
            "--volume", f"{self._uv_cache_dir}:/mnt:O",
            "-f", str(containerfile), "-t", tag or f"{self.repository(role)}:{key}", str(context),
        ]  # fmt: skip
        started = time.monotonic()
        logger.info(
            "building the %s image %s:%s for %s", role, self.repository(role), key, platform
        )
        with log_path.open("w", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode = process.wait(timeout=self.build_timeout_s)
            except subprocess.TimeoutExpired:
                stop_process_groups([process])
                raise ImageBuildError(
                    f"Building the {role} image did not finish within "
                    f"{self.build_timeout_s:.0f} s; see {log_path}, or raise build_timeout_s."
                ) from None
        output = log_path.read_text(encoding="utf-8", errors="replace")
        if returncode != 0:
            raise build_failure(role, output, log_path)
        logger.info("built the %s image in %.1f s", role, time.monotonic() - started)

    def _push(self, buildah: str, skopeo: str, role: str, key: str) -> str:
        """Push ``role:key``; return its digest after checking it against the registry."""
        ref = f"{self.repository(role)}:{key}"
        digest_file = self.cache_dir / "logs" / f"{key}-{role}.digest"
        command = [
            buildah, "push", f"--tls-verify={str(self.tls_verify).lower()}",
            "--digestfile", str(digest_file), ref, f"docker://{ref}",
        ]  # fmt: skip
        result = _run(command, self.push_timeout_s, f"buildah push {ref}")
        if result.returncode != 0:
            reason = condense_tool_error(result.stderr)
            raise ImagePushError(
                f"Cannot push {ref}: {reason}; check that the registry is up and accepts pushes.",
                details=[result.stderr[-4000:]],
            )
        pushed = digest_file.read_text().strip()
        info = self._inspect(skopeo, ref)
        found = None if info is None else str(info["Digest"])
        if found != pushed:
            raise ImagePushError(
                f"The registry holds {found or 'nothing'} as {ref} after pushing {pushed}; "
                "another client may have pushed the same tag, retry the build."
            )
        return pushed

    def _push_manifest_list(
        self, buildah: str, skopeo: str, role: str, key: str, images: Mapping[str, str]
    ) -> tuple[str, dict[str, str]]:
        """Push the local ``images`` (platform → local name) as one manifest list tagged
        ``role:key``, with every image (``buildah manifest push --all``).

        Returns ``(list digest, {platform: image digest})`` as the registry holds them, after
        checking that ``skopeo inspect --raw`` of the tag has the pushed digest and exactly
        these platforms. Raises :class:`ImagePushError` (or :class:`ImageBuildError` when the
        list cannot be made locally).
        """
        ref = f"{self.repository(role)}:{key}"
        tls = f"--tls-verify={str(self.tls_verify).lower()}"
        if (
            _run([buildah, "manifest", "exists", ref], 60, "buildah manifest exists").returncode
            == 0
        ):
            _run([buildah, "manifest", "rm", ref], 120, "buildah manifest rm")  # interrupted run
        steps = [[buildah, "manifest", "create", ref]] + [
            [buildah, "manifest", "add", ref, f"containers-storage:{image}"]
            for image in images.values()
        ]
        for command in steps:
            result = _run(command, 120, f"buildah manifest {command[2]}")
            if result.returncode != 0:
                raise ImageBuildError(
                    f"Cannot make the manifest list {ref}: {condense_tool_error(result.stderr)}; "
                    "retry the build."
                )
        digest_file = self.cache_dir / "logs" / f"{key}-{role}.digest"
        command = [
            buildah, "manifest", "push", "--all", "--rm", tls, "--digestfile", str(digest_file),
            ref, f"docker://{ref}",
        ]  # fmt: skip
        result = _run(command, self.push_timeout_s * len(images), f"buildah manifest push {ref}")
        if result.returncode != 0:
            reason = condense_tool_error(result.stderr)
            raise ImagePushError(
                f"Cannot push {ref}: {reason}; check that the registry is up and accepts pushes.",
                details=[result.stderr[-4000:]],
            )
        pushed = digest_file.read_text().strip()
        raw = self._inspect_raw(skopeo, ref)
        found = None if raw is None else manifest_digest(raw)
        if found != pushed:
            raise ImagePushError(
                f"The registry holds {found or 'nothing'} as {ref} after pushing {pushed}; "
                "another client may have pushed the same tag, retry the build."
            )
        assert raw is not None
        entries = manifest_entries(json.loads(raw))
        if sorted(entries) != sorted(images):
            raise ImagePushError(
                f"The manifest list {ref} holds {', '.join(sorted(entries)) or 'no platform'} "
                f"after pushing {', '.join(sorted(images))}; retry the build."
            )
        return pushed, entries

    @cached_property
    def _uv_cache_dir(self) -> Path:
        """The host's uv cache (``uv cache dir``), created if missing; mounted as an overlay."""
        result = _run([*uv_command(), "cache", "dir"], 60, "uv cache dir")
        path = Path(result.stdout.strip()) if result.returncode == 0 else None
        if path is None or not path.is_absolute():
            path = self.cache_dir / "uv-cache"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class _CrossTree:
    """An environment :meth:`OciBuilder._assemble` made: ``directory`` (``cross-arm64``, in
    the build context) and whether the aggregator's image shares the learner's ``deps/`` layer
    (else it has ``aggregator-deps/``)."""

    directory: str
    aggregator_shares_deps: bool

    def deps_dir(self, role: str) -> str:
        """The ``directory`` subdirectory ``role``'s dependency layer is copied from."""
        return "deps" if role == "learner" or self.aggregator_shares_deps else f"{role}-deps"


def render_containerfile(
    role: str, base_ref: str, python: str, labels: Mapping[str, str], uid: int = IMAGE_UID
) -> str:
    """Return ``templates/Containerfile.in`` filled in for ``role`` (``learner``/``aggregator``).

    ``base_ref``: the ``FROM`` image (``name@sha256:...``). ``python``: the interpreter in the
    base image. ``labels``: OCI labels, written as ``LABEL`` (values quoted and escaped); the
    ``org.opencontainers.image.title`` label ``flops-<role>`` is added.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    template = string.Template((TEMPLATES / "Containerfile.in").read_text(encoding="utf-8"))
    return template.substitute(
        base_image=base_ref,
        uid=uid,
        python=shlex.quote(python),
        role=role,
        module=role,
        labels=_label_text(role, labels),
    )


def render_cross_containerfile(
    role: str,
    base_ref: str,
    platform_dir: str,
    labels: Mapping[str, str],
    *,
    deps_dir: str = "deps",
    uid: int = IMAGE_UID,
) -> str:
    """Return ``templates/Containerfile.cross.in`` filled in for ``role``: an image for
    another platform made of ``COPY`` steps only.

    ``base_ref``: the ``FROM`` image of that platform (``name@sha256:...``). ``platform_dir``:
    the build context directory :meth:`OciBuilder._assemble` filled (``cross-arm64``);
    ``deps_dir``: its subdirectory holding the dependency layer (``deps``, or
    ``aggregator-deps``). ``labels`` as for :func:`render_containerfile`.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    template = string.Template((TEMPLATES / "Containerfile.cross.in").read_text(encoding="utf-8"))
    return template.substitute(
        base_image=base_ref,
        uid=uid,
        user=IMAGE_USER,
        platform_dir=platform_dir,
        deps_dir=deps_dir,
        role=role,
        module=role,
        labels=_label_text(role, labels),
    )


def _label_text(role: str, labels: Mapping[str, str]) -> str:
    """The arguments of a ``LABEL`` line: ``org.opencontainers.image.title`` ``flops-<role>``
    and ``labels``, values quoted and escaped, one a line."""
    all_labels = {"org.opencontainers.image.title": f"flops-{role}", **labels}
    return " \\\n      ".join(f"{name}={_quote(value)}" for name, value in all_labels.items())


def build_failure(role: str, output: str, log_path: Path) -> BuilderError:
    """The error for a failed ``buildah build`` of ``role`` whose combined output is ``output``.

    A failed dependency install (``install.sh`` exit :data:`DEPENDENCY_INSTALL_EXIT`) becomes a
    :class:`~image_builder.errors.DependencyInstallError` carrying uv's condensed message;
    anything else an :class:`ImageBuildError` naming the failing step and its last output
    lines, and the log file.
    """
    attempts = uv_attempts(output)
    if attempts and re.search(rf"exit(?:ed with)? status {DEPENDENCY_INSTALL_EXIT}\b", output):
        return dependency_install_error(attempts)
    step, tail = failing_step(output)
    where = f" at step {step}" if step else ""
    return ImageBuildError(
        f"Building the {role} image failed{where}: {tail or 'buildah gave no output'}. "
        f"The full log is {log_path}.",
        details=output.splitlines()[-40:],
    )


def install_failure(platform: str, errors: Sequence[tuple[str, str]]) -> DependencyInstallError:
    """The error for failed uv attempts ``[(mode, stderr)]`` resolving or installing for
    ``platform``: :func:`platform_install_error` for another platform than this machine's,
    else :func:`~image_builder.python_env.dependency_install_error`."""
    if platform == host_platform():
        return dependency_install_error(errors)
    return platform_install_error(platform, _python_version(), errors)


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


def uv_attempts(output: str) -> list[tuple[str, str]]:
    """``[(mode, stderr)]`` of the failed uv attempts ``install.sh`` printed in ``output``."""
    attempts = []
    for match in re.finditer(
        r"^##flops-uv-attempt (\w+)\n(.*?)^##flops-uv-end$", output, re.MULTILINE | re.DOTALL
    ):
        attempts.append((match.group(1), match.group(2)))
    return attempts


def failing_step(output: str, lines: int = 4, limit: int = 400) -> tuple[str, str]:
    """``("3/12 (RUN sh ...)", "last; output; lines")`` of a failed buildah build's output.

    The step is the last ``STEP n/m:`` line (its instruction cut to 60 characters); the tail
    is up to ``lines`` non-empty lines printed after it, buildah's own error lines left out,
    joined with ``" / "`` and cut to ``limit`` characters.
    """
    all_lines = output.splitlines()
    start = 0
    step = ""
    for index, line in enumerate(all_lines):
        match = _STEP.match(line.strip())
        if match:
            instruction = " ".join(match.group(2).split())
            if len(instruction) > 60:
                instruction = instruction[:57] + "..."
            step = f"{match.group(1)} ({instruction})"
            start = index + 1
    body = [
        " ".join(line.split())
        for line in all_lines[start:]
        if line.strip() and not _BUILDAH_NOISE.match(line.strip())
    ]
    if not body:  # buildah's own error is all there is (e.g. a missing base image)
        body = [condense_tool_error(line) for line in all_lines[start:] if line.strip()]
    tail = " / ".join(body[-lines:]).rstrip(".")
    return step, tail if len(tail) <= limit else "..." + tail[-(limit - 3) :]


def condense_tool_error(stderr: str, limit: int = 300) -> str:
    """One clause from buildah/skopeo error output (logrus ``msg="..."`` unwrapped).

    Keeps the last error line, drops the ``Error parsing image name "...": `` prefix and a
    trailing period, cut to ``limit`` characters.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "no error message"
    line = lines[-1]
    match = _LOGRUS_MSG.search(line)
    if match:
        line = match.group(1).replace('\\"', '"')
    line = re.sub(r'^(Error: )?(Error parsing image name|initializing source) "[^"]*": ', "", line)
    line = re.sub(r"^Error: ", "", line).rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def host_platform() -> str:
    """This machine's platform as ``os/arch`` (``linux/amd64``, ``linux/arm64``)."""
    machine = platform_module.machine().lower()
    return f"linux/{_MACHINE_TO_ARCH.get(machine, machine)}"


def strip_tag(image: str) -> str:
    """``host:port/path`` of ``host:port/path:tag`` or ``host:port/path@sha256:...``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        last[-1] = last[-1].split(":", 1)[0]
    return "/".join(last)


# -- manifests ---------------------------------------------------------------------------------
def manifest_digest(raw: str) -> str:
    """``sha256:<hex>`` of a manifest as served (``skopeo inspect --raw`` output).

    skopeo prints the manifest's bytes followed by a newline the manifest itself lacks, which
    is dropped (a registry's JSON manifests do not end with one).
    """
    body = raw[:-1] if raw.endswith("\n") and not raw.endswith("}\n\n") else raw
    return "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


def manifest_entries(manifest: Mapping[str, Any]) -> dict[str, str]:
    """``{os/arch: digest}`` of a manifest list or OCI index (``{}`` for an image manifest).

    Entries without a platform (e.g. attestations) are skipped; a variant (``v8``) is ignored.
    """
    if manifest.get("mediaType") not in _LIST_TYPES and "manifests" not in manifest:
        return {}
    entries: dict[str, str] = {}
    for entry in manifest.get("manifests") or []:
        platform = entry.get("platform") or {}
        if platform.get("os") and platform.get("architecture"):
            entries.setdefault(f"{platform['os']}/{platform['architecture']}", entry["digest"])
    return entries


# -- base images of other platforms, read from their files ------------------------------------
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
            f"{_python_version()} (or set the interpreter's path)."
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
    if version != _python_version() or version not in versions:
        found = f"Python {version}" if version in versions else "no Python standard library"
        raise BaseImageError(
            f"The {target.name} base image has {found} at {prefix}/lib; the images need "
            f"Python {_python_version()} (the manager's), use such a base image."
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


def _python_version() -> str:
    """The manager's Python ``major.minor`` (``3.11``), which every image runs."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


# -- environments assembled on this machine -----------------------------------------------------
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
    _link_or_copy(Path(source), Path(dest))


def _link_entry(source: Path, dest: Path) -> None:
    """Hard-link the file (or copy the symlink) ``source`` to ``dest``, making its parents."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        dest.symlink_to(os.readlink(source))
    else:
        _link_or_copy(source, dest)


def _evict_oldest(directory: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used trees (by ``tree.json``'s mtime) in
    ``directory``; trees being assembled or used (locked) are left alone."""
    trees = sorted(
        (path for path in directory.iterdir() if (path / "tree.json").is_file()),
        key=lambda path: (path / "tree.json").stat().st_mtime,
        reverse=True,
    )
    for tree in trees[keep:]:
        try:
            with file_lock(directory / f"{tree.name}.lock", 0, error=ImageBuildError):
                shutil.rmtree(tree, ignore_errors=True)
        except ImageBuildError:
            continue  # in use


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


# -- tools -------------------------------------------------------------------------------------
def _require_tools() -> tuple[str, str]:
    """Paths of buildah and skopeo; :class:`BuildToolMissingError` naming the install line."""
    found = {name: shutil.which(name) for name in ("buildah", "skopeo")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise BuildToolMissingError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed on "
            "this machine; install with `apt-get install buildah skopeo` (or run "
            "scripts/bootstrap)."
        )
    return str(found["buildah"]), str(found["skopeo"])


def _run(command: Sequence[str], timeout_s: float, what: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` capturing text output; :class:`ImageBuildError` after ``timeout_s``."""
    try:
        return subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise ImageBuildError(
            f"{what} did not finish within {timeout_s:.0f} s; check the registry connection."
        ) from None


def _copy_source(entry: str, runtime: Path) -> None:
    """Copy a :data:`ROLE_SOURCES` entry (``pkg`` or ``pkg/module.py``) into ``runtime``."""
    top, _, rest = entry.partition("/")
    spec = importlib.util.find_spec(top)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ImageBuildError(f"The FLOps package {top} is not importable; reinstall FLOps.")
    source = Path(locations[0])
    if rest:
        (runtime / top).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rest, runtime / top / rest)
    else:
        copy_repo_files(source, runtime / top)


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` to ``dest`` (same file system), else copy it with its mode."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _quote(value: str) -> str:
    """A Containerfile ``LABEL`` value: double-quoted, with ``\\``, ``"`` and ``$`` escaped."""
    flat = " ".join(value.split())
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'
