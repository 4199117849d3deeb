"""The ``oci`` builder: learner and aggregator OCI images per project inputs, in a registry.

:meth:`OciBuilder.build` runs the same fetch-and-validate step as the ``venv`` builder
(:func:`image_builder.repo.checked_out_repo`) and plans the same installs
(:mod:`image_builder.python_env`). Like the local backend, each image holds two environments:
FLOps' runtime (what ``python -m learner`` / ``python -m aggregator`` run: Flower, MQTT, the
MLflow tracking client; pinned to the manager's versions) and the ML repository's own (its
requirements exactly as pinned, MLflow pins included, plus what ``flops_utils`` needs there:
:func:`~image_builder.python_env.user_env_support_lines`), in which the model worker runs the
repository's ``ModelManager`` (:mod:`flops_utils.model_worker_client`, started with
``$FLOPS_USER_PYTHON``). A repository pinning ``numpy==1.26.4`` or ``pyyaml==6.0.1`` (what MLflow
2.12 wrote in 2024) thus builds next to Flower 1.41 and NumPy 2. For this machine's platform it
builds, with buildah (:class:`~image_builder.buildah.Buildah`: ``buildah build --isolation
chroot --layers``, daemonless, no OCI runtime needed), from ``templates/Containerfile.in``:

=========================  =====================================================================
layer                      content
=========================  =====================================================================
base image                 ``base_image``, pinned by digest (any image with Python 3 and
                           ``useradd``; tests use a debootstrapped Debian 12)
user                       ``flops`` (uid :data:`IMAGE_UID`), the user the role runs as
FLOps runtime environment  ``/opt/flops/venv``: :data:`LEARNER_PACKAGES` at the manager's
                           versions (the manager's other versions as constraints), installed by
                           uv (:file:`templates/install.sh`) from the host's uv cache (offline
                           first); uv and its cache are mounted, not kept. Depends on nothing of
                           the project: one layer for every project and both roles
repository environment     ``/opt/flops/user-venv``: the repository's requirements as pinned +
                           the support lines, the manager's versions as constraints on the first
                           attempts only (as the venv builder), the local wheel directories of
                           :func:`~image_builder.python_env.find_links` mounted (``--find-links``),
                           bounds the packages' metadata omits added
                           (:func:`~image_builder.python_env.undeclared_conflicts` of the
                           resolution, :meth:`OciBuilder._resolve_user_environment`), numpy,
                           pyarrow and datasets import-checked. Shared by the learner and the
                           aggregator of a project
role extras                the aggregator's :data:`AGGREGATOR_EXTRA_PACKAGES` (mlflow-skinny,
                           pydantic) in ``/opt/flops/venv``; empty for the learner
FLOps runtime code         ``/opt/flops/runtime``: ``flops_utils`` and the role's package (the
                           aggregator also gets ``flops_manager/sla.py``), copied; both
                           interpreters import ``flops_utils`` from it (``PYTHONPATH``)
ML repository              ``/opt/flops/repo`` (no ``.git``), owned by the ``flops`` user
=========================  =====================================================================

plus ``ENV`` (``PYTHONPATH``, ``FLOPS_ML_REPO_DIR``, ``FLOPS_USER_PYTHON=/opt/flops/user-venv/
bin/python``), OCI labels (``org.opencontainers.image.source``/``.revision``,
:data:`LABEL_INPUTS_HASH`, ...), ``USER`` and the entrypoint ``python -m learner`` / ``python -m
aggregator`` (FLOps' runtime's interpreter). Only the last two layers depend on code, so a
code-only change rebuilds in seconds; the runtime layers are shared between projects, the
repository's environment between the learner and the aggregator, through buildah's layer cache.

Slim images: Flower 1.41 requires its server-side stack, which neither role imports (traced:
the distributions in ``sys.modules`` of ``python -m learner`` and ``python -m aggregator``
during a real two-learner training). FLOps' runtime installs leave out
:data:`UNUSED_DEPENDENCIES` (``uv pip install --excludes``): uv's 40 MB binary, uvicorn and its
``[standard]`` extras, the interactive CLI's prompt-toolkit, greenlet, hf-xet; every name the
aggregator's MLflow client needs (uvicorn, python-dotenv) is kept, found by resolving its extras
alone (:meth:`OciBuilder._excludes`). The repository's environment gets all its requirements
pull in (the repository's code may import anything of them). Then
:file:`templates/slim_site_packages.py` removes the test suites of numpy, scipy, pandas,
scikit-learn, pyarrow and matplotlib from both environments in the same steps. Bytecode stays,
hash-checked (:data:`~image_builder.cross_platform.BYTECODE_EPOCH`). Measured for
``examples/mnist_sklearn`` (uncompressed, amd64): learner 1047 MB (base 123, FLOps' runtime
186, the repository's environment 738: the example requires the full ``mlflow``, which the
single merged environment of the previous layout replaced by the manager's, 696 MB in all),
aggregator 1112 MB (its extras 65 MB; 903 MB before); cold build 147 s (96 s before), a
code-only change 2.5 s, no-op 0.14 s.

Multi-platform (``platforms=["linux/amd64", "linux/arm64"]``, the SLA's
``supported_platforms``): one image per platform and role, pushed as one manifest list per role
(``buildah manifest create/add/push --all``) tagged by the key, which covers the platform set;
the pushed list's digest is checked against ``skopeo inspect --raw``. (A single platform gives
a plain image.) The base image must be a manifest list holding every platform (or a single
image of the only platform asked for). An image for another platform than this machine's is
assembled without running any of its code (:mod:`image_builder.cross_platform`:
``templates/Containerfile.cross.in``, only ``COPY`` steps, the same layers, environment, labels,
user and entrypoint as this machine's), which needs every dependency to publish a wheel for that
platform (or a pure-Python one); otherwise the build fails before any image is made, with a
:class:`~image_builder.errors.DependencyInstallError` naming the package. Both environments are
assembled so (FLOps' runtime and the repository's, cached apart, so that another project reuses
the runtime's files and layers); the repository's is resolved for every platform before any
build (:meth:`OciBuilder._resolve_user_environment`). Measured here (2 cores, the example):
learner and aggregator for linux/amd64 + linux/arm64 cold 375 s with arm64 wheels partly
downloaded (the arm64 runtime environment 47 s, the repository's 85 s of it; 89-140 s with one
environment and a warm cache), a code-only change with both assembled environments reused
75 s; arm64 learner 1061 MB, aggregator 1127 MB uncompressed (707 and 918 MB before).

Images are pushed as ``<registry>/<namespace>/learner:<key>`` and ``.../aggregator:<key>``
(:meth:`OciBuilder.image_key`: a hash of the commit, dependency hash, base image digest, ML
model flavor, platforms, the runtime versions, the generated requirement and constraint files
of both environments (the repository's with FLOps' support lines and the listing of the local
wheel directories it searches), the FLOps runtime code and the templates). A tag already in
the registry with the same :data:`LABEL_INPUTS_HASH` (and, for a list, the same platforms) is
reused without building.
After a push the registry's digest is checked against buildah's. ``on_progress`` hears of
each milestone (:class:`BuildStep`) with its timing.

Scope: repositories whose requirements install from wheels or pure-Python sources (the images
carry no compilers) on the base image's Python. ``cache_dir`` holds build locks, the last build
log per image (``logs/<key>-<role>[-<arch>].log``) and the assembled environments of other
platforms (``platforms/``); layers live in buildah's storage (``/var/lib/containers/storage``
for root).

:class:`OciBuilder` also lends its setup (registry, base image, cache directory, buildah) to
:class:`~image_builder.model_image.ModelImageBuilder`: :meth:`OciBuilder.tools`,
:meth:`~OciBuilder.resolve_base`, :meth:`~OciBuilder.find_reusable`,
:meth:`~OciBuilder.key_lock` and :meth:`~OciBuilder.build_and_push`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shlex
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from flops_utils.logging import logger
from flops_utils.types import MLModelFlavor
from image_builder.build_context import (
    TEMPLATES,
    label_arguments,
    link_or_copy,
    stage_installer,
    stage_tools,
    templates_hash,
    write_lines,
)
from image_builder.buildah import (
    Buildah,
    manifest_digest,
    manifest_entries,
    require_tools,
    run_tool,
    strip_tag,
)
from image_builder.cross_platform import (
    PLATFORMS,
    CrossEnvironment,
    EnvironmentFiles,
    HostUv,
    PlatformEnvironments,
    host_platform,
    install_failure,
    read_base_facts,
)
from image_builder.dependencies import resolve_local_paths
from image_builder.errors import BaseImageError, DependencyInstallError, ImageBuildError
from image_builder.python_env import (
    USER_ENV_IMPORT_CHECK,
    attributed_install_error,
    file_lock,
    find_links,
    manager_versions,
    plan_install,
    redact_paths,
    runtime_pins,
    undeclared_conflicts,
    user_env_support_lines,
    uv_command,
)
from image_builder.repo import (
    DEFAULT_GIT_TIMEOUT_S,
    CheckedOutRepo,
    FetchLimits,
    checked_out_repo,
    content_hash,
    copy_repo_files,
)

IMAGE_FORMAT_VERSION = 3
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

LEARNER_PACKAGES = ("flwr", "numpy", "paho-mqtt", "requests")
"""FLOps' runtime distributions both images get in ``/opt/flops/venv`` (pinned to the
manager's versions). The repository's code and ``load_dataset()`` run in the model worker, in
the repository's environment, so the roles no longer import datasets, pyarrow or pandas
(traced: the distributions owning a module in ``sys.modules`` of ``learner.main``,
``learner.flower_client`` and ``flwr.client`` after Flower rounds with a model worker:
flwr and its grpcio, protobuf, cryptography, ... dependencies, numpy, paho-mqtt). requests is
Flower's own requirement, pinned so that it matches the manager's."""

AGGREGATOR_EXTRA_PACKAGES = ("mlflow-skinny", "pydantic")
"""FLOps' runtime distributions only the aggregator gets: the MLflow tracking client (the
aggregator logs metrics, uploads the model directory the worker saved and registers it:
``MlflowClient`` and ``mlflow.register_model``, all in mlflow-skinny, which leaves out the
full mlflow's server, pandas, scikit-learn, scipy and matplotlib) and pydantic
(``flops_manager.sla``)."""

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

TEMPLATE_FILES = (
    "Containerfile.in",
    "Containerfile.cross.in",
    "install.sh",
    "slim_site_packages.py",
)
"""The templates of the learner and aggregator images (hashed into the key)."""

REPO_MOUNT = Path("/opt/flops/build/repo")
"""Where the install steps see the repository (for requirements naming local paths)."""

FIND_LINKS_MOUNT = "/opt/flops/build/find-links"
"""Where the repository environment's install step sees the local wheel directories of
:func:`~image_builder.python_env.find_links` (``<n>/``: the n-th of them)."""

VENV = "/opt/flops/venv"
"""FLOps' runtime environment in the images (the entrypoint is its ``bin/python``)."""

