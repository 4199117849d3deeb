"""Trained-model (inference) images: one MLflow model served by MLflow's scoring server.

:meth:`ModelImageBuilder.build` takes a model URI of a finished project (``models:/<name>/
<version>``, as the aggregator registers it, or ``models:/<name>@<alias>``,
``models:/<name>/latest``, ``models:/<model_id>``, ``runs:/<run_id>/<path>``) and the MLflow
tracking server's URL, downloads the model's artifacts (``mlflow.artifacts.download_artifacts``),
and builds and pushes an OCI image the way :class:`~image_builder.oci_builder.OciBuilder` builds
the learner and aggregator (its registry, base image, uv cache, buildah plumbing and cache
directory are reused), from ``templates/Containerfile.model.in``:

=========================  =====================================================================
layer                      content
=========================  =====================================================================
base image                 the :class:`OciBuilder`'s ``base_image``, pinned by digest
user                       ``flops`` (uid :data:`~image_builder.oci_builder.IMAGE_UID`); the same
                           layer as the learner's and aggregator's
dependencies               ``/opt/flops/venv``: the model's ``requirements.txt`` (MLflow's record
                           of the environment it was logged from; ``conda.yaml`` if there is no
                           requirements file), ``numpy`` and ``pandas`` (``mlflow.pyfunc`` imports
                           them) and ``mlflow-skinny`` at the manager's MLflow version, installed
                           by uv (``templates/install.sh``) with the manager's versions as
                           constraints; the model's own ``mlflow`` pin is replaced
entrypoint                 ``/opt/flops/serve_model.py`` (``templates/serve_model.py``)
model                      ``/opt/flops/model``: the MLflow model directory (``MLmodel``, ...),
                           owned by root, read-only for the server
=========================  =====================================================================

``mlflow-skinny`` (the MLflow package without the tracking server, UI and SQL stores) is enough
to serve: ``mlflow.pyfunc.scoring_server`` runs on FastAPI and uvicorn, which ``mlflow-skinny``
requires, plus numpy and pandas. The full ``mlflow`` distribution would add Flask, gunicorn,
SQLAlchemy, alembic, graphene, docker, aiohttp, matplotlib, pyarrow, scipy and scikit-learn
whatever the model needs.

The image runs ``/opt/flops/venv/bin/python /opt/flops/serve_model.py`` as the non-root user:
MLflow's scoring protocol on ``0.0.0.0:$PORT`` (``POST /invocations``, ``GET /ping``,
``GET /health``, ``GET /version``). Environment: ``PORT`` (default the ``port`` the image was
built with, 8080), ``MLFLOW_MODELS_WORKERS`` (default 1), ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``
(seconds, MLflow's default 60). Labels: :data:`~image_builder.oci_builder.LABEL_INPUTS_HASH`,
:data:`LABEL_MODEL_URI`, :data:`LABEL_RUN_ID`, :data:`LABEL_MODEL_NAME`,
:data:`LABEL_MODEL_VERSION`, :data:`LABEL_ARTIFACTS_HASH`, the MLflow version and the base image.

Images are pushed as ``<registry>/<namespace>/model:<key>``, ``key`` hashing the model's
artifacts, the generated requirement and constraint files, the base image's digest, the MLflow
version, the templates, the port, the platform and the labels (:meth:`ModelImageBuilder.
image_key`); a tag the registry holds with the same inputs hash is reused without building. The
artifacts are downloaded every time (a small model takes well under a second): their content is
part of the key.

Scope: models with the ``python_function`` flavor whose requirements install from wheels or
pure-Python sources on the base image's Python (3.11, the manager's), for this machine's
platform. Requirements naming files inside the model by relative path (e.g. wheels added with
``mlflow.models.add_libraries_to_model``) install from the model mounted at
:data:`MODEL_MOUNT`; a ``conda.yaml``-only model loses its conda (non-PyPI) packages.

Measured here (2 cores, uv cache warm, test base image of 123 MB): the scikit-learn MNIST model
of ``tests/image_builder/test_model_image.py`` builds and pushes in about 20 s when its
dependency layer is new, 6-7 s when only the model changed, is reused in 0.1-0.3 s, and makes a
492 MB image (uncompressed); the server answers ``/ping`` about 3 s after the container starts.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import string
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import canonicalize_name

from flops_utils.logging import logger
from image_builder.build_context import (
    INSTALLER_FILES,
    TEMPLATES,
    label_arguments,
    stage_installer,
    stage_tools,
    write_lines,
)
from image_builder.buildah import Buildah, uv_attempts
from image_builder.cross_platform import host_platform
from image_builder.dependencies import (
    read_requirements,
    requirement_name,
    resolve_local_paths,
)
from image_builder.errors import (
    DependencyInstallError,
    ImageBuildError,
    ModelFetchError,
    ModelNotFoundError,
    ModelNotServableError,
    ModelUriError,
    TrackingServerUnreachableError,
)
from image_builder.oci_builder import (
    IMAGE_UID,
    LABEL_INPUTS_HASH,
    BuildStep,
    BuiltImage,
    OciBuilder,
    ProgressCallback,
    no_progress,
)
from image_builder.python_env import (
    condense_uv_error,
    pick_error,
    plan_install,
    runtime_pins,
)
from image_builder.repo import content_hash

for _name, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # Fail within about a minute instead of retrying for minutes when the server goes away.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    # No tqdm progress bars on the manager's stderr.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_name, _value)

MODEL_IMAGE_FORMAT_VERSION = 1
"""Bumped when the model image layout changes, so images built by older code are not reused."""

ROLE = "model"
"""The :class:`BuiltImage` role and the repository name (``<registry>/<namespace>/model``)."""

DEFAULT_PORT = 8080
"""Port the scoring server listens on unless ``PORT`` is set when the container starts."""

SERVING_PACKAGES = ("mlflow-skinny",)
"""Distributions pinned to the manager's versions in every model image."""

