"""The image builder as a service: ``flops-image-builder`` (``python -m image_builder.main``).

One process builds one project's learner and aggregator images with
:class:`~image_builder.oci_builder.OciBuilder` and reports over MQTT, so that an orchestrator can
run it on any machine with buildah (the manager's own, or a worker). Configured by environment
variables (set by the manager; an option of ``flops-image-builder --help`` sets the variable it
names, :mod:`flops_utils.role_cli`):

=================================  ============================================================
variable                           meaning
=================================  ============================================================
``FLOPS_PROJECT_ID``               the project (required)
``FLOPS_MQTT_URL``                 ``mqtt://HOST:PORT`` status messages go to (required)
``FLOPS_ML_REPO_URL``              the ML repository (required)
``FLOPS_ML_REPO_REF``              branch, tag or commit (default: the default branch)
``FLOPS_ML_MODEL_FLAVOR``          the SLA's ``ml_model_flavor`` (default ``pytorch``)
``FLOPS_PLATFORMS``                comma-separated ``os/arch`` (default: this machine's)
``FLOPS_REGISTRY``                 ``host[:port]`` the images are pushed to (required)
``FLOPS_REGISTRY_NAMESPACE``       path under the registry (default ``flops``)
``FLOPS_REGISTRY_TLS_VERIFY``      ``false`` for a plain-HTTP registry (default ``true``)
``FLOPS_BASE_IMAGE``               reference of the Python 3.11 base image (required)
``FLOPS_BUILD_CACHE_DIR``          build locks and logs (default ``~/.cache/flops/oci``)
``FLOPS_BUILD_WORKDIR``            scratch space for the clone (default: a temporary directory)
``FLOPS_BUILD_RESULT_FILE``        where the outcome is written as JSON (optional)
``FLOPS_MODEL_URI``                build the trained-model image of this MLflow model instead
                                   (``models:/<name>/<version>``; the repository variables are
                                   then not needed)
``FLOPS_MLFLOW_URL``               the tracking server holding that model
=================================  ============================================================

Messages on ``flops/<project_id>/builder/<status>``: ``started`` (data: the inputs), then a
``progress`` message per milestone of the build (message: what happened in a sentence; data:
``{"step": ...}`` and the step's data, :class:`~image_builder.oci_builder.BuildStep`, seconds
rounded to milliseconds), then ``success`` (data: :func:`result_document` of the images) or
``failed`` (message: the error in a sentence or two; data ``{"error": code, "exit_code"}``).
The outcome is also written to ``FLOPS_BUILD_RESULT_FILE`` (``{"status": "success", ...}`` or
``{"status": "failed", "error", "message", "details"}``), for a caller on the same machine.
Payloads: :mod:`flops_utils.contract.messages`. Exit codes:
:class:`~flops_utils.contract.exit_codes.ExitCode` (0 built, 2 configuration error, 9 build
failed, 5 internal error).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from flops_utils import env_vars
from flops_utils.contract.entry import failure_of, run_role
from flops_utils.contract.exit_codes import Role
from flops_utils.contract.messages import BuilderProgress, BuilderStarted, BuilderSuccess
from flops_utils.env_config import EnvReader
from flops_utils.errors import FlopsError
from flops_utils.notifications import StatusNotifier
from flops_utils.role_cli import (
    STATUS_ENV,
    EnvVar,
    MqttUrlOption,
    ProjectIdOption,
    RoleApp,
    VersionOption,
    export_options,
)
from flops_utils.types import ComponentStatus, MLModelFlavor
from image_builder.build_processes import BuildRegistry, BuildScope
from image_builder.model_image import ModelImage, ModelImageBuilder
from image_builder.oci_builder import BuildStep, BuiltImages, OciBuilder, ProgressCallback

PROGRESS_MESSAGES: Mapping[str, str] = {
    BuildStep.BASE_RESOLVED: "base image {base_image} resolved in {seconds:.1f} s",
    BuildStep.REPOSITORY_FETCHED: "repository fetched at {commit:.12} in {seconds:.1f} s",
    BuildStep.MODEL_DOWNLOADED: "model {model_uri} downloaded in {seconds:.1f} s",
    BuildStep.DEPENDENCIES_PREPARED: "dependencies prepared in {seconds:.1f} s",
    BuildStep.IMAGE_REUSED: "{role} image reused: {ref}",
    BuildStep.IMAGE_BUILT: "{role} image for {platform} built in {seconds:.1f} s",
    BuildStep.IMAGE_PUSHED: "{role} image pushed in {seconds:.1f} s: {ref}",
}
"""The ``message`` of each ``progress`` message, formatted with the step's data."""