USER_VENV = "/opt/flops/user-venv"
"""The ML repository's environment in the images (``FLOPS_USER_PYTHON`` is its
``bin/python``): the model worker runs the repository's code there."""


class BuildStep(StrEnum):
    """The milestones a build reports to its ``on_progress(step, data)`` callback.

    ``data`` of each (``seconds``: wall time of that step alone; ``ref``: pinned,
    ``repository@digest``):
    """

    BASE_RESOLVED = "base_resolved"
    """``{"base_image", "digest", "platforms", "seconds"}``: the base image looked up."""
    REPOSITORY_FETCHED = "repository_fetched"
    """``{"commit", "seconds"}``: the ML repository cloned or copied, and validated."""
    MODEL_DOWNLOADED = "model_downloaded"
    """``{"model_uri", "run_id", "seconds"}`` (model images): the model's artifacts fetched;
    ``model_uri`` pinned to a version."""
    DEPENDENCIES_PREPARED = "dependencies_prepared"
    """``{"platforms", "seconds"}``: the excludes resolved and the environments of other
    platforms assembled (before the first build of a key only)."""
    IMAGE_REUSED = "image_reused"
    """``{"role", "ref", "digest", "seconds"}``: the registry holds the image already."""
    IMAGE_BUILT = "image_built"
    """``{"role", "platform", "seconds"}``: one platform's image built (``buildah build``)."""
    IMAGE_PUSHED = "image_pushed"
    """``{"role", "ref", "digest", "platform_digests", "seconds"}``: the image (or manifest
    list) pushed and checked in the registry; ``platform_digests``: ``{os/arch: digest}``."""


