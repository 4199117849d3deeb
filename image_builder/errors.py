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


class RepoRefError(BuilderError):
    """The requested ``ref`` (branch, tag or commit) does not exist in the ML repository."""

    code = "ml_repo_ref_not_found"


class RepoLayoutError(BuilderError):
    """The ML repository lacks a file of the user contract (DESIGN.md §2) at its root."""

    code = "ml_repo_invalid"


class DependencyFileError(BuilderError):
    """The repository's dependency file cannot be read or translated to pip requirements."""

    code = "dependency_file_invalid"


class DependencyInstallError(BuilderError):
    """The resolver (uv) cannot install the repository's requirements."""

    code = "dependency_install_failed"


class EnvironmentBuildError(BuilderError):
    """The environment cannot be built for a reason outside the repository (uv missing, timeout)."""

    code = "environment_build_failed"