SERVING_EXTRAS = ("numpy", "pandas")
"""Distributions ``mlflow.pyfunc`` imports that ``mlflow-skinny`` does not require; added
unpinned (the constraints pin them to the manager's versions) unless the model names them."""

TEMPLATE_FILES = ("Containerfile.model.in", "serve_model.py", *INSTALLER_FILES)
"""The templates of a model image (all in :data:`~image_builder.build_context.TEMPLATES`; the
installer is the learner's and aggregator's)."""

MODEL_MOUNT = Path("/opt/flops/build/model")
"""Where the install step sees the model's artifacts (requirements naming files in the model)."""

LABEL_MODEL_URI = "org.flops.model-uri"
"""Label: the model URI the image serves, pinned to a version (``models:/<name>/<version>``) when
the request named an alias or ``latest``."""

LABEL_RUN_ID = "org.flops.run-id"
"""Label: the MLflow run the model was logged from (empty if unknown)."""

LABEL_MODEL_NAME = "org.flops.model-name"
"""Label: the registered model's name (empty for a ``runs:/`` or ``models:/<model_id>`` URI)."""

LABEL_MODEL_VERSION = "org.flops.model-version"
"""Label: the registered model's version (empty when :data:`LABEL_MODEL_NAME` is)."""

LABEL_ARTIFACTS_HASH = "org.flops.model-artifacts-hash"
"""Label: SHA-256 (hex) of the model's artifacts (:func:`image_builder.repo.content_hash`)."""

HEALTH_TIMEOUT_S = 10.0
"""Seconds the tracking server's ``GET /health`` may take before it counts as unreachable."""

_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST"})
_CONNECTION_HINTS = (
    "API request to",
    "Max retries exceeded",
    "Connection refused",
    "Failed to establish a new connection",
    "Read timed out",
)


@dataclass(frozen=True)
class ResolvedModel:
    """What a model URI names in the tracking server.

    ``uri``: the URI to download, pinned to a version for registered models (``models:/<name>/
    <version>``), else the requested one. ``name`` / ``version``: the registered model and its
    version (``""`` for ``runs:/`` and ``models:/<model_id>`` URIs). ``run_id``: the MLflow run
    the model was logged from (``""`` if the tracking server does not say).
    """

    uri: str
    name: str
    version: str
    run_id: str


