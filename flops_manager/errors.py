"""The manager's exception tree and the one table mapping each error to an HTTP status."""

from typing import Any

from flops_manager.auth import Forbidden, Unauthorized
from flops_utils.data_client import DataServerUnavailable
from flops_utils.errors import FlopsError
from image_builder.errors import (
    ModelFetchError,
    ModelNotFoundError,
    ModelNotServableError,
    ModelUriError,
    TrackingServerUnreachableError,
)


class NotFound(FlopsError):
    """The requested project or node does not exist."""

    code = "not_found"


class Conflict(FlopsError):
    """The request cannot be met in the current state (e.g. too few eligible nodes)."""

    code = "conflict"


class ServiceUnavailable(FlopsError):
    """A component the request needs (broker, MLflow, data server) is not reachable."""

    code = "service_unavailable"


class ConfigurationError(FlopsError):
    """The manager's configuration names a backend or setting that does not exist."""

    code = "configuration_error"


class OakestraError(FlopsError):
    """The Oakestra root orchestrator refused a request or reported a failure.

    ``status`` is Oakestra's HTTP status (``None`` when there was no answer) and ``body``
    its response body (text, at most 2000 characters).
    """

    code = "oakestra_error"

    def __init__(
        self,
        message: str,
        details: list[Any] | None = None,
        *,
        status: int | None = None,
        body: str = "",
    ) -> None:
        super().__init__(message, details)
        self.status = status
        self.body = body


class OakestraUnavailable(OakestraError):
    """The Oakestra root orchestrator did not answer, or kept answering 5xx, after retries."""

    code = "oakestra_unavailable"


class OakestraAuthFailed(OakestraError):
    """Oakestra rejected the configured username and password."""

    code = "oakestra_auth_failed"


class OakestraConflict(OakestraError):
    """Oakestra already has an application with the same name and namespace."""

    code = "oakestra_conflict"


class OakestraNotFound(OakestraError):
    """The Oakestra application or service does not exist (any more)."""

    code = "oakestra_not_found"


HTTP_STATUS: dict[type[FlopsError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    ServiceUnavailable: 503,
    DataServerUnavailable: 503,
    OakestraConflict: 409,
    OakestraUnavailable: 503,
    OakestraError: 502,
    ModelFetchError: 502,
    ModelUriError: 422,
    ModelNotFoundError: 404,
    TrackingServerUnreachableError: 503,
    ModelNotServableError: 422,
    FlopsError: 400,
}
"""Exception type → HTTP status; the most specific class in an error's MRO wins."""


def http_status(error: FlopsError) -> int:
    """Return the HTTP status for ``error`` from :data:`HTTP_STATUS` (400 by default)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400
