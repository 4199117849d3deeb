"""The builder backends as the project lifecycle sees them: a project's SLA in, a
:class:`BuildResult` out.

- ``venv`` (:class:`VenvProjectBuilder`): a virtualenv on this machine
  (:class:`image_builder.venv_builder.VenvBuilder`), for the ``local`` orchestrator.
- ``oci`` (:class:`ImageBuildService`): learner and aggregator images in a registry, built by
  the image builder service (``python -m image_builder.main``, :mod:`image_builder.main`) run
  as a child process; it reports ``flops/<project>/builder/...`` over MQTT, which the manager's
  listener records as project events, and writes its outcome to a result file read here. For
  orchestrators that pull images (``oakestra``).

Trained-model images on the embedded default: the ``venv`` builder gets an
:class:`ImageBuildService` for them when a registry is at hand: ``FLOPS_REGISTRY``, or the
suite's embedded one (:mod:`flops_manager.embedded_registry`). Without ``FLOPS_BASE_IMAGE``
the base image is made by the manager on the first build that needs it
(:class:`~flops_manager.base_image.BaseImageMaker`, debootstrap from the machine's apt mirror;
its milestones are the project's builder progress events).

:data:`BUILDERS` maps the ``FLOPS_BUILDER`` names to factories; :func:`make_builder` checks the
settings each one needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flops_manager.errors import ConfigurationError
from flops_utils import env_vars
from flops_utils.contract.exit_codes import Role, describe_exit
from flops_utils.contract.messages import BuilderProgress
from flops_utils.logging import logger
from flops_utils.notifications import StatusNotifier
from flops_utils.types import Component, ComponentStatus
from image_builder.build_processes import BuildRegistry, run_bounded
from image_builder.errors import BuilderError
from image_builder.python_env import redact_paths

if TYPE_CHECKING:
    from flops_manager.base_image import BaseImageMaker
    from flops_manager.config import ManagerConfig
    from flops_manager.sla import ProjectSLA
    from image_builder.repo import FetchLimits

SERVICE_STOP_GRACE_S = 15.0
"""Seconds a cancelled image builder service gets to stop its own processes (git, uv,
buildah) before its process group is killed."""

DEFAULT_BUILD_TIMEOUT_S = 3600.0
"""How long :class:`ImageBuildService` lets one image build run (cold multi-platform builds of
large repositories take tens of minutes on small machines)."""


@dataclass(frozen=True)
class BuildResult:
    """What a builder hands to the orchestrator.

    ``commit``: git SHA (40 hex) or content hash (64 hex). ``key``: the environment or image
    key (32 hex). ``cache_hit``: nothing was built. ``seconds``: wall time of the build.
    ``python``: the interpreter that runs the learner and aggregator (FLOps' own environment,
    the manager's; ``venv``; ``None`` for images). ``user_python``: the interpreter of the
    repository's own environment, where the model worker runs the repository's code
    (``FLOPS_USER_PYTHON``). ``repo_dir``: the repository copy (``venv``). ``images``: role
    (``learner``, ``aggregator``) → pinned reference ``registry/namespace/role@sha256:...``
    (``oci``; empty for a virtualenv). ``notes``: sentences for the user about the build (e.g.
    another Python version asked for). ``versions``: key distributions of the repository's
    environment and their versions.
    """

    commit: str
    key: str
    cache_hit: bool
    seconds: float
    python: Path | None = None
    repo_dir: Path | None = None
    images: Mapping[str, str] = field(default_factory=dict)
    user_python: Path | None = None
    notes: tuple[str, ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The JSON form stored in the project document's ``environment`` field."""
        doc: dict[str, Any] = {
            "commit": self.commit,
            "key": self.key,
            "cache_hit": self.cache_hit,
            "seconds": round(self.seconds, 3),
        }
        if self.python is not None:
            doc["python"] = str(self.python)
        if self.user_python is not None:
            doc["user_python"] = str(self.user_python)
        if self.repo_dir is not None:
            doc["repo_dir"] = str(self.repo_dir)
        if self.versions:
            doc["versions"] = dict(self.versions)
        if self.notes:
            doc["notes"] = list(self.notes)
        if self.images:
            doc["images"] = dict(self.images)
        return doc


class ProjectBuilder(Protocol):
    """A builder backend: turns a project's ML repository into something runnable."""

    produces_images: bool
    """True when :meth:`build` returns OCI images (``BuildResult.images``)."""

    def cancel(self, project_id: str) -> bool:
        """Stop the running build of ``project_id`` (its git, installer or image builder
        processes, whole process groups); the build then raises
        :class:`~image_builder.errors.BuildCancelled`. ``False`` when none is running."""
        ...

    def build(self, project_id: str, sla: ProjectSLA, workdir: Path) -> BuildResult:
        """Build (or reuse) what runs ``sla``'s repository; ``workdir`` is scratch space.
        Raises :class:`~flops_utils.errors.FlopsError` subclasses naming cause and fix."""
        ...

    def build_model_image(
        self,
        project_id: str,
        model_uri: str,
        mlflow_url: str,
        workdir: Path,
        tracking_env: Mapping[str, str] | None = None,
    ) -> ModelImageResult:
        """Build (or reuse) the image serving the MLflow model ``model_uri``, read from the
        tracking server with ``tracking_env`` (the project's ``MLFLOW_TRACKING_USERNAME`` /
        ``_PASSWORD``); only called when :attr:`produces_images`."""
        ...


def builds_model_images(builder: ProjectBuilder) -> bool:
    """Whether ``builder`` builds trained-model images (:meth:`ProjectBuilder.
    build_model_image`): an image builder does; the ``venv`` builder when it was given an
    image builder service for them (:attr:`VenvProjectBuilder.model_images`)."""
    return bool(getattr(builder, "builds_model_images", builder.produces_images))


class VenvProjectBuilder:
    """The ``venv`` backend: :class:`~image_builder.venv_builder.VenvBuilder` under
    ``cache_dir``. It makes no images for the learners and aggregators; ``model_images``, an
    :class:`ImageBuildService` (a registry and a base image), builds the trained-model images
    when given (``None``: none)."""

    produces_images = False

    def __init__(
        self,
        cache_dir: Path,
        *,
        fetch_limits: FetchLimits | None = None,
        allow_local_packages: bool = False,
        model_images: ImageBuildService | None = None,
    ) -> None:
        from image_builder.venv_builder import VenvBuilder

        self.venv = VenvBuilder(
            cache_dir, fetch_limits=fetch_limits, allow_local_packages=allow_local_packages
        )
        self.builds = BuildRegistry()
        self.model_images = model_images

    @property
    def builds_model_images(self) -> bool:
        """True when :attr:`model_images` is set."""
        return self.model_images is not None

    def build(self, project_id: str, sla: ProjectSLA, workdir: Path) -> BuildResult:
        """The cached environment of ``sla.ml_repo_url`` at ``sla.ml_repo_ref`` (built if
        missing) as ``user_python``; the roles run with this process's interpreter. Raises the
        errors of :meth:`VenvBuilder.build`, and ``BuildCancelled`` after :meth:`cancel`."""
        with self.builds.scope(project_id):
            env = self.venv.build(sla.ml_repo_url, sla.ml_repo_ref, workdir)
        return BuildResult(
            commit=env.commit,
            key=env.key,
            cache_hit=env.cache_hit,
            seconds=env.seconds,
            python=Path(sys.executable),
            repo_dir=env.repo_dir,
            user_python=env.python,
            notes=env.notes,
            versions=env.versions,
        )

    def cancel(self, project_id: str) -> bool:
        """Stop the running build of ``project_id`` (:meth:`BuildRegistry.cancel`: its git
        and uv processes, by process group, or its trained-model image build); ``False`` when
        none is running."""
        cancelled = self.builds.cancel(project_id)
        if self.model_images is not None:
            cancelled = self.model_images.cancel(project_id) or cancelled
        return cancelled

    def build_model_image(
        self,
        project_id: str,
        model_uri: str,
        mlflow_url: str,
        workdir: Path,
        tracking_env: Mapping[str, str] | None = None,
    ) -> ModelImageResult:
        """The trained-model image built by :attr:`model_images`
        (:meth:`ImageBuildService.build_model_image`). Raises :class:`ImageBuildFailed`
        without it (no registry configured) and as that method does."""
        if self.model_images is None:
            raise ImageBuildFailed(
                "This manager builds no trained-model images: install buildah, "
                "docker-registry and debootstrap (its embedded registry and base image), or "
                "set FLOPS_REGISTRY and FLOPS_BASE_IMAGE (a registry and a Python 3.11 base "
                "image in it) and install buildah."
            )
        return self.model_images.build_model_image(
            project_id, model_uri, mlflow_url, workdir, tracking_env
        )


class ImageBuildFailed(BuilderError):
    """The image builder service reported a failure (its message says why and what to do) or
    ended without an outcome."""

    code = "image_build_service_failed"


@dataclass(frozen=True)
class RegistrySettings:
    """Where images go and what they are built from.

    ``registry``: ``host[:port]`` pushed to; ``base_image``: reference of a Python 3.11 image;
    ``namespace``: path under the registry; ``tls_verify``: ``False`` for plain HTTP;
    ``public_registry``: ``host[:port]`` the same registry is pulled from by workers and users
    when that differs from ``registry`` (empty: ``registry``).
    """

    registry: str
    base_image: str
    namespace: str = "flops"
    tls_verify: bool = True
    public_registry: str = ""

    def public_ref(self, ref: str) -> str:
        """``ref`` (``registry/namespace/role@sha256:...``) under ``public_registry``: the same
        image (same digest), named as the workers and users reach the registry."""
        pushed_prefix = f"{self.registry}/"
        if self.public_registry and ref.startswith(pushed_prefix):
            return f"{self.public_registry}/{ref.removeprefix(pushed_prefix)}"
        return ref

    def environment(self) -> dict[str, str]:
        """The image builder's ``FLOPS_*`` variables for these settings."""
        return {
            env_vars.REGISTRY: self.registry,
            env_vars.BASE_IMAGE: self.base_image,
            env_vars.REGISTRY_NAMESPACE: self.namespace,
            env_vars.REGISTRY_TLS_VERIFY: str(self.tls_verify).lower(),
        }


class ImageBuildService:
    """The ``oci`` backend: runs ``python -m image_builder.main`` per project on this machine.

    ``settings``: the registry and base image. ``cache_dir``: the builder's locks and logs.
    ``mqtt_url``: the broker the service reports to. ``timeout_s``: seconds one build may run
    (default :data:`DEFAULT_BUILD_TIMEOUT_S`). ``python``: interpreter that runs the service
    (default: the manager's own). ``base_images``: makes the base image when
    ``settings.base_image`` is empty (:class:`~flops_manager.base_image.BaseImageMaker`).
    """

    produces_images = True

    def __init__(
        self,
        settings: RegistrySettings,
        cache_dir: Path,
        mqtt_url: str,
        *,
        timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
        python: str = sys.executable,
        base_images: BaseImageMaker | None = None,
    ) -> None:
        if not settings.base_image and base_images is None:
            raise ValueError("RegistrySettings.base_image is empty and no base_images is given")
        self.settings = settings
        self.base_images = base_images
        self.cache_dir = Path(cache_dir)
        self.mqtt_url = mqtt_url
        self.timeout_s = timeout_s
        self.python = python
        self.builds = BuildRegistry()
        self.service_credentials: Callable[[str], dict[str, str]] = lambda project_id: {}
        """The builder service's own credentials for a project id (its MQTT user); the
        suite sets it to :meth:`ProjectCredentials.builder`."""

    def cancel(self, project_id: str) -> bool:
        """Stop the running image build of ``project_id``: SIGTERM to the service's process
        group (the service then stops its git, uv and buildah processes and exits), SIGKILL
        after :data:`~image_builder.build_processes.STOP_GRACE_S` seconds. ``False`` when
        none is running."""
        return self.builds.cancel(project_id)

    def environment(
        self,
        project_id: str,
        sla: ProjectSLA,
        workdir: Path,
        credentials: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The service's ``FLOPS_*`` variables for one project (see :mod:`image_builder.main`);
        ``credentials``: its MQTT user (default: :attr:`service_credentials`)."""
        if credentials is None:
            credentials = self.service_credentials(project_id)
        env = {
            **credentials,
            env_vars.PROJECT_ID: project_id,
            env_vars.MQTT_URL: self.mqtt_url,
            env_vars.ML_REPO_URL: sla.ml_repo_url,
            env_vars.ML_MODEL_FLAVOR: sla.ml_model_flavor.value,
            env_vars.PLATFORMS: ",".join(p.value for p in sla.supported_platforms),
            env_vars.BUILD_CACHE_DIR: str(self.cache_dir),
            env_vars.BUILD_WORKDIR: str(workdir),
            env_vars.BUILD_RESULT_FILE: str(workdir / "result.json"),
            **self._settings(project_id, credentials).environment(),
        }
        if sla.ml_repo_ref:
            env[env_vars.ML_REPO_REF] = sla.ml_repo_ref
        return env

    def build(self, project_id: str, sla: ProjectSLA, workdir: Path) -> BuildResult:
        """Run the image builder service for ``sla`` and return its images.

        Its output goes to ``workdir/image-builder.log``. Raises :class:`ImageBuildFailed` with
        the service's own message (e.g. the resolver's) when it fails, does not finish within
        :attr:`timeout_s` seconds, or ends without writing an outcome.
        """
        workdir = Path(workdir)
        with self.builds.scope(project_id):
            outcome = self._run_service(self.environment(project_id, sla, workdir), workdir)
        images = {
            role: self.settings.public_ref(str(image["ref"]))
            for role, image in outcome["images"].items()
        }
        return BuildResult(
            commit=str(outcome["commit"]),
            key=str(outcome["key"]),
            cache_hit=bool(outcome["cache_hit"]),
            seconds=float(outcome["seconds"]),
            images=images,
        )

    def build_model_image(
        self,
        project_id: str,
        model_uri: str,
        mlflow_url: str,
        workdir: Path,
        tracking_env: Mapping[str, str] | None = None,
    ) -> ModelImageResult:
        """Run the image builder service for the trained-model image of ``model_uri`` (an
        MLflow model URI such as ``models:/<name>/<version>``) held by the tracking server at
        ``mlflow_url``, read with ``tracking_env`` (the project's MLflow user). Raises
        :class:`ImageBuildFailed` as :meth:`build` does."""
        workdir = Path(workdir)
        credentials = self.service_credentials(project_id)
        settings = {
            **(tracking_env or {}),
            **credentials,
            env_vars.PROJECT_ID: project_id,
            env_vars.MQTT_URL: self.mqtt_url,
            env_vars.MODEL_URI: model_uri,
            env_vars.MLFLOW_URL: mlflow_url,
            env_vars.BUILD_CACHE_DIR: str(self.cache_dir),
            env_vars.BUILD_WORKDIR: str(workdir),
            env_vars.BUILD_RESULT_FILE: str(workdir / "result.json"),
        }
        with self.builds.scope(project_id):
            settings.update(self._settings(project_id, credentials).environment())
            outcome = self._run_service(settings, workdir)
        image = outcome["images"]["model"]
        return ModelImageResult(
            ref=self.settings.public_ref(str(image["ref"])),
            model_uri=str(outcome["model_uri"]),
            port=int(outcome["port"]),
            reused=bool(image["reused"]),
            seconds=float(outcome["seconds"]),
        )

    def _settings(self, project_id: str, credentials: Mapping[str, str]) -> RegistrySettings:
        """:attr:`settings` with the base image made first when none is configured; its
        milestones are published as the project's builder ``progress`` messages, with the
        builder's MQTT user ``credentials``. Raises :class:`ImageBuildFailed` when the base
        image cannot be made."""
        if self.settings.base_image or self.base_images is None:
            return self.settings
        from flops_manager.base_image import BaseImageError

        with _ProgressPublisher(self.mqtt_url, project_id, credentials) as progress:
            try:
                base = self.base_images.ref(progress)
            except BaseImageError as exc:
                raise ImageBuildFailed(
                    f"Making the Python 3.11 base image failed: {exc}", details=[str(exc)]
                ) from exc
        return dataclasses.replace(self.settings, base_image=base)

    def _run_service(self, settings: dict[str, str], workdir: Path) -> dict[str, Any]:
        """Run ``python -m image_builder.main`` with ``settings``; its successful outcome.

        Output goes to ``workdir/image-builder.log``; the outcome is read from
        ``settings[FLOPS_BUILD_RESULT_FILE]``. Raises :class:`ImageBuildFailed`.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        result_file = Path(settings[env_vars.BUILD_RESULT_FILE])
        result_file.unlink(missing_ok=True)
        log_path = workdir / "image-builder.log"
        log_path.unlink(missing_ok=True)
        with log_path.open("ab") as log:
            returncode = run_bounded(
                [self.python, "-m", "image_builder.main"],
                timeout_s=self.timeout_s,
                timeout_error=lambda: ImageBuildFailed(
                    f"The image build did not finish within {self.timeout_s:.0f} s; the "
                    "manager's image-builder.log of the project has its output (ask the "
                    "admin), or raise the build timeout."
                ),
                env={**os.environ, **settings},
                stdout=log,
                stop_grace_s=SERVICE_STOP_GRACE_S,
            ).returncode
        outcome = _read_outcome(result_file)
        if outcome.get("status") == "success":
            logger.info(
                "project %s: images %s in %.1f s",
                settings[env_vars.PROJECT_ID], str(outcome["key"])[:12], outcome["seconds"],
            )  # fmt: skip
            return outcome
        if outcome.get("message"):
            hidden = {str(workdir): "<build directory>", str(self.cache_dir): "<builder cache>"}
            raise ImageBuildFailed(
                redact_paths(str(outcome["message"]), hidden),
                details=[f"error: {outcome.get('error')}", *outcome.get("details", [])],
            )
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise ImageBuildFailed(
            f"The image builder {describe_exit(Role.BUILDER, returncode)} It wrote no outcome; "
            "the manager's image-builder.log of the project has its output.",
            details=tail,
        )


class _ProgressPublisher:
    """Publishes the manager's own milestones of a build (making the base image) as the
    project's builder ``progress`` messages, connecting on the first one; a context manager
    that disconnects at its end (before the builder service connects with the same user).
    A message that cannot be published is logged, never raised."""

    def __init__(self, mqtt_url: str, project_id: str, credentials: Mapping[str, str]) -> None:
        self.mqtt_url = mqtt_url
        self.project_id = project_id
        self.credentials = credentials
        self._notifier: StatusNotifier | None = None

    def __call__(self, message: str) -> None:
        logger.info("project %s: %s", self.project_id, message)
        try:
            if self._notifier is None:
                self._notifier = StatusNotifier(
                    self.mqtt_url,
                    self.project_id,
                    Component.BUILDER,
                    username=self.credentials.get(env_vars.MQTT_USERNAME) or None,
                    password=self.credentials.get(env_vars.MQTT_PASSWORD),
                )
            self._notifier.notify(
                ComponentStatus.PROGRESS, message, BuilderProgress(step="base_image")
            )
        except Exception as exc:
            logger.warning("project %s: progress not published: %s", self.project_id, exc)

    def __enter__(self) -> _ProgressPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._notifier is not None:
            try:
                self._notifier.close()
            except Exception as exc:
                logger.warning("project %s: progress publisher: %s", self.project_id, exc)
            self._notifier = None


@dataclass(frozen=True)
class ModelImageResult:
    """A trained-model image: ``ref`` pinned (``registry/namespace/model@sha256:...``),
    ``model_uri`` the version-pinned MLflow URI it serves, ``port`` the port its server
    listens on (``POST /invocations``, ``GET /ping``), ``reused`` nothing was built,
    ``seconds`` wall time of the build."""

    ref: str
    model_uri: str
    port: int
    reused: bool
    seconds: float


def _read_outcome(path: Path) -> dict[str, Any]:
    """The service's result document, or ``{}`` when it wrote none (or an unreadable one)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


BuilderFactory = Callable[["ManagerConfig", Path, str], ProjectBuilder]
"""``(config, home, mqtt_url) → builder``."""


def _venv(
    config: ManagerConfig, home: Path, mqtt_url: str, embedded_registry: str = ""
) -> ProjectBuilder:
    """The ``venv`` builder; it also builds trained-model images
    (:attr:`VenvProjectBuilder.model_images`) with buildah when it has a registry
    (``FLOPS_REGISTRY``, else ``embedded_registry``, the suite's own ``host:port``) and a base
    image (``FLOPS_BASE_IMAGE``, else one the manager makes for the embedded registry)."""
    model_images = None
    reason = _no_model_images_reason(config, embedded_registry)
    if reason:
        if config.registry or embedded_registry:
            logger.warning("no trained-model images: %s", reason)
    elif config.registry:
        model_images = ImageBuildService(_registry_settings(config), home / "images", mqtt_url)
    else:
        from flops_manager.base_image import BaseImageMaker

        settings = RegistrySettings(
            embedded_registry, config.base_image, config.registry_namespace, tls_verify=False
        )
        maker = BaseImageMaker(embedded_registry, config.registry_namespace, tls_verify=False)
        model_images = ImageBuildService(
            settings, home / "images", mqtt_url, base_images=None if config.base_image else maker
        )
    return VenvProjectBuilder(home / "envs", model_images=model_images)


def _no_model_images_reason(config: ManagerConfig, embedded_registry: str) -> str:
    """Why the ``venv`` builder cannot build trained-model images (``""``: it can)."""
    from flops_manager.base_image import missing_requirements

    if not (config.registry or embedded_registry):
        return "no registry (set FLOPS_REGISTRY, or install docker-registry for the embedded one)"
    if not shutil.which("buildah"):
        return "buildah is not installed (apt-get install buildah)"
    if config.registry and not config.base_image:
        return "FLOPS_REGISTRY is set but FLOPS_BASE_IMAGE is not (a Python 3.11 image in it)"
    if not config.registry and not config.base_image and (missing := missing_requirements()):
        return f"making the base image needs {', '.join(missing)} (or set FLOPS_BASE_IMAGE)"
    return ""


def _registry_settings(config: ManagerConfig) -> RegistrySettings:
    return RegistrySettings(
        registry=config.registry,
        base_image=config.base_image,
        namespace=config.registry_namespace,
        tls_verify=config.registry_tls_verify,
        public_registry=config.registry_public,
    )


def _oci(config: ManagerConfig, home: Path, mqtt_url: str) -> ProjectBuilder:
    needed = {"FLOPS_REGISTRY": config.registry, "FLOPS_BASE_IMAGE": config.base_image}
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise ConfigurationError(
            f"FLOPS_BUILDER=oci needs {' and '.join(missing)}: the registry images are pushed "
            "to (host:port) and a Python 3.11 base image in it."
        )
    return ImageBuildService(_registry_settings(config), home / "images", mqtt_url)


BUILDERS: dict[str, BuilderFactory] = {"venv": _venv, "oci": _oci}
"""``FLOPS_BUILDER`` name → factory."""


def builder_name(config: ManagerConfig, needs_images: bool) -> str:
    """The builder ``config.builder`` names, else ``oci`` for an orchestrator that
    ``needs_images``, else ``venv``."""
    return config.builder or ("oci" if needs_images else "venv")


def make_builder(
    config: ManagerConfig,
    home: Path,
    mqtt_url: str,
    *,
    needs_images: bool = False,
    embedded_registry: str = "",
) -> ProjectBuilder:
    """The builder ``config.builder`` names; when it names none, ``oci`` if the orchestrator
    ``needs_images``, else ``venv`` (:func:`builder_name`). ``embedded_registry``: the
    suite's own registry (``host:port``), used by the ``venv`` builder for trained-model
    images when ``FLOPS_REGISTRY`` is not set. Raises ``ConfigurationError`` for an unknown
    name (listing the valid ones) or missing settings."""
    name = builder_name(config, needs_images)
    if name == "venv":
        return _venv(config, home, mqtt_url, embedded_registry)
    factory = BUILDERS.get(name)
    if factory is None:
        raise ConfigurationError(
            f"Unknown builder {name!r}; set FLOPS_BUILDER to one of {sorted(BUILDERS)}."
        )
    return factory(config, home, mqtt_url)