@dataclass(frozen=True)
class ModelImage:
    """A model image in the registry.

    ``image``: the pushed image (``role`` ``"model"``; ``seconds`` covers its build and push, or
    the registry check when ``reused``). ``port``: the port the server listens on unless the
    container sets ``PORT``. ``model_uri``: the requested URI; ``resolved``: what it named.
    ``artifacts_hash``: SHA-256 (hex) of the model's artifacts. ``seconds``: wall time of
    :meth:`ModelImageBuilder.build`, download included.
    """

    image: BuiltImage
    port: int
    model_uri: str
    resolved: ResolvedModel
    artifacts_hash: str
    seconds: float

    @property
    def repository(self) -> str:
        """``registry/namespace/model``."""
        return self.image.repository

    @property
    def tag(self) -> str:
        """The inputs key (32 hex)."""
        return self.image.tag

    @property
    def digest(self) -> str:
        """The manifest digest in the registry (``sha256:...``)."""
        return self.image.digest

    @property
    def reused(self) -> bool:
        """``True`` if the registry held the image already (nothing built)."""
        return self.image.reused

    @property
    def ref(self) -> str:
        """``repository:tag``."""
        return self.image.ref

    @property
    def pinned_ref(self) -> str:
        """``repository@digest``: what an orchestrator should deploy."""
        return self.image.pinned_ref