class BuilderConfigError(FlopsError):
    """The image builder's environment is incomplete or malformed."""

    code = "image_builder_config_error"


@dataclass(frozen=True)
class BuildRequest:
    """One build, read from the environment by :meth:`from_env`.

    ``platforms``: ``("linux/amd64", ...)``, empty for this machine's. ``tls_verify``:
    ``False`` for a plain-HTTP registry. ``workdir``/``result_file``: ``None`` when unset.
    """

    project_id: str
    mqtt_url: str
    ml_repo_url: str
    ml_repo_ref: str | None
    model_uri: str
    mlflow_url: str
    flavor: str
    platforms: tuple[str, ...]
    registry: str
    namespace: str
    tls_verify: bool
    base_image: str
    cache_dir: Path
    workdir: Path | None
    result_file: Path | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BuildRequest:
        """Read and check the variables of the module docstring. Raises
        :class:`BuilderConfigError` naming the variable and what it should hold."""
        read = EnvReader(
            env, BuilderConfigError, "the manager sets it when it starts the image builder"
        )
        mqtt_url = read.mqtt_url()
        flavor = env.get(env_vars.ML_MODEL_FLAVOR) or MLModelFlavor.PYTORCH.value
        flavors = [member.value for member in MLModelFlavor]
        if flavor not in flavors:
            raise BuilderConfigError(
                f"{env_vars.ML_MODEL_FLAVOR}={flavor!r} is not a flavor; use one of "
                f"{', '.join(flavors)}."
            )
        tls = (env.get(env_vars.REGISTRY_TLS_VERIFY) or "true").strip().lower()
        if tls not in {"true", "false", "1", "0"}:
            raise BuilderConfigError(
                f"{env_vars.REGISTRY_TLS_VERIFY}={tls!r}; set it to true or false."
            )
        platforms = tuple(
            p.strip() for p in (env.get(env_vars.PLATFORMS) or "").split(",") if p.strip()
        )
        cache = env.get(env_vars.BUILD_CACHE_DIR) or str(Path.home() / ".cache" / "flops" / "oci")
        workdir = env.get(env_vars.BUILD_WORKDIR)
        result_file = env.get(env_vars.BUILD_RESULT_FILE)
        model_uri = (env.get(env_vars.MODEL_URI) or "").strip()
        return cls(
            project_id=read.required(env_vars.PROJECT_ID),
            mqtt_url=mqtt_url,
            ml_repo_url="" if model_uri else read.required(env_vars.ML_REPO_URL),
            ml_repo_ref=env.get(env_vars.ML_REPO_REF) or None,
            model_uri=model_uri,
            mlflow_url=read.required(env_vars.MLFLOW_URL) if model_uri else "",
            flavor=flavor,
            platforms=platforms,
            registry=read.required(env_vars.REGISTRY),
            namespace=env.get(env_vars.REGISTRY_NAMESPACE) or "flops",
            tls_verify=tls in {"true", "1"},
            base_image=read.required(env_vars.BASE_IMAGE),
            cache_dir=Path(cache),
            workdir=Path(workdir) if workdir else None,
            result_file=Path(result_file) if result_file else None,
        )

    def inputs(self) -> BuilderStarted:
        """What is built, for the ``started`` message."""
        if self.model_uri:
            return BuilderStarted(
                model_uri=self.model_uri, registry=self.registry, base_image=self.base_image
            )
        return BuilderStarted(
            ml_repo_url=self.ml_repo_url,
            ml_repo_ref=self.ml_repo_ref,
            flavor=self.flavor,
            platforms=list(self.platforms),
            registry=self.registry,
            base_image=self.base_image,
        )


def result_document(built: BuiltImages) -> dict[str, Any]:
    """The JSON outcome of a successful build.

    ``{"status": "success", "key", "commit", "cache_hit", "seconds", "platforms" (``os/arch``
    values, sorted), "images": {role: {"repository", "tag", "digest", "ref" (pinned
    ``repository@digest``), "reused", "seconds", "platform_digests" (``{os/arch: digest}`` of
    each platform's image; for one platform its own digest)}}}``; seconds are wall time.
    """
    return {
        "status": "success",
        "key": built.key,
        "commit": built.commit,
        "cache_hit": built.cache_hit,
        "seconds": round(built.seconds, 3),
        "platforms": list(built.platforms),
        "images": {
            image.role: {
                "repository": image.repository,
                "tag": image.tag,
                "digest": image.digest,
                "ref": image.pinned_ref,
                "reused": image.reused,
                "seconds": round(image.seconds, 3),
                "platform_digests": dict(image.platform_digests),
            }
            for image in built.images
        },
    }


