"""The manager's exception tree and the one table mapping each error to an HTTP status."""

from flops_manager.auth import Forbidden, Unauthorized
from flops_utils.data_client import DataServerUnavailable
from flops_utils.errors import FlopsError


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


HTTP_STATUS: dict[type[FlopsError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    ServiceUnavailable: 503,
    DataServerUnavailable: 503,
    FlopsError: 400,
}
"""Exception type → HTTP status; the most specific class in an error's MRO wins."""


def http_status(error: FlopsError) -> int:
    """Return the HTTP status for ``error`` from :data:`HTTP_STATUS` (400 by default)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400