class ModelImageBuilder:
    """Builds and pushes images serving MLflow models, with an :class:`OciBuilder`'s setup.

    ``oci``: supplies the registry (``registry``, ``namespace``, ``tls_verify``), the base image
    and its interpreter, the cache directory (locks, build logs), the timeouts and the buildah /
    skopeo plumbing. The tracking server's health check waits :data:`HEALTH_TIMEOUT_S`; MLflow's
    own requests use ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (60 s unless set) with 3 retries.
    """

    produces_images = True
    """This builder makes OCI images in a registry."""

    def __init__(self, oci: OciBuilder) -> None:
        self.oci = oci

    # -- inputs ------------------------------------------------------------------------
    @cached_property
    def serving_pins(self) -> list[str]:
        """:data:`SERVING_PACKAGES` at the manager's versions (``["mlflow-skinny==3.17.2"]``)."""
        return runtime_pins(SERVING_PACKAGES)

    def image_key(
        self,
        artifacts_hash: str,
        build_hash: str,
        base_digest: str,
        platform: str,
        port: int,
        labels: Mapping[str, str],
    ) -> str:
        """Return the 32-hex tag of the model image for these inputs.

        Hashes (:meth:`OciBuilder.inputs_key`) :data:`MODEL_IMAGE_FORMAT_VERSION`,
        ``artifacts_hash`` (the model's files), ``build_hash`` (the generated requirement and
        constraint files and the installer), the base image's ``base_digest``, ``platform``
        (``linux/amd64``), the base image's interpreter name, the image uid, ``port``, the
        serving pins (the MLflow version), the manager's distribution versions, the hash of
        :data:`TEMPLATE_FILES` and ``labels`` (the same model under another URI gets its own
        tag, with true labels, and shares every layer).
        """
        return self.oci.inputs_key(
            MODEL_IMAGE_FORMAT_VERSION,
            base_digest,
            platform,
            self.serving_pins,
            TEMPLATE_FILES,
            artifacts=artifacts_hash,
            build=build_hash,
            port=port,
            labels=dict(sorted(labels.items())),
        )

    # -- the build ---------------------------------------------------------------------
    def build(
        self,
        model_uri: str,
        tracking_uri: str,
        workdir: Path,
        *,
        port: int = DEFAULT_PORT,
        platform: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ModelImage:
        """Return the image serving ``model_uri``, building and pushing it if the registry
        lacks it.

        ``model_uri``: ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
        ``models:/<name>/latest``, ``models:/<model_id>`` or ``runs:/<run_id>/<path>``.
        ``tracking_uri``: ``http(s)://HOST:PORT`` of the MLflow tracking server (which also
        serves the registry and the artifacts). ``workdir``: scratch directory for the download
        and the build context (created if missing; left empty). ``port``: the default ``PORT``
        of the image (1-65535). ``platform``: ``os/arch``; default and only supported value:
        this machine's. ``on_progress``: called at each
        :class:`~image_builder.oci_builder.BuildStep` with its data (``base_resolved``,
        ``model_downloaded``, then ``image_reused`` or ``image_built`` and ``image_pushed``);
        default: nobody hears.

        Raises ``ValueError`` for a bad ``port``, :class:`~image_builder.errors.ModelUriError`
        (a URI of another form), ``TrackingServerUnreachableError``, ``ModelNotFoundError``,
        ``ModelFetchError`` (another refusal of the tracking server), ``ModelNotServableError``
        (no ``MLmodel`` or no ``python_function`` flavor), ``BuildToolMissingError``,
        ``RegistryUnreachableError``, ``BaseImageError``, ``DependencyInstallError`` (uv's
        message condensed), ``ImageBuildError`` and ``ImagePushError``.
        """
        started = time.monotonic()
        report = on_progress or no_progress
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port (1-65535)")
        _check_uri_form(model_uri)
        tools = self.oci.tools()
        platform = platform or host_platform()
        if platform != host_platform():
            raise ImageBuildError(
                f"Building {platform} model images on this {host_platform()} machine is not "
                f"supported yet; build on a {platform} machine."
            )
        tracking_uri = tracking_uri.rstrip("/")
        check_tracking_server(tracking_uri)
        step = time.monotonic()
        base_name, base_digest = self.oci.resolve_base(tools)
        report(
            BuildStep.BASE_RESOLVED,
            {"base_image": self.oci.base_image, "digest": base_digest, "platforms": [platform],
             "seconds": time.monotonic() - step},
        )  # fmt: skip
        step = time.monotonic()
        resolved = resolve_model(model_uri, tracking_uri)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        context = Path(tempfile.mkdtemp(prefix="model-context-", dir=workdir))
        try:
            download_model(resolved.uri, tracking_uri, context / "model")
            run_id = resolved.run_id or _mlmodel_run_id(context / "model")
            resolved = ResolvedModel(resolved.uri, resolved.name, resolved.version, run_id)
            report(
                BuildStep.MODEL_DOWNLOADED,
                {"model_uri": resolved.uri, "run_id": run_id, "seconds": time.monotonic() - step},
            )
            artifacts_hash = content_hash(context / "model")
            build_hash = self._stage_context(context, artifacts_hash)
            labels = {
                "org.opencontainers.image.title": "flops-model",
                "org.opencontainers.image.base.name": self.oci.base_image,
                "org.opencontainers.image.base.digest": base_digest,
                LABEL_MODEL_URI: resolved.uri,
                LABEL_RUN_ID: resolved.run_id,
                LABEL_MODEL_NAME: resolved.name,
                LABEL_MODEL_VERSION: resolved.version,
                LABEL_ARTIFACTS_HASH: artifacts_hash,
                "org.flops.mlflow-version": self.serving_pins[0].partition("==")[2],
            }
            key = self.image_key(artifacts_hash, build_hash, base_digest, platform, port, labels)
            labels[LABEL_INPUTS_HASH] = key
            image = self._reuse_or_build(
                tools, context, key, f"{base_name}@{base_digest}", labels, port, platform,
                resolved.uri, report,
            )  # fmt: skip
        finally:
            shutil.rmtree(context, ignore_errors=True)
        seconds = time.monotonic() - started
        logger.info(
            "model image %s for %s %s in %.2f s",
            image.ref, resolved.uri, "reused" if image.reused else "built", seconds,
        )  # fmt: skip
        return ModelImage(
            image=image,
            port=port,
            model_uri=model_uri,
            resolved=resolved,
            artifacts_hash=artifacts_hash,
            seconds=seconds,
        )

    def _reuse_or_build(
        self,
        tools: Buildah,
        context: Path,
        key: str,
        base_ref: str,
        labels: Mapping[str, str],
        port: int,
        platform: str,
        model_uri: str,
        report: ProgressCallback,
    ) -> BuiltImage:
        """The registry's image tagged ``key``, else build and push it under the key's lock."""
        reused = self.oci.find_reusable(tools, ROLE, key, [platform], report)
        if reused is not None:
            return reused
        with self.oci.key_lock(key):
            reused = self.oci.find_reusable(tools, ROLE, key, [platform], report)  # built meanwhile
            if reused is not None:
                return reused
            containerfile = context / "Containerfile.model"
            containerfile.write_text(
                render_model_containerfile(base_ref, self.oci.python, labels, port),
                encoding="utf-8",
            )
            try:
                return self.oci.build_and_push(
                    tools, context, ROLE, key, {platform: containerfile}, report
                )
            except DependencyInstallError as exc:
                raise self._install_error(key, model_uri, exc) from None

    def _install_error(
        self, key: str, model_uri: str, exc: DependencyInstallError
    ) -> DependencyInstallError:
        """``exc`` reworded for a model: uv's condensed message and the model to fix."""
        try:
            attempts = uv_attempts(
                self.oci.log_path(key, ROLE).read_text(encoding="utf-8", errors="replace")
            )
        except OSError:
            attempts = []
        if not attempts:
            return exc
        mode, stderr = pick_error(attempts)
        offline_only = mode == "offline" and len(attempts) > 1
        return DependencyInstallError(
            f"Cannot install the requirements of the model {model_uri}: "
            f"{condense_uv_error(stderr)}"
            + (" (the package index was unreachable, so only uv's cache was used)" if offline_only
               else "")
            + ". Fix the model's pip requirements (its requirements.txt) and log it again.",
            details=exc.details,
        )  # fmt: skip

    def _stage_context(self, context: Path, artifacts_hash: str) -> str:
        """Write the build context around ``context/model``; return the content hash of
        ``build/`` (``requirements.txt``, ``constraints.txt``, an empty ``excludes.txt`` and
        :data:`~image_builder.build_context.INSTALLER_FILES`).

        Layout: ``build/``, ``serve_model.py``, ``model/`` (permissions made world-readable),
        ``tools/`` (:func:`~image_builder.build_context.stage_tools`).
        Raises :class:`ModelNotServableError` when ``model/`` is not a servable MLflow model.
        """
        model_dir = context / "model"
        check_servable(model_dir)
        _make_readable(model_dir)
        model_lines = model_requirements(model_dir)
        named = {requirement_name(line) for line in model_lines}
        extras = [name for name in SERVING_EXTRAS if canonicalize_name(name) not in named]
        user_lines, constraints = plan_install(
            [*model_lines, *extras], SERVING_PACKAGES, self.oci.installed_versions
        )
        install_lines = resolve_local_paths(user_lines, MODEL_MOUNT)
        header = ["# generated by the FLOps model image builder"]
        if install_lines != user_lines:
            # The model is mounted, not copied, for the install step, and buildah's layer cache
            # does not see mounted files: key the dependency layer by the model's artifacts.
            header.append(f"# names files of the model with artifacts {artifacts_hash}")
        build = context / "build"
        write_lines(build / "requirements.txt", [*header, *install_lines, *self.serving_pins])
        write_lines(build / "constraints.txt", constraints)
        write_lines(build / "excludes.txt", [])  # install.sh's EXCLUDES: none for a model
        stage_installer(build)
        build_hash = content_hash(build)
        shutil.copyfile(TEMPLATES / "serve_model.py", context / "serve_model.py")
        stage_tools(context)
        return build_hash


# -- MLflow ------------------------------------------------------------------------------
def check_tracking_server(tracking_uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Check that ``GET <tracking_uri>/health`` answers 200 within ``timeout_s`` seconds.

    Raises :class:`TrackingServerUnreachableError` naming the URL and the reason otherwise.
    """
    if urllib.parse.urlparse(tracking_uri).scheme not in ("http", "https"):
        raise TrackingServerUnreachableError(
            f"The MLflow tracking URI {tracking_uri!r} is not an http(s):// URL; pass the "
            "tracking server's address, e.g. http://127.0.0.1:5000."
        )
    try:
        with urllib.request.urlopen(f"{tracking_uri}/health", timeout=timeout_s) as response:
            if int(response.status) == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        problem = (
            str(reason.strerror if isinstance(reason, OSError) else reason) or type(exc).__name__
        )
    raise TrackingServerUnreachableError(
        f"Cannot reach the MLflow tracking server at {tracking_uri} ({problem}); start it or "
        "fix the tracking URL (FLOPS_MLFLOW_URL)."
    )


def resolve_model(model_uri: str, tracking_uri: str) -> ResolvedModel:
    """Return what ``model_uri`` names in the tracking server at ``tracking_uri``.

    Registered-model URIs are pinned to a version: ``models:/<name>@<alias>`` through the
    alias, ``models:/<name>/latest`` to the highest version, ``models:/<name>/<stage>`` to the
    highest version in that (deprecated) stage. Raises :class:`ModelUriError`,
    :class:`ModelNotFoundError`, :class:`TrackingServerUnreachableError` or
    :class:`ModelFetchError`.
    """
    _check_uri_form(model_uri)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    scheme, _, rest = model_uri.partition(":/")
    parts = rest.lstrip("/").split("/")
    try:
        if scheme == "runs":
            return ResolvedModel(model_uri, "", "", parts[0])
        if len(parts) == 1 and "@" in parts[0]:
            name, _, alias = parts[0].rpartition("@")
            version = client.get_model_version_by_alias(name, alias)
        elif len(parts) == 1:  # models:/<model_id> (a logged model, MLflow 3)
            logged = client.get_logged_model(parts[0])
            return ResolvedModel(model_uri, "", "", str(logged.source_run_id or ""))
        elif parts[1].isdigit():
            version = client.get_model_version(parts[0], parts[1])
        else:
            version = _latest_version(client, parts[0], parts[1], model_uri)
    except ModelFetchError:
        raise
    except Exception as exc:
        raise fetch_error(model_uri, tracking_uri, exc) from exc
    name, number = str(version.name), str(version.version)
    return ResolvedModel(f"models:/{name}/{number}", name, number, str(version.run_id or ""))


def download_model(model_uri: str, tracking_uri: str, destination: Path) -> Path:
    """Download the artifacts of ``model_uri`` into the new directory ``destination``; return it.

    Raises :class:`ModelNotFoundError` (nothing at that URI),
    :class:`TrackingServerUnreachableError`, :class:`ModelFetchError`, or
    :class:`ModelNotServableError` when the URI names a single file.
    """
    import mlflow.artifacts

    staging = Path(tempfile.mkdtemp(prefix="download-", dir=destination.parent))
    try:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_location(model_uri, tracking_uri),
                dst_path=str(staging),
                tracking_uri=tracking_uri,
            )
        except Exception as exc:
            raise fetch_error(model_uri, tracking_uri, exc) from exc
        path = Path(local)  # staging/<last part of the artifact location>
        if not path.is_dir():
            raise ModelNotServableError(
                f"{model_uri} is a single file, not an MLflow model directory; pass the URI "
                "of the logged model (e.g. runs:/<run_id>/model)."
            )
        path.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def artifact_location(model_uri: str, tracking_uri: str) -> str:
    """Where the artifacts of ``model_uri`` live, as a URI the tracking server at
    ``tracking_uri`` serves (``mlflow-artifacts:/...``); ``runs:/`` URIs as they are.

    ``models:/`` URIs are resolved here with an explicit client: MLflow 3.17's
    ``download_artifacts`` resolves them through the process-wide registry URI whatever its
    ``registry_uri`` argument says (in a process that never called ``set_tracking_uri`` it
    looked in ``./mlflow.db`` and found nothing). Raises MLflow's exceptions.
    """
    if not model_uri.startswith("models:/"):
        return model_uri
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    parts = model_uri.removeprefix("models:/").strip("/").split("/")
    if len(parts) == 2:
        return str(client.get_model_version_download_uri(parts[0], parts[1]))
    return str(client.get_logged_model(parts[0]).artifact_location)


def fetch_error(model_uri: str, tracking_uri: str, exc: Exception) -> ModelFetchError:
    """The builder error for ``exc``, raised by MLflow while resolving or downloading
    ``model_uri`` from ``tracking_uri``: not found, unreachable, or another refusal."""
    code = str(getattr(exc, "error_code", "") or "")
    reason = " ".join(str(getattr(exc, "message", None) or exc).split())
    if len(reason) > 300:
        reason = reason[:297] + "..."
    reason = reason.rstrip(".")
    if code in _NOT_FOUND_CODES or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in reason.lower()
    ):
        return ModelNotFoundError(
            f"The model {model_uri} does not exist in the MLflow tracking server {tracking_uri} "
            f"({reason}); check the model name, version or run id (GET /projects/<id> shows a "
            "finished project's model URI)."
        )
    if isinstance(exc, ConnectionError | TimeoutError) or any(
        hint in reason for hint in _CONNECTION_HINTS
    ):
        return TrackingServerUnreachableError(
            f"Cannot fetch the model {model_uri}: the MLflow tracking server {tracking_uri} "
            f"stopped answering ({reason}); check that it runs and retry."
        )
    return ModelFetchError(
        f"The MLflow tracking server {tracking_uri} refused the model {model_uri} "
        f"({type(exc).__name__}: {reason}); check the URI and the server's log."
    )


def check_servable(model_dir: Path) -> dict[str, Any]:
    """Return the parsed ``MLmodel`` of ``model_dir`` if MLflow's scoring server can serve it.

    Raises :class:`ModelNotServableError` when there is no ``MLmodel`` file, it is not valid
    YAML, or it has no ``python_function`` flavor. Logs a warning when the model was saved
    with another Python ``major.minor`` than the manager's (the image's).
    """
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        found = sorted(path.name for path in model_dir.iterdir())[:8]
        raise ModelNotServableError(
            f"The artifacts at this URI are not an MLflow model (no MLmodel file; found "
            f"{', '.join(found) or 'nothing'}); pass the URI of a logged model, e.g. "
            "runs:/<run_id>/model or models:/<name>/<version>."
        )
    try:
        parsed = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelNotServableError(
            f"The model's MLmodel file is not valid YAML ({exc}); log the model again."
        ) from exc
    flavors = parsed.get("flavors") if isinstance(parsed, dict) else None
    if not isinstance(flavors, dict) or "python_function" not in flavors:
        names = ", ".join(sorted(flavors)) if isinstance(flavors, dict) else "none"
        raise ModelNotServableError(
            f"The model has no python_function flavor (flavors: {names}), so MLflow's scoring "
            "server cannot serve it; log it with an MLflow flavor that adds python_function."
        )
    saved_with = str(flavors["python_function"].get("python_version") or "")
    mlmodel_fields: dict[str, Any] = parsed
    if saved_with and saved_with.split(".")[:2] != [str(v) for v in sys.version_info[:2]]:
        logger.warning(
            "the model was saved with Python %s; the image runs the base image's Python "
            "(the manager's is %d.%d)", saved_with, *sys.version_info[:2],
        )  # fmt: skip
    return mlmodel_fields


def model_requirements(model_dir: Path) -> list[str]:
    """The pip requirement lines of an MLflow model directory, without MLflow itself.

    From ``requirements.txt`` (MLflow writes it for every model), else the ``pip:`` and plain
    dependencies of ``conda.yaml``, else ``[]`` (logged). ``mlflow``, ``mlflow-skinny`` and
    ``mlflow-tracing`` are dropped (:data:`~image_builder.dependencies.FLOPS_MANAGED_PACKAGES`):
    the image gets the manager's MLflow. Raises
    :class:`~image_builder.errors.DependencyFileError` for an unreadable file.
    """
    for name in ("requirements.txt", "conda.yaml"):
        if (model_dir / name).is_file():
            return read_requirements(model_dir / name)
    logger.warning("the model has no requirements.txt or conda.yaml; installing MLflow only")
    return []


def render_model_containerfile(
    base_ref: str,
    python: str,
    labels: Mapping[str, str],
    port: int = DEFAULT_PORT,
    uid: int = IMAGE_UID,
) -> str:
    """Return ``templates/Containerfile.model.in`` filled in.

    ``base_ref``: the ``FROM`` image (``name@sha256:...``). ``python``: the interpreter in the
    base image. ``labels``: OCI labels, written as one ``LABEL`` (values quoted and escaped).
    ``port``: the default ``PORT`` and the ``EXPOSE``d port. ``uid``: of the ``flops`` user.
    """
    template = string.Template((TEMPLATES / "Containerfile.model.in").read_text(encoding="utf-8"))
    return template.substitute(
        base_image=base_ref,
        uid=uid,
        python=shlex.quote(python),
        port=int(port),
        labels=label_arguments(labels),
    )


# -- helpers -----------------------------------------------------------------------------
def _check_uri_form(model_uri: str) -> None:
    """Raise :class:`ModelUriError` unless ``model_uri`` is a ``models:/`` or ``runs:/`` URI
    of a form :func:`resolve_model` handles."""
    scheme, separator, rest = model_uri.partition(":/")
    parts = rest.lstrip("/").split("/") if separator else []
    valid = bool(parts) and all(part.strip() for part in parts)
    if scheme == "models":
        valid = valid and len(parts) <= 2 and not (len(parts) == 2 and "@" in parts[0])
    elif scheme == "runs":
        valid = valid and len(parts) >= 2
    else:
        valid = False
    if not valid:
        raise ModelUriError(
            f"{model_uri!r} is not a model URI FLOps can build an image from; use "
            "models:/<name>/<version>, models:/<name>@<alias>, models:/<name>/latest, "
            "models:/<model_id> or runs:/<run_id>/<path>."
        )


def _latest_version(client: Any, name: str, stage: str, model_uri: str) -> Any:
    """The highest version of the registered model ``name`` (``stage`` ``latest``: any stage)."""
    filter_string = "name = '{}'".format(name.replace("'", "\\'"))
    versions = [
        version
        for version in client.search_model_versions(filter_string)
        if stage.lower() == "latest" or str(version.current_stage).lower() == stage.lower()
    ]
    if not versions:
        # the registered model may be missing altogether: let MLflow say which
        client.get_registered_model(name)
        raise ModelNotFoundError(
            f"The registered model {name} has no version"
            + ("" if stage.lower() == "latest" else f" in stage {stage}")
            + f", so {model_uri} names nothing; register a model version first."
        )
    return max(versions, key=lambda version: int(version.version))


def _mlmodel_run_id(model_dir: Path) -> str:
    """The ``run_id`` recorded in ``model_dir/MLmodel`` (``""`` if none or unreadable)."""
    try:
        parsed = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return ""
    return str(parsed.get("run_id") or "") if isinstance(parsed, dict) else ""


def _make_readable(directory: Path) -> None:
    """Directories 0755, files 0644 (0755 if executable by the owner): the image's non-root
    user must read what the manager downloaded (``mkdtemp`` makes 0700 directories)."""
    directory.chmod(0o755)
    for root, dirnames, filenames in os.walk(directory):
        for name in dirnames:
            path = Path(root) / name
            if not path.is_symlink():
                path.chmod(0o755)
        for name in filenames:
            path = Path(root) / name
            if path.is_symlink():
                continue
            executable = path.stat().st_mode & stat.S_IXUSR
            path.chmod(0o755 if executable else 0o644)