ProgressCallback = Callable[[str, dict[str, Any]], None]
"""``on_progress(step, data)``: a :class:`BuildStep` (a ``str``) and its data. Called in the
building thread; an exception it raises ends the build."""


def no_progress(step: str, data: dict[str, Any]) -> None:
    """The ``on_progress`` of a caller that passes none."""


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
class _Staged:
    """What :meth:`OciBuilder._stage_context` wrote: ``hashes`` (context directory → content
    hash, keyed into the image key), ``user_lines`` (the repository's requirement lines, local
    paths relative to the repository as in its dependency file), ``support`` (what FLOps adds
    to the repository's environment), ``dependency_file`` (its name, for error messages) and
    ``find_links`` (the local wheel directories and pages searched, as on this machine)."""

    hashes: dict[str, str]
    user_lines: list[str]
    support: list[str]
    dependency_file: str
    find_links: list[str]


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
    concurrent build of the same key (default 3600), ``git_timeout_s`` for the whole fetch
    unless ``fetch_limits`` (:class:`~image_builder.repo.FetchLimits`) bound it.
    ``allow_local_packages``: accept local package requirements inside the repository
    (default ``False``: refused, :mod:`image_builder.confinement`).
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
        fetch_limits: FetchLimits | None = None,
        allow_local_packages: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir).resolve()
        self.fetch_limits = fetch_limits or FetchLimits(timeout_s=git_timeout_s)
        self.allow_local_packages = allow_local_packages
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
    def uv_cache_dir(self) -> Path:
        """The host's uv cache (``uv cache dir``; else ``cache_dir/uv-cache``), created if
        missing; builds mount it as an overlay, and uv on this machine uses it."""
        result = run_tool([*uv_command(), "cache", "dir"], 60, "uv cache dir")
        path = Path(result.stdout.strip()) if result.returncode == 0 else None
        if path is None or not path.is_absolute():
            path = self.cache_dir / "uv-cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def repository(self, role: str) -> str:
        """``registry/namespace/role``: where the ``role`` image is pushed."""
        return "/".join(part for part in (self.registry, self.namespace, role) if part)

    def log_path(self, key: str, role: str, platform_suffix: str = "") -> Path:
        """``cache_dir/logs/<key>-<role><platform_suffix>.log``: the last build log of the
        ``role`` image tagged ``key`` (``platform_suffix``: ``-arm64`` for one image of a
        manifest list)."""
        return self.cache_dir / "logs" / f"{key}-{role}{platform_suffix}.log"

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
        hash: the generated requirement and constraint files of both environments, the listing
        of the local wheel directories, and the FLOps runtime code copied into each image) and
        the hash of :data:`TEMPLATE_FILES` (see :meth:`inputs_key`).
        """
        return self.inputs_key(
            IMAGE_FORMAT_VERSION,
            base_digest,
            platform,
            [*self.learner_pins, *self.aggregator_pins],
            TEMPLATE_FILES,
            commit=commit,
            dependencies=dependencies_hash,
            flavor=flavor,
            excludes=list(UNUSED_DEPENDENCIES),
            staged=dict(sorted(staged.items())),
        )

    def inputs_key(
        self,
        format_version: int,
        base_digest: str,
        platform: str,
        pins: Sequence[str],
        template_files: tuple[str, ...],
        **specific: object,
    ) -> str:
        """Return the 32-hex tag of an image built from these inputs: the first 32 hex digits
        of the SHA-256 of the JSON of ``format_version``, the base image's ``base_digest``,
        ``platform``, the base image's interpreter name, :data:`IMAGE_UID`, the runtime
        ``pins``, the manager's distribution versions, the hash of the templates
        ``template_files`` and the image kind's ``specific`` inputs (name → JSON value).
        """
        material = {
            "format": format_version,
            "base": base_digest,
            "platform": platform,
            "python": self.python,
            "uid": IMAGE_UID,
            "pins": list(pins),
            "runtime_env": sorted(f"{n}=={v}" for n, v in self.installed_versions.items()),
            "templates": templates_hash(template_files),
            **specific,
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
        in :data:`~image_builder.cross_platform.PLATFORMS`, and ``ValueError`` if both
        arguments are given.
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
        on_progress: ProgressCallback | None = None,
    ) -> BuiltImages:
        """Return the learner and aggregator images for ``ml_repo_url`` at ``ref``, building
        and pushing the ones the registry lacks.

        ``ref``: branch, tag or commit; ``None`` for the default branch. ``workdir``: scratch
        directory for the clone and the build context (created if missing; cleaned).
        ``flavor``: the SLA's ``ml_model_flavor`` (default ``pytorch``, as in the SLA).
        ``platforms``: ``os/arch`` values (the SLA's ``supported_platforms``, any of
        :data:`~image_builder.cross_platform.PLATFORMS`): two or more give one manifest list
        per role; ``platform``: a single one; default: this machine's. ``on_progress``: called
        at each :class:`BuildStep` with its data (default: nobody hears). Raises the repository
        errors of :func:`~image_builder.repo.checked_out_repo`,
        :class:`~image_builder.errors.BuildToolMissingError` (buildah or skopeo missing),
        ``RegistryUnreachableError``, ``BaseImageError`` (missing, lacking a platform, or unfit
        for assembling another platform's image), ``DependencyInstallError`` (a requirement
        cannot be installed, or has no wheel for a non-host platform; uv's message condensed),
        ``ImageBuildError`` (a failed build step with its last output lines, an unsupported
        platform or flavor, a timeout) and ``ImagePushError``; ``ValueError`` if both
        ``platform`` and ``platforms`` are given.
        """
        started = time.monotonic()
        report = on_progress or no_progress
        targets = self.platforms(platform, platforms)
        tools = self.tools()
        if flavor not in {member.value for member in MLModelFlavor}:
            raise ImageBuildError(
                f"Unknown ML model flavor {flavor!r}; use one of "
                f"{', '.join(member.value for member in MLModelFlavor)}."
            )
        step = time.monotonic()
        base_digest, base_refs = self._base_refs(tools, targets)
        report(
            BuildStep.BASE_RESOLVED,
            {"base_image": self.base_image, "digest": base_digest, "platforms": list(targets),
             "seconds": time.monotonic() - step},
        )  # fmt: skip
        workdir = Path(workdir)
        step = time.monotonic()
        with checked_out_repo(
            ml_repo_url,
            ref,
            workdir,
            exclude=[self.cache_dir],
            limits=self.fetch_limits,
            allow_local_packages=self.allow_local_packages,
        ) as checked_out:
            commit = checked_out.fetched.commit
            report(
                BuildStep.REPOSITORY_FETCHED,
                {"commit": commit, "seconds": time.monotonic() - step},
            )
            context = Path(tempfile.mkdtemp(prefix="oci-context-", dir=workdir))
            try:
                staged = self._stage_context(context, checked_out)
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
                images = self._build_roles(tools, context, key, base_refs, labels, staged, report)
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
        tools: Buildah,
        context: Path,
        key: str,
        base_refs: Mapping[str, str],
        labels: Mapping[str, str],
        staged: _Staged,
        report: ProgressCallback,
    ) -> dict[str, BuiltImage]:
        """Reuse or build each role's image; builds of one key are serialized by a lock.

        ``base_refs``: platform → ``FROM`` reference (``name@sha256:...``), sorted by platform.
        """
        platforms = tuple(base_refs)
        images: dict[str, BuiltImage] = {}
        for role in ROLES:
            reused = self.find_reusable(tools, role, key, platforms, report)
            if reused is not None:
                images[role] = reused
        if len(images) == len(ROLES):
            return images
        with self.key_lock(key):
            missing = []
            for role in ROLES:
                if role in images:
                    continue
                reused = self.find_reusable(tools, role, key, platforms, report)  # built meanwhile
                if reused is None:
                    missing.append(role)
                else:
                    images[role] = reused
            if missing:
                environments = self._prepare(tools, context, base_refs, staged, report)
                for role in missing:
                    containerfiles = self._write_containerfiles(
                        context, role, base_refs, labels, environments
                    )
                    images[role] = self.build_and_push(
                        tools, context, role, key, containerfiles, report
                    )
        return images

    def _write_containerfiles(
        self,
        context: Path,
        role: str,
        base_refs: Mapping[str, str],
        labels: Mapping[str, str],
        environments: Mapping[str, CrossEnvironment],
    ) -> dict[str, Path]:
        """``{platform: Containerfile}`` of ``role`` in ``context``, one per platform of
        ``base_refs``: :func:`render_cross_containerfile` for a platform with an assembled
        environment in ``environments``, else :func:`render_containerfile`."""
        containerfiles = {}
        for platform, base_ref in base_refs.items():
            image_labels = {
                **labels,
                "org.opencontainers.image.base.digest": base_ref.split("@")[-1],
            }
            if platform in environments:
                environment = environments[platform]
                text = render_cross_containerfile(
                    role, base_ref, environment.directory, image_labels,
                    deps_dir=environment.deps_dir(role),
                )  # fmt: skip
            else:
                text = render_containerfile(role, base_ref, self.python, image_labels)
            suffix = _platform_suffix(platform, len(base_refs))
            containerfile = context / f"Containerfile.{role}{suffix}"
            containerfile.write_text(text, encoding="utf-8")
            containerfiles[platform] = containerfile
        return containerfiles

    def _stage_context(self, context: Path, checked_out: CheckedOutRepo) -> _Staged:
        """Write the build context; return the content hash of each directory in it but the
        repository, the local wheel directories and the tools (those are keyed by the commit
        and by ``user-build/find-links.txt``; uv's binary does not change what is installed),
        and the repository's lines to install.

        Layout: ``runtime-build/`` (FLOps' runtime: requirements.txt, constraints.txt,
        install.sh, slim_site_packages.py; excludes.txt is added by :meth:`_prepare`),
        ``user-build/`` (the repository's environment: requirements.txt, constraints.txt,
        find-links.txt; :meth:`_prepare` may append corrections to requirements.txt),
        ``<role>-build/requirements.txt`` (the role's runtime extras), ``<role>-runtime/``
        (FLOps code), ``repo/`` (the repository), ``find-links/<n>/`` (hard links of the local
        wheel directories), ``tools/`` (:func:`~image_builder.build_context.stage_tools`).
        """
        header = ["# generated by the FLOps oci builder"]
        # FLOps' runtime: the same for every project (shared through buildah's layer cache).
        _, runtime_constraints = plan_install(
            [], (*LEARNER_PACKAGES, *AGGREGATOR_EXTRA_PACKAGES), self.installed_versions
        )
        runtime = context / "runtime-build"
        runtime.mkdir()
        write_lines(runtime / "requirements.txt", [*header, *self.learner_pins])
        # The aggregator's extras are constraints too, so that the learner gets the same
        # pydantic, if any.
        extras = [pin for pin in self.aggregator_pins if "==" in pin]
        write_lines(runtime / "constraints.txt", sorted([*runtime_constraints, *extras]))
        stage_installer(runtime)
        write_lines(context / "learner-build" / "requirements.txt", [])
        write_lines(context / "aggregator-build" / "requirements.txt", self.aggregator_pins)

        # The repository's environment: its pins as they are, FLOps' support lines, the
        # manager's versions as constraints on the first attempts (as the venv builder does).
        requirements = list(checked_out.requirements)
        support = user_env_support_lines(requirements)
        _, user_constraints = plan_install(requirements, (), self.installed_versions)
        install_lines = resolve_local_paths(requirements, REPO_MOUNT)
        user_header = list(header)
        if install_lines != requirements:
            # The repository is mounted, not copied, for the install step, and buildah's layer
            # cache does not see mounted files: key the environment's layer by the whole commit.
            user_header.append(
                f"# names local paths of the repository at {checked_out.fetched.commit}"
            )
        links = find_links()
        local_links = [entry for entry in links if "://" not in entry and Path(entry).is_dir()]
        link_lines = [
            f"--find-links {FIND_LINKS_MOUNT}/{local_links.index(entry)}"
            if entry in local_links
            else f"--find-links {entry}"
            for entry in links
            if "://" in entry or entry in local_links
        ]
        user = context / "user-build"
        write_lines(
            user / "requirements.txt", [*user_header, *link_lines, *install_lines, *support]
        )
        write_lines(user / "constraints.txt", user_constraints)
        # The wheels are mounted, which buildah's layer cache does not see: list them here.
        write_lines(user / "find-links.txt", _wheel_listing(local_links))
        for role in ROLES:
            for entry in ROLE_SOURCES[role]:
                _copy_source(entry, context / f"{role}-runtime")
        hashes = {
            directory.name: content_hash(directory)
            for directory in sorted(context.iterdir())
            if directory.is_dir()
        }
        copy_repo_files(checked_out.fetched.path, context / "repo")
        (context / "find-links").mkdir()
        for index, entry in enumerate(local_links):
            _link_wheels(Path(entry), context / "find-links" / str(index))
        stage_tools(context)
        return _Staged(
            hashes=hashes,
            user_lines=requirements,
            support=support,
            dependency_file=checked_out.layout.dependency_file.name,
            find_links=[entry for entry in links if "://" in entry or entry in local_links],
        )

    # -- dependencies resolved on this machine ----------------------------------------
    def _prepare(
        self,
        tools: Buildah,
        context: Path,
        base_refs: Mapping[str, str],
        staged: _Staged,
        report: ProgressCallback,
    ) -> dict[str, CrossEnvironment]:
        """Before the first build of a key: resolve the repository's environment on every
        platform (its errors raised here, before any build; the
        :func:`~image_builder.python_env.undeclared_conflicts` of the resolutions appended to
        ``user-build/requirements.txt``), write the excludes files of FLOps' runtime
        (``runtime-build/excludes.txt``, ``<role>-build/excludes.txt``) and assemble the
        environments of every platform other than this machine's; returns those, by platform.

        Raises :class:`BaseImageError` (a base image unfit for assembling) and
        :class:`DependencyInstallError` (the requirements cannot be resolved, or a dependency
        has no wheel for a platform).
        """
        started = time.monotonic()
        host = host_platform()
        facts = {}
        for platform, base_ref in base_refs.items():
            if platform != host:
                with tools.mounted_base_image(base_ref, platform) as root:
                    facts[platform] = read_base_facts(root, self.python, PLATFORMS[platform])
        uv_platforms = {
            platform: facts[platform].uv_platform(PLATFORMS[platform]) if platform in facts else ""
            for platform in sorted(base_refs, key=lambda name: name != host)  # this one first
        }
        uv = HostUv(self.uv_cache_dir, self.build_timeout_s)
        user_host = self._resolve_user_environment(uv, context, staged, uv_platforms)
        excludes = self._excludes(uv, context, uv_platforms)
        write_lines(context / "runtime-build" / "excludes.txt", excludes["learner"])
        for role in ROLES:
            write_lines(context / f"{role}-build" / "excludes.txt", excludes[role])
        logger.info(
            "leaving out %s (learner), %s (aggregator)",
            ", ".join(excludes["learner"]) or "nothing",
            ", ".join(excludes["aggregator"]) or "nothing",
        )
        environments = {}
        if facts:
            store = PlatformEnvironments(
                self.cache_dir / "platforms", uv, user=IMAGE_USER, uid=IMAGE_UID, venv=VENV,
                lock_timeout_s=self.lock_timeout_s,
            )  # fmt: skip
            files = self._environment_files(context)
            inputs = {
                "format": IMAGE_FORMAT_VERSION,
                "runtime-build": staged.hashes.get("runtime-build"),
                "aggregator-build": staged.hashes.get("aggregator-build"),
                "excludes": [
                    (context / name / "excludes.txt").read_text(encoding="utf-8")
                    for name in ("runtime-build", "aggregator-build")
                ],
                "templates": templates_hash(TEMPLATE_FILES),
            }
            user_inputs = {
                "format": IMAGE_FORMAT_VERSION,
                "user-build": staged.hashes.get("user-build"),
                # with the corrections, and the local wheel directories as on this machine
                "requirements": (context / "user-build" / "requirements.txt").read_text(),
                "find_links": staged.find_links,
                "templates": templates_hash(TEMPLATE_FILES),
            }
            for platform, platform_facts in facts.items():
                target = PLATFORMS[platform]
                dest = context / f"cross-{target.arch}"
                environments[platform] = store.link(dest, target, platform_facts, files, inputs)
                store.link_user(
                    dest, target, platform_facts, user_host,
                    context / "user-build" / "constraints.txt", user_inputs, USER_VENV,
                )  # fmt: skip
        seconds = time.monotonic() - started
        logger.info("prepared the dependencies in %.1f s", seconds)
        report(BuildStep.DEPENDENCIES_PREPARED, {"platforms": list(base_refs), "seconds": seconds})
        return environments

    def _resolve_user_environment(
        self, uv: HostUv, context: Path, staged: _Staged, uv_platforms: Mapping[str, str]
    ) -> Path:
        """Resolve the repository's environment on every platform of ``uv_platforms`` (this
        machine's first) as its install will (offline, online, without constraints) and append
        the bounds its packages' metadata omits (:func:`~image_builder.python_env.
        undeclared_conflicts`, e.g. ``pyarrow<25`` next to ``numpy<2``) to
        ``user-build/requirements.txt``; returns its requirement file on this machine
        (``host/user.txt``: local paths and wheel directories as here, corrections included).

        Raises :class:`DependencyInstallError`: for this machine's platform worded as the venv
        builder does (:func:`~image_builder.python_env.attributed_install_error`, naming the
        dependency file and what FLOps added), for another platform by
        :func:`~image_builder.cross_platform.install_failure`; paths of this machine redacted.
        """
        lines = [
            *(f"--find-links {entry}" for entry in staged.find_links),
            *resolve_local_paths(staged.user_lines, context / "repo"),
            *staged.support,
        ]
        user_host = context / "host" / "user.txt"
        write_lines(user_host, lines)
        hidden = {str(context / "repo"): "<repository>", str(context): "<build directory>"}
        host = host_platform()

        def failure(platform: str, errors: list[tuple[str, str]]) -> DependencyInstallError:
            redacted = [(mode, redact_paths(text, hidden)) for mode, text in errors]
            if platform == host:
                return attributed_install_error(redacted, staged.support, staged.dependency_file)
            return install_failure(platform, redacted)

        resolved = uv.resolved_versions(
            user_host, uv_platforms, context / "user-build" / "constraints.txt", failure
        )
        corrections: dict[str, str] = {}
        for versions in resolved.values():
            corrections.update(undeclared_conflicts(versions))
        if corrections:
            logger.info("adding %s: %s", ", ".join(corrections), "; ".join(corrections.values()))
            for path in (context / "user-build" / "requirements.txt", user_host):
                text = path.read_text(encoding="utf-8")
                path.write_text(text + "".join(f"{line}\n" for line in corrections))
        return user_host

    def _excludes(
        self, uv: HostUv, context: Path, uv_platforms: Mapping[str, str]
    ) -> dict[str, list[str]]:
        """``{role: names}``: :data:`UNUSED_DEPENDENCIES` minus every distribution the role's
        own requirements in FLOps' runtime resolve to on any of the platforms.

        The learner has none of its own (the repository's are in its own environment); the
        aggregator's are its extras, so MLflow keeps what it needs (uvicorn, python-dotenv,
        ...). ``uv_platforms``: platform → uv's ``--python-platform`` value, ``""`` for this
        machine's. Raises :class:`DependencyInstallError` when they cannot be resolved.
        """
        roots: dict[str, list[str]] = {"learner": [], "aggregator": list(self.aggregator_pins)}
        constraints = context / "runtime-build" / "constraints.txt"
        excludes = {}
        for role, lines in roots.items():
            needed: set[str] = set()
            if lines:
                own = context / "host" / f"{role}-own.in"
                write_lines(own, lines)
                needed = uv.resolved_names(own, uv_platforms, constraints)
            excludes[role] = [
                name for name in UNUSED_DEPENDENCIES if canonicalize_name(name) not in needed
            ]
        return excludes

    def _environment_files(self, context: Path) -> EnvironmentFiles:
        """The requirement files of FLOps' runtime environments of other platforms
        (``context/host/``) and the excludes and constraints files of the context."""
        learner = context / "host" / "runtime.txt"
        write_lines(learner, self.learner_pins)
        aggregator = context / "host" / "aggregator.txt"
        write_lines(aggregator, [f"-r {learner}", *self.aggregator_pins])
        return EnvironmentFiles(
            learner=learner,
            aggregator=aggregator,
            learner_excludes=context / "runtime-build" / "excludes.txt",
            aggregator_excludes=context / "aggregator-build" / "excludes.txt",
            constraints=context / "runtime-build" / "constraints.txt",
        )

    # -- shared with the model image builder -------------------------------------------
    def tools(self) -> Buildah:
        """buildah and skopeo with this builder's TLS setting and timeouts. Raises
        :class:`~image_builder.errors.BuildToolMissingError` (naming the install line) when
        either is missing."""
        buildah, skopeo = require_tools()
        return Buildah(
            buildah,
            skopeo,
            tls_verify=self.tls_verify,
            build_timeout_s=self.build_timeout_s,
            push_timeout_s=self.push_timeout_s,
            registry_timeout_s=self.registry_timeout_s,
        )

    def resolve_base(self, tools: Buildah) -> tuple[str, str]:
        """``(base image name without tag or digest, manifest digest)`` of :attr:`base_image`.
        Raises :class:`BaseImageError` if the registry lacks it."""
        info = tools.inspect(self.base_image)
        if info is None:
            raise self._missing_base()
        return strip_tag(self.base_image), str(info["Digest"])

    def _base_refs(self, tools: Buildah, platforms: Sequence[str]) -> tuple[str, dict[str, str]]:
        """``(digest of base_image, {platform: FROM reference name@sha256:...})``.

        A manifest list gives each platform its entry; a single image serves only its own
        platform. Raises :class:`BaseImageError` if the image is missing or lacks a platform.
        """
        raw = tools.inspect_raw(self.base_image)
        if raw is None:
            raise self._missing_base()
        name = strip_tag(self.base_image)
        digest = manifest_digest(raw)
        entries = manifest_entries(json.loads(raw))
        if not entries:
            info = tools.inspect(f"{name}@{digest}") or {}
            entries = {f"{info.get('Os', 'linux')}/{info.get('Architecture', '')}": digest}
        missing = [platform for platform in platforms if platform not in entries]
        if missing:
            raise BaseImageError(
                f"The base image {self.base_image} has no {' or '.join(missing)} image (it "
                f"has {', '.join(sorted(entries))}); push a manifest list with every platform "
                "in supported_platforms, or build for fewer platforms."
            )
        return digest, {platform: f"{name}@{entries[platform]}" for platform in platforms}

    def _missing_base(self) -> BaseImageError:
        return BaseImageError(
            f"The base image {self.base_image} does not exist in its registry; push it "
            "there or configure another base image."
        )

    def find_reusable(
        self,
        tools: Buildah,
        role: str,
        key: str,
        platforms: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
    ) -> BuiltImage | None:
        """The ``role`` image tagged ``key`` if the registry has it with matching inputs
        (:data:`LABEL_INPUTS_HASH` is ``key``), reported as :attr:`BuildStep.IMAGE_REUSED`.

        ``platforms``: one ``os/arch`` (recorded in ``platform_digests``; none: not recorded),
        or several: the manifest list tagged ``key`` if it holds exactly these and its first
        image has matching inputs. Raises :class:`RegistryUnreachableError`.
        """
        started = time.monotonic()
        ref = f"{self.repository(role)}:{key}"
        if len(platforms) > 1:
            raw = tools.inspect_raw(ref)
            entries = {} if raw is None else manifest_entries(json.loads(raw))
            if raw is None or sorted(entries) != sorted(platforms):
                return None
            info = tools.inspect(f"{self.repository(role)}@{entries[platforms[0]]}")
            digest = manifest_digest(raw)
        else:
            info = tools.inspect(ref)
            digest = "" if info is None else str(info["Digest"])
            entries = {platforms[0]: digest} if platforms else {}
        if info is None or (info.get("Labels") or {}).get(LABEL_INPUTS_HASH) != key:
            return None
        image = self._image(role, key, digest, entries, reused=True, started=started)
        (on_progress or no_progress)(
            BuildStep.IMAGE_REUSED,
            {"role": role, "ref": image.pinned_ref, "digest": digest, "seconds": image.seconds},
        )
        return image

    @contextmanager
    def key_lock(self, key: str) -> Iterator[None]:
        """Hold the build lock of ``key`` (``cache_dir/locks/<key>.lock``) for the ``with``
        block, making ``cache_dir/logs``. Raises :class:`ImageBuildError` after
        ``lock_timeout_s`` seconds of waiting for another build of the same key."""
        locks = self.cache_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "logs").mkdir(parents=True, exist_ok=True)
        with file_lock(locks / f"{key}.lock", self.lock_timeout_s, error=ImageBuildError):
            yield

    def build_and_push(
        self,
        tools: Buildah,
        context: Path,
        role: str,
        key: str,
        containerfiles: Mapping[str, Path],
        on_progress: ProgressCallback | None = None,
    ) -> BuiltImage:
        """Build ``role`` from ``containerfiles`` (platform → Containerfile in ``context``) and
        push it as ``repository(role):key``: the image itself for one platform, a manifest list
        of them for several (whose images are named ``key-<arch>`` locally). Hold
        :meth:`key_lock`.

        Reports :attr:`BuildStep.IMAGE_BUILT` per platform and :attr:`BuildStep.IMAGE_PUSHED`.
        Raises :func:`~image_builder.buildah.build_failure`'s errors,
        :class:`ImageBuildError` and :class:`~image_builder.errors.ImagePushError`.
        """
        report = on_progress or no_progress
        started = time.monotonic()
        ref = f"{self.repository(role)}:{key}"
        local: dict[str, str] = {}
        for platform, containerfile in containerfiles.items():
            step = time.monotonic()
            suffix = _platform_suffix(platform, len(containerfiles))
            tools.build(
                context, containerfile, tag=f"{ref}{suffix}", platform=platform, role=role,
                log_path=self.log_path(key, role, suffix),
                volumes=[f"{self.uv_cache_dir}:/mnt:O"],
            )  # fmt: skip
            report(
                BuildStep.IMAGE_BUILT,
                {"role": role, "platform": platform, "seconds": time.monotonic() - step},
            )
            local[platform] = f"{ref}{suffix}"
        step = time.monotonic()
        digest_file = self.cache_dir / "logs" / f"{key}-{role}.digest"
        if len(local) > 1:
            digest, platform_digests = tools.push_manifest_list(ref, local, digest_file)
        else:
            digest = tools.push(ref, digest_file)
            platform_digests = {platform: digest for platform in local}
        image = self._image(role, key, digest, platform_digests, reused=False, started=started)
        report(
            BuildStep.IMAGE_PUSHED,
            {"role": role, "ref": image.pinned_ref, "digest": digest,
             "platform_digests": platform_digests, "seconds": time.monotonic() - step},
        )  # fmt: skip
        return image

    def _image(
        self,
        role: str,
        key: str,
        digest: str,
        platform_digests: Mapping[str, str],
        *,
        reused: bool,
        started: float,
    ) -> BuiltImage:
        """The :class:`BuiltImage` of ``role`` tagged ``key``; ``started``: ``time.monotonic()``
        when the work on it began."""
        return BuiltImage(
            role=role,
            repository=self.repository(role),
            tag=key,
            digest=digest,
            reused=reused,
            seconds=time.monotonic() - started,
            platform_digests=dict(platform_digests),
        )


def _platform_suffix(platform: str, platform_count: int) -> str:
    """``-<arch>`` (``-arm64``) naming one image of a manifest list; ``""`` for a single one."""
    return f"-{PLATFORMS[platform].arch}" if platform_count > 1 else ""


def _wheel_listing(directories: Sequence[str]) -> list[str]:
    """``<n>/<file name> <size>`` of the files in the local wheel directories ``directories``
    (sorted): keys the repository environment's layer by what they offer."""
    listing = []
    for index, directory in enumerate(directories):
        for path in sorted(Path(directory).iterdir()):
            if path.is_file():
                listing.append(f"{index}/{path.name} {path.stat().st_size}")
    return listing


def _link_wheels(source: Path, dest: Path) -> None:
    """Hard-link (else copy) the files of the wheel directory ``source`` into ``dest``."""
    dest.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            link_or_copy(path, dest / path.name)


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


# -- Containerfiles ----------------------------------------------------------------------------
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
        user_check=shlex.quote(USER_ENV_IMPORT_CHECK),
        role=role,
        module=role,
        labels=_role_labels(role, labels),
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
    the build context directory of its assembled environment
    (:class:`~image_builder.cross_platform.CrossEnvironment`, ``cross-arm64``); ``deps_dir``:
    its subdirectory holding the dependency layer (``deps``, or ``aggregator-deps``).
    ``labels`` as for :func:`render_containerfile`.
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
        labels=_role_labels(role, labels),
    )


def _role_labels(role: str, labels: Mapping[str, str]) -> str:
    """The ``LABEL`` arguments: ``org.opencontainers.image.title`` ``flops-<role>`` and
    ``labels``."""
    return label_arguments({"org.opencontainers.image.title": f"flops-{role}", **labels})