def model_result_document(built: ModelImage) -> dict[str, Any]:
    """The JSON outcome of a trained-model image build: as :func:`result_document` with the
    one image under ``"model"``, plus ``"model_uri"`` (the resolved, version-pinned URI) and
    ``"port"`` (the port the server listens on)."""
    return {
        "status": "success",
        "key": built.tag,
        "commit": "",
        "cache_hit": built.reused,
        "seconds": round(built.seconds, 3),
        "model_uri": built.resolved.uri,
        "port": built.port,
        "images": {
            "model": {
                "repository": built.repository,
                "tag": built.tag,
                "digest": built.digest,
                "ref": built.pinned_ref,
                "reused": built.reused,
                "seconds": round(built.image.seconds, 3),
            }
        },
    }


def progress_publisher(notifier: StatusNotifier) -> ProgressCallback:
    """The ``on_progress`` of a build: publishes each step as a ``progress`` message (message
    from :data:`PROGRESS_MESSAGES`; data ``{"step", ...the step's data}``, seconds rounded to
    milliseconds)."""

    def publish(step: str, data: dict[str, Any]) -> None:
        document = {"step": str(step), **data}
        if "seconds" in document:
            document["seconds"] = round(float(document["seconds"]), 3)
        template = PROGRESS_MESSAGES.get(step, str(step))
        message = template.format(**document)
        notifier.notify(ComponentStatus.PROGRESS, message, BuilderProgress.model_validate(document))

    return publish


def run(request: BuildRequest, notifier: StatusNotifier) -> None:
    """Build and push the images of ``request``, publishing ``started``, ``progress`` per
    milestone, then ``success``, and writing the outcome to ``request.result_file``.

    Raises what failed (``BuilderError`` for the build, anything else is internal) after
    writing the failed outcome; the entry wrapper publishes ``failed``.
    """
    what = request.model_uri or request.ml_repo_url
    notifier.notify(ComponentStatus.STARTED, f"building images of {what}", request.inputs())
    on_progress = progress_publisher(notifier)
    started = time.monotonic()
    builder = OciBuilder(
        request.cache_dir,
        request.registry,
        request.base_image,
        namespace=request.namespace,
        tls_verify=request.tls_verify,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="flops-image-build-", dir=request.workdir) as tmp:
            if request.model_uri:
                model = ModelImageBuilder(builder).build(
                    request.model_uri, request.mlflow_url, Path(tmp), on_progress=on_progress
                )
                document, key, cache_hit = model_result_document(model), model.tag, model.reused
            else:
                built = builder.build(
                    request.ml_repo_url,
                    request.ml_repo_ref,
                    Path(tmp),
                    flavor=request.flavor,
                    platforms=request.platforms or None,
                    on_progress=on_progress,
                )
                document, key, cache_hit = result_document(built), built.key, built.cache_hit
    except Exception as exc:
        _write_failure(request.result_file, exc)
        raise
    _write_result(request.result_file, document)
    how = "reused" if cache_hit else f"built in {time.monotonic() - started:.1f} s"
    success = BuilderSuccess.model_validate(document)
    notifier.notify(ComponentStatus.SUCCESS, f"images {key[:12]} {how}", success)


def _write_failure(path: Path | None, exc: BaseException) -> None:
    """Write the failed outcome of ``exc`` to ``path`` (``{"status": "failed", "error",
    "message", "details"}``, the last 40 details)."""
    failure = failure_of(exc)
    details = list(exc.details) if isinstance(exc, FlopsError) else []
    _write_result(
        path,
        {
            "status": "failed",
            "error": failure.error,
            "message": failure.message,
            "details": details[-40:],
        },
    )


def _write_result(path: Path | None, document: Mapping[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (temporary file, then rename)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2), encoding="utf-8")
    partial.replace(path)


def main(env: Mapping[str, str] | None = None) -> int:
    """Entry point of ``flops-image-builder`` / ``python -m image_builder.main``: the command
    line (:data:`app`) and ``os.environ``, or, when ``env`` is given (callers in Python), that
    environment alone; returns the :class:`~flops_utils.contract.exit_codes.ExitCode` (2 also
    for a command-line error). See :func:`build`."""
    return app.run() if env is None else build(env)


