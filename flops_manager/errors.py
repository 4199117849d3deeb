"""The manager's exception tree and the one table mapping each error to an HTTP status.

Only the errors a request can cause and the caller can act on are mapped (4xx: the request's
fault, 502/503: a component the manager needs failed or is unreachable). Anything else, a
``FlopsError`` the table does not know included, is the manager's own fault: the API answers
it with a 500 and a correlation id (see :mod:`flops_manager.app`).
"""

from typing import Any

from data_server.mock_provider import InvalidPartitioning, UnknownDataset
from flops_manager.auth import Forbidden, Unauthorized
from flops_manager.broker import BrokerUnavailable
from flops_manager.sla import LocalRepoNotAllowed
from flops_manager.store import StoreUnavailable
from flops_utils.data_client import DataPlaneError, DataServerUnavailable, InvalidDataTag
from flops_utils.errors import FlopsError
from image_builder.errors import (
    ModelFetchError,
    ModelNotFoundError,
    ModelNotServableError,
    ModelUriError,
    TrackingServerUnreachableError,
)
from observatory.mlflow_server import MlflowServerError

INTERNAL_ERROR_STATUS = 500
"""The status of every error :data:`HTTP_STATUS` does not map."""


class NotFound(FlopsError):
    """The requested project or node does not exist."""

    code = "not_found"


class Conflict(FlopsError):
    """The request cannot be met in the current state (e.g. too few eligible nodes)."""

    code = "conflict"


class Unprocessable(FlopsError):
    """The request is well-formed but asks for something this FLOps cannot do (e.g. an SLA
    option that is not supported yet); the message says what to change."""

    code = "unprocessable"


class TooManyRequests(FlopsError):
    """The caller asks for more at once than the manager serves (e.g. event streams)."""

    code = "too_many_requests"


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
    # the caller's fault
    Unauthorized: 401,
    Forbidden: 403,
    LocalRepoNotAllowed: 403,
    NotFound: 404,
    Conflict: 409,
    Unprocessable: 422,
    TooManyRequests: 429,
    InvalidDataTag: 422,
    InvalidPartitioning: 422,
    UnknownDataset: 422,
    ModelUriError: 422,
    ModelNotServableError: 422,
    ModelNotFoundError: 404,
    OakestraConflict: 409,
    # a component the request needs failed (502) or cannot be reached (503)
    OakestraError: 502,
    DataPlaneError: 502,
    ModelFetchError: 502,
    ServiceUnavailable: 503,
    StoreUnavailable: 503,
    BrokerUnavailable: 503,
    MlflowServerError: 503,
    DataServerUnavailable: 503,
    OakestraUnavailable: 503,
    TrackingServerUnreachableError: 503,
}
"""Exception type → HTTP status; the most specific class in an error's MRO wins. Errors of
other types are internal (:data:`INTERNAL_ERROR_STATUS`)."""


def http_status(error: FlopsError) -> int:
    """The HTTP status (400-599) for ``error``: that of the most specific class of its MRO in
    :data:`HTTP_STATUS`, else :data:`INTERNAL_ERROR_STATUS` (500)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return INTERNAL_ERROR_STATUS
