"""The ``oci`` builder: one learner and one aggregator OCI image per project inputs, in a registry.

:meth:`OciBuilder.build` runs the same fetch-and-validate step as the ``venv`` builder
(:func:`image_builder.repo.checked_out_repo`) and plans the same installs
(:mod:`image_builder.python_env`: the runtime packages pinned to the manager's versions, the
manager's other distributions as constraints). It then builds, with buildah
(``buildah build --isolation chroot --layers``, daemonless, no OCI runtime needed), from
``templates/Containerfile.in``:

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

Images are pushed as ``<registry>/<namespace>/learner:<key>`` and ``.../aggregator:<key>``
(:meth:`OciBuilder.image_key`: a hash of the commit, dependency hash, base image digest, ML
model flavor, platform, the runtime versions, the generated requirement and constraint files,
the FLOps runtime code and the templates). A tag already in the registry with the same
:data:`LABEL_INPUTS_HASH` is reused without building (``skopeo inspect``). After a push the
registry's digest is checked against buildah's.

Scope of this first increment: single-platform images for the machine's own platform;
repositories whose requirements install from wheels or pure-Python sources (the images carry
no compilers) on the base image's Python. ``cache_dir`` holds build locks and the last build log
per image (``logs/<key>-<role>.log``); layers live in buildah's storage
(``/var/lib/containers/storage`` for root).
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
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from flops_utils.logging import logger
from flops_utils.processes import stop_process_groups
from flops_utils.types import MLModelFlavor
from image_builder.dependencies import resolve_local_paths
from image_builder.errors import (
    BaseImageError,
    BuilderError,
    BuildToolMissingError,
    ImageBuildError,
    ImagePushError,
    RegistryUnreachableError,
)
from image_builder.python_env import (
    RUNTIME_PACKAGES,
    dependency_install_error,
    file_lock,
    manager_versions,
    plan_install,
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

IMAGE_FORMAT_VERSION = 1
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

IMAGE_UID = 10001
"""uid and gid of the non-root ``flops`` user the images run as."""

LABEL_INPUTS_HASH = "org.flops.inputs-hash"
"""Image label holding :meth:`OciBuilder.image_key`; a registry tag is reused only if it matches."""

TEMPLATES = Path(__file__).resolve().parent / "templates"
"""``Containerfile.in`` (a :class:`string.Template`) and ``install.sh``."""

REPO_MOUNT = Path("/opt/flops/build/repo")
"""Where the install steps see the repository (for requirements naming local paths)."""

DEPENDENCY_INSTALL_EXIT = 42
"""Exit status of ``install.sh`` when no uv attempt could install the requirements."""

_MACHINE_TO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_NOT_FOUND = re.compile(r"manifest unknown|name unknown|not found|no such image", re.IGNORECASE)
_LOGRUS_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_STEP = re.compile(r"^STEP (\d+/\d+): (.*)$")
_BUILDAH_NOISE = re.compile(
    r"^(subprocess exited with status|error building at step|error: building at step|"
    r"time=|\[\d+/\d+\] step)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class BuiltImage:
    """One image in the registry.

    ``role``: ``"learner"`` or ``"aggregator"``. ``repository``: ``registry/namespace/role``;
    ``tag``: the inputs key (32 hex); ``digest``: the manifest digest in the registry
    (``sha256:...``). ``reused``: ``True`` if the tag was in the registry already (nothing
    built). ``seconds``: wall time spent on this image (build and push, or the registry check).
    """

    role: str
    repository: str
    tag: str
    digest: str
    reused: bool
    seconds: float

    @property
    def ref(self) -> str:
        """``repository:tag``."""
        return f"{self.repository}:{self.tag}"

    @property
    def pinned_ref(self) -> str:
        """``repository@digest``: what an orchestrator should deploy."""
        return f"{self.repository}@{self.digest}"


@dataclass(frozen=True)
class BuiltImages:
    """The learner and aggregator images of one project's inputs.

    ``commit``: git SHA (40 hex) or content hash (64 hex) of a plain directory. ``key``: the
    shared tag (:meth:`OciBuilder.image_key`). ``cache_hit``: both images were reused.
    ``seconds``: wall time of :meth:`OciBuilder.build`.
    """

    learner: BuiltImage
    aggregator: BuiltImage
    commit: str
    key: str
    cache_hit: bool
    seconds: float

    @property
    def images(self) -> tuple[BuiltImage, BuiltImage]:
        """``(learner, aggregator)``."""
        return (self.learner, self.aggregator)


class OciBuilder:
    """Builds and pushes learner and aggregator images with buildah.

    ``cache_dir``: build locks and logs (created if missing). ``registry``: ``host[:port]`` the
    images are pushed to, e.g. ``"127.0.0.1:5000"``; ``namespace``: path under it (default
    ``"flops"``). ``base_image``: full reference of an image with Python 3.11 (matching the
    manager, whose package versions are pinned) and ``useradd``, e.g.
    ``"registry.local/flops/base:bookworm"``. ``python``: the interpreter's name or path in the
    base image (default ``"python3"``). ``tls_verify``: ``False`` for a plain-HTTP registry
    (both the target and the base image's). Timeouts are seconds: ``build_timeout_s`` per
    ``buildah build`` (default 1800), ``push_timeout_s`` per push (default 900),
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
        """SHA-256 (hex) of ``Containerfile.in`` and ``install.sh``."""
        digest = hashlib.sha256()
        for name in ("Containerfile.in", "install.sh"):
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
        ``base_digest`` (not its name: a registry that moves keeps its images' keys),
        ``flavor``, ``platform`` (``linux/amd64``), the base image's interpreter name, the
        runtime pins, the manager's distribution versions (the constraints), ``staged``
        (build context directory → content hash: the generated requirement and constraint
        files and the FLOps runtime code copied into each image) and :attr:`templates_hash`.
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
            "runtime_env": sorted(f"{n}=={v}" for n, v in self.installed_versions.items()),
            "staged": dict(sorted(staged.items())),
            "templates": self.templates_hash,
        }
        encoded = json.dumps(material, sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:32]

    # -- the build ---------------------------------------------------------------------
    def build(
        self,
        ml_repo_url: str,
        ref: str | None,
        workdir: Path,
        *,
        flavor: str = MLModelFlavor.PYTORCH,
        platform: str | None = None,
    ) -> BuiltImages:
        """Return the learner and aggregator images for ``ml_repo_url`` at ``ref``, building
        and pushing the ones the registry lacks.

        ``ref``: branch, tag or commit; ``None`` for the default branch. ``workdir``: scratch
        directory for the clone and the build context (created if missing; cleaned).
        ``flavor``: the SLA's ``ml_model_flavor`` (default ``pytorch``, as in the SLA).
        ``platform``: ``os/arch``; default and only supported value: this machine's.
        Raises the repository errors of :func:`~image_builder.repo.checked_out_repo`,
        :class:`~image_builder.errors.BuildToolMissingError` (buildah or skopeo missing),
        ``RegistryUnreachableError``, ``BaseImageError``, ``DependencyInstallError`` (a
        requirement cannot be installed; uv's message condensed), ``ImageBuildError`` (a failed
        build step with its last output lines, an unsupported platform or flavor, a timeout)
        and ``ImagePushError``.
        """
        started = time.monotonic()
        buildah, skopeo = _require_tools()
        platform = platform or host_platform()
        if platform != host_platform():
            raise ImageBuildError(
                f"Building {platform} images on this {host_platform()} machine is not supported "
                f"yet; build on a {platform} machine or drop it from supported_platforms."
            )
        if flavor not in {member.value for member in MLModelFlavor}:
            raise ImageBuildError(
                f"Unknown ML model flavor {flavor!r}; use one of "
                f"{', '.join(member.value for member in MLModelFlavor)}."
            )
        base_name, base_digest = self._resolve_base(skopeo)
        workdir = Path(workdir)
        with checked_out_repo(
            ml_repo_url, ref, workdir, timeout_s=self.git_timeout_s, exclude=[self.cache_dir]
        ) as checked_out:
            context = Path(tempfile.mkdtemp(prefix="oci-context-", dir=workdir))
            try:
                staged = self._stage_context(context, checked_out)
                commit = checked_out.fetched.commit
                key = self.image_key(
                    commit, checked_out.dependencies_hash, base_digest, str(flavor), platform,
                    staged,
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
                images = self._build_roles(
                    buildah, skopeo, context, key, f"{base_name}@{base_digest}", labels, platform
                )
            finally:
                shutil.rmtree(context, ignore_errors=True)
        seconds = time.monotonic() - started
        cache_hit = all(image.reused for image in images.values())
        logger.info(
            "images %s for %s@%s %s in %.2f s",
            key, checked_out.fetched.source, commit[:12], "reused" if cache_hit else "built",
            seconds,
        )  # fmt: skip
        return BuiltImages(
            learner=images["learner"],
            aggregator=images["aggregator"],
            commit=commit,
            key=key,
            cache_hit=cache_hit,
            seconds=seconds,
        )

    def _build_roles(
        self,
        buildah: str,
        skopeo: str,
        context: Path,
        key: str,
        base_ref: str,
        labels: Mapping[str, str],
        platform: str,
    ) -> dict[str, BuiltImage]:
        """Reuse or build each role's image; builds of one key are serialized by a lock."""
        images: dict[str, BuiltImage] = {}
        missing = []
        for role in ROLES:
            reused = self._find_reusable(skopeo, role, key)
            if reused is None:
                missing.append(role)
            else:
                images[role] = reused
        if not missing:
            return images
        locks = self.cache_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "logs").mkdir(parents=True, exist_ok=True)
        with file_lock(locks / f"{key}.lock", self.lock_timeout_s, error=ImageBuildError):
            for role in missing:
                reused = self._find_reusable(skopeo, role, key)  # built meanwhile by another
                if reused is not None:
                    images[role] = reused
                    continue
                role_started = time.monotonic()
                containerfile = context / f"Containerfile.{role}"
                containerfile.write_text(render_containerfile(role, base_ref, self.python, labels))
                self._buildah_build(buildah, context, containerfile, role, key, platform)
                digest = self._push(buildah, skopeo, role, key)
                images[role] = BuiltImage(
                    role=role,
                    repository=self.repository(role),
                    tag=key,
                    digest=digest,
                    reused=False,
                    seconds=time.monotonic() - role_started,
                )
        return images

    def _stage_context(self, context: Path, checked_out: CheckedOutRepo) -> dict[str, str]:
        """Write the build context; return the content hash of each directory in it but the
        repository and the tools (those are keyed by the commit; uv's binary does not change
        what is installed).

        Layout: ``build/`` (requirements.txt, constraints.txt, install.sh), ``<role>-build/
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
        shutil.copyfile(TEMPLATES / "install.sh", build / "install.sh")
        _write_lines(context / "learner-build" / "requirements.txt", [])
        _write_lines(
            context / "aggregator-build" / "requirements.txt",
            ["-r /opt/flops/build/requirements.txt", *self.aggregator_pins],
        )
        for role in ROLES:
            for entry in ROLE_SOURCES[role]:
                _copy_source(entry, context / f"{role}-runtime")
        staged = {
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
        return staged

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

    def _find_reusable(self, skopeo: str, role: str, key: str) -> BuiltImage | None:
        """The ``role`` image tagged ``key`` if the registry has it with matching inputs."""
        started = time.monotonic()
        info = self._inspect(skopeo, f"{self.repository(role)}:{key}")
        labels = (info or {}).get("Labels") or {}
        if info is None or labels.get(LABEL_INPUTS_HASH) != key:
            return None
        return BuiltImage(
            role=role,
            repository=self.repository(role),
            tag=key,
            digest=str(info["Digest"]),
            reused=True,
            seconds=time.monotonic() - started,
        )

    def _inspect(self, skopeo: str, image: str) -> dict[str, Any] | None:
        """``skopeo inspect`` of ``image`` (``host/path:tag``); ``None`` if it does not exist.

        Raises :class:`RegistryUnreachableError` for any other failure (connection, TLS,
        authentication), with skopeo's reason in the message.
        """
        command = [
            skopeo, "inspect", f"--tls-verify={str(self.tls_verify).lower()}",
            "--retry-times", "2", f"docker://{image}",
        ]  # fmt: skip
        result = _run(command, self.registry_timeout_s, f"skopeo inspect {image}")
        if result.returncode == 0:
            parsed: dict[str, Any] = json.loads(result.stdout)
            return parsed
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
        self, buildah: str, context: Path, containerfile: Path, role: str, key: str, platform: str
    ) -> None:
        """Run ``buildah build``; its output goes to ``cache_dir/logs/<key>-<role>.log``."""
        log_path = self.cache_dir / "logs" / f"{key}-{role}.log"
        command = [
            buildah, "build", "--isolation", "chroot", "--layers", "--force-rm",
            "--platform", platform, f"--tls-verify={str(self.tls_verify).lower()}",
            "--volume", f"{self._uv_cache_dir}:/mnt:O",
            "-f", str(containerfile), "-t", f"{self.repository(role)}:{key}", str(context),
        ]  # fmt: skip
        started = time.monotonic()
        logger.info("building the %s image %s:%s", role, self.repository(role), key)
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

    @cached_property
    def _uv_cache_dir(self) -> Path:
        """The host's uv cache (``uv cache dir``), created if missing; mounted as an overlay."""
        result = _run([*uv_command(), "cache", "dir"], 60, "uv cache dir")
        path = Path(result.stdout.strip()) if result.returncode == 0 else None
        if path is None or not path.is_absolute():
            path = self.cache_dir / "uv-cache"
        path.mkdir(parents=True, exist_ok=True)
        return path


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
    all_labels = {"org.opencontainers.image.title": f"flops-{role}", **labels}
    label_text = " \\\n      ".join(f"{name}={_quote(value)}" for name, value in all_labels.items())
    template = string.Template((TEMPLATES / "Containerfile.in").read_text(encoding="utf-8"))
    return template.substitute(
        base_image=base_ref,
        uid=uid,
        python=shlex.quote(python),
        role=role,
        module=role,
        labels=label_text,
    )


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