def build(env: Mapping[str, str]) -> int:
    """Build with the configuration in ``env``; returns the
    :class:`~flops_utils.contract.exit_codes.ExitCode`.

    SIGTERM cancels the build: every program it runs (git, uv, buildah) is stopped, by
    process group, and the build fails with :class:`~image_builder.errors.BuildCancelled`
    (how the manager cancels a project's image build)."""
    registry = BuildRegistry()
    name = env.get(env_vars.PROJECT_ID) or "image build"
    with registry.scope(name) as scope, _cancel_on_sigterm(scope):
        return run_role(Role.BUILDER, lambda: _read_request(env), run, env)


def _option(envvar: str, help: str, default: str | None = None, metavar: str = "TEXT") -> Any:
    """A string option setting ``envvar`` (checked by :meth:`BuildRequest.from_env`)."""
    return typer.Option(
        envvar=envvar,
        help=help,
        metavar=metavar,
        show_default=default if default is not None else False,
    )


app = RoleApp(
    "flops-image-builder",
    "Build and push one project's learner and aggregator images (or a trained model's "
    "image) with buildah, reporting over MQTT (the manager starts it with FLOPS_* variables).",
    env_only=[
        EnvVar("MLFLOW_TRACKING_USERNAME", "model images: the MLflow user (with _PASSWORD)"),
        *STATUS_ENV,
    ],
)


@app.main_command()
def _image_builder(
    ctx: typer.Context,
    project_id: ProjectIdOption = None,
    mqtt_url: MqttUrlOption = None,
    ml_repo_url: Annotated[
        str | None,
        _option(env_vars.ML_REPO_URL, "The ML repository: git URL, file:// URL or path."),
    ] = None,
    ml_repo_ref: Annotated[
        str | None,
        _option(env_vars.ML_REPO_REF, "Branch, tag or commit.", "the default branch"),
    ] = None,
    flavor: Annotated[
        str | None,
        _option(env_vars.ML_MODEL_FLAVOR, "The SLA's ml_model_flavor.", "pytorch", "FLAVOR"),
    ] = None,
    platforms: Annotated[
        str | None,
        _option(env_vars.PLATFORMS, "Comma-separated os/arch platforms.", "this machine's"),
    ] = None,
    registry: Annotated[
        str | None,
        _option(env_vars.REGISTRY, "host[:port] the images are pushed to (required)."),
    ] = None,
    registry_namespace: Annotated[
        str | None, _option(env_vars.REGISTRY_NAMESPACE, "Path under the registry.", "flops")
    ] = None,
    registry_tls_verify: Annotated[
        str | None,
        _option(
            env_vars.REGISTRY_TLS_VERIFY, "false for a plain-HTTP registry.", "true", "BOOLEAN"
        ),
    ] = None,
    base_image: Annotated[
        str | None,
        _option(env_vars.BASE_IMAGE, "Reference of the Python 3.11 base image (required)."),
    ] = None,
    cache_dir: Annotated[
        str | None,
        _option(env_vars.BUILD_CACHE_DIR, "Build locks and logs.", "~/.cache/flops/oci", "DIR"),
    ] = None,
    workdir: Annotated[
        str | None,
        _option(
            env_vars.BUILD_WORKDIR, "Scratch space for the clone.", "a temporary directory", "DIR"
        ),
    ] = None,
    result_file: Annotated[
        str | None,
        _option(env_vars.BUILD_RESULT_FILE, "Where the outcome is written as JSON.", None, "FILE"),
    ] = None,
    model_uri: Annotated[
        str | None,
        _option(
            env_vars.MODEL_URI,
            "Build the trained-model image of this MLflow model (models:/NAME/VERSION) "
            "instead of the repository's.",
        ),
    ] = None,
    mlflow_url: Annotated[
        str | None,
        _option(env_vars.MLFLOW_URL, "The tracking server holding --model-uri's model."),
    ] = None,
    version: VersionOption = False,
) -> int:
    """The image builder's command: options set their variables, then :func:`build` with
    the environment, as the manager starts it."""
    export_options(ctx)
    return build(os.environ)


@contextlib.contextmanager
def _cancel_on_sigterm(scope: BuildScope) -> Iterator[None]:
    """Cancel ``scope`` on SIGTERM during the ``with`` block (main thread only; elsewhere
    signals cannot be handled and nothing is installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: scope.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_request(env: Mapping[str, str]) -> BuildRequest:
    """:meth:`BuildRequest.from_env`; a configuration error is also written to
    ``FLOPS_BUILD_RESULT_FILE`` before it is raised."""
    try:
        return BuildRequest.from_env(env)
    except BuilderConfigError as exc:
        result_file = env.get(env_vars.BUILD_RESULT_FILE)
        _write_failure(Path(result_file) if result_file else None, exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
