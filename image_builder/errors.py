"""Errors of the image builder: fetching an ML repository and building its environment.

Every class derives from :class:`flops_utils.errors.FlopsError`, so the manager's API maps them
to a JSON error (``code`` + one-or-two-sentence ``message`` naming cause and fix).
"""

from flops_utils.errors import FlopsError


class BuilderError(FlopsError):
    """Root of the builder's errors."""

    code = "builder_error"


class RepoFetchError(BuilderError):
    """``ml_repo_url`` cannot be cloned or copied (bad URL, unreachable host, no such path)."""

    code = "ml_repo_fetch_failed"


class RepoFetchLimitError(RepoFetchError):
    """Fetching the ML repository exceeded a bound: total time, the git server's minimum
    transfer rate, or the size of the checkout."""

    code = "ml_repo_fetch_limit"


class RepoRefError(BuilderError):
    """The requested ``ref`` (branch, tag or commit) does not exist in the ML repository."""

    code = "ml_repo_ref_not_found"


class RepoLayoutError(BuilderError):
    """The ML repository lacks a file of the user contract at its root."""

    code = "ml_repo_invalid"


class DependencyFileError(BuilderError):
    """The repository's dependency file cannot be read or translated to pip requirements."""

    code = "dependency_file_invalid"


class UnsafeRepoInputError(DependencyFileError):
    """A file of the ML repository points outside the repository (a symbolic link, an absolute
    or ``..`` path, an environment variable) or asks for a local package build; refused before
    any installer reads it."""

    code = "ml_repo_unsafe_input"


class DependencyInstallError(BuilderError):
    """The resolver (uv) cannot install the repository's requirements."""

    code = "dependency_install_failed"


class EnvironmentBuildError(BuilderError):
    """The environment cannot be built for a reason outside the repository (uv missing, timeout)."""

    code = "environment_build_failed"


class BuildCancelled(BuilderError):
    """The build was cancelled (its project was cancelled); its processes were stopped."""

    code = "build_cancelled"


class BuildToolMissingError(BuilderError):
    """A program the ``oci`` builder runs (buildah, skopeo) is not installed on this machine."""

    code = "build_tool_missing"


class RegistryUnreachableError(BuilderError):
    """The image registry cannot be reached, refuses the connection's TLS setting, or access."""

    code = "registry_unreachable"


class BaseImageError(BuilderError):
    """The configured base image does not exist in its registry."""

    code = "base_image_not_found"


class ImageBuildError(EnvironmentBuildError):
    """An image build failed for a reason other than the repository's requirements (a build
    step, an unsupported platform, a timeout); the message carries the failing step's output."""

    code = "image_build_failed"


class ImagePushError(BuilderError):
    """A built image could not be pushed, or the registry holds another digest after the push."""

    code = "image_push_failed"


class ModelFetchError(BuilderError):
    """A trained model cannot be fetched from the MLflow tracking server (a reason other than
    the ones of the subclasses, e.g. the server answered with an error)."""

    code = "model_fetch_failed"


class ModelUriError(ModelFetchError):
    """A model URI is not of a form the model image builder takes (``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, ``models:/<name>/latest``, ``models:/<model_id>``,
    ``runs:/<run_id>/<path>``)."""

    code = "model_uri_invalid"


class ModelNotFoundError(ModelFetchError):
    """The model URI names no model in the tracking server (unknown registered model, version,
    alias, logged model, run or artifact path)."""

    code = "model_not_found"


class TrackingServerUnreachableError(ModelFetchError):
    """The MLflow tracking server holding the model cannot be reached."""

    code = "tracking_server_unreachable"


class ModelNotServableError(BuilderError):
    """The artifacts a model URI names are not an MLflow model MLflow's scoring server can serve
    (no ``MLmodel`` file, or no ``python_function`` flavor)."""

    code = "model_not_servable"
