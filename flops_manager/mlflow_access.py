"""Per-project and per-customer MLflow users, administered over MLflow's basic-auth REST API.

The embedded tracking server runs MLflow's basic-auth app with ``default_permission =
NO_PERMISSIONS`` (``observatory.mlflow_server``, ``authentication=True``): a user sees and
changes only what they were granted. The manager holds the admin credential (generated at the
server's first start, :func:`observatory.mlflow_server.read_admin_credential`) and, through
:class:`MlflowAccess`, gives:

- every project a user ``flops-project-<project_id>`` with a random password and ``EDIT`` on
  the project's experiment and registered model (both created by the manager beforehand, so
  that no other user can take their names first). The aggregators of the project get it as
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``; it is deleted at the project's
  end (:meth:`MlflowAccess.revoke`). The registered model is the customer's model of the
  project's repository (:meth:`MlflowAccess.registered_model`,
  ``flops_utils.contract.tracking.registered_model_name``), shared by the customer's
  projects of that repository, each adding a version;
- every customer a user (:func:`customer_username`) with ``READ`` on the experiments and
  registered models of their projects; :meth:`MlflowAccess.customer_credential` sets a new
  password and returns it, so a customer can log in to MLflow's UI and API and sees only their
  own projects.

Any MLflow user may still create experiments and registered models of their own (MLflow's
basic-auth app has no switch against it without also vetoing granted reads); nobody else sees
them. :class:`NoMlflowAccess` is the no-op of a server without authentication.

REST paths: ``mlflow/server/auth/routes.py`` and ``mlflow/server/handlers.py`` of MLflow 3.17.
"""

import hashlib
import re
import time
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from flops_utils.contract.tracking import (
    CUSTOMER_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    PROJECT_ID_TAG,
    REPO_URL_TAG,
    registered_model_name,
    repo_identity,
    without_credentials,
)
from flops_utils.errors import FlopsError
from observatory.mlflow_server import MlflowCredential, new_password

REQUEST_TIMEOUT_S = 10.0
"""Seconds one administration request may take."""

EXPERIMENT_PERMISSION = "EDIT"
"""The project user's permission on its experiment and registered model: create runs and
logged models, log metrics and artifacts, add model versions (``can_update``); no delete, no
granting to others (``MANAGE``)."""

CONNECT_RETRIES = 10
"""How often one request is tried again when the tracking server cannot be reached (it may be
restarting: ``flops_manager.supervision`` restarts the embedded one on the same port)."""

RETRY_BACKOFF_FACTOR_S = 0.5
RETRY_BACKOFF_MAX_S = 8.0
"""urllib3's exponential backoff between those attempts: 0, 1, 2, 4, then 8 s each, so a
request gives up after about 55 s without a connection (urllib3 ``Retry.get_backoff_time``)."""

CUSTOMER_PERMISSION = "READ"
"""The customer's permission on the experiments and registered models of their projects."""

_PROJECT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CUSTOMER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_USERS = "/api/2.0/mlflow/users"
_GRANT = "/api/3.0/mlflow/users/permissions/grant"
_EXPERIMENTS = "/api/2.0/mlflow/experiments"
_MODELS = "/api/2.0/mlflow/registered-models"
_EXISTS = "RESOURCE_ALREADY_EXISTS"
_MISSING = "RESOURCE_DOES_NOT_EXIST"


class MlflowAccessError(FlopsError):
    """The tracking server refused the admin's request or did not answer."""

    code = "mlflow_access_error"


def project_username(project_id: str) -> str:
    """``flops-project-<project_id>``: the MLflow user of a project's aggregators.

    Raises ``ValueError`` for a project id outside ``[A-Za-z0-9_-]{1,64}``.
    """
    if not _PROJECT.match(project_id):
        raise ValueError(f"project id {project_id!r} is not [A-Za-z0-9_-]{{1,64}}")
    return f"flops-project-{project_id}"


def customer_username(customer_id: str) -> str:
    """The MLflow user of a customer: ``flops-customer-<customer_id>`` when the id is
    ``[A-Za-z0-9_.@-]{1,64}`` (HTTP basic authentication forbids ``:`` in a user name), else
    ``flops-customer-<the first 16 hex digits of the id's SHA-256>``."""
    if _CUSTOMER.match(customer_id):
        return f"flops-customer-{customer_id}"
    return f"flops-customer-{hashlib.sha256(customer_id.encode()).hexdigest()[:16]}"


class MlflowAccessControl(Protocol):
    """What the manager calls to give a project's aggregators and its customer MLflow access."""

    def project(self, project_id: str, experiment_name: str, customer_id: str) -> dict[str, str]:
        """The env vars of the project's aggregators (empty: no credential needed)."""
        ...

    def customer_credential(self, customer_id: str) -> MlflowCredential | None:
        """A fresh credential of the customer's MLflow user (``None``: no credential needed)."""
        ...

    def revoke(self, project_id: str) -> None:
        """Delete the project's MLflow user."""
        ...

    def registered_model(self, project_id: str, customer_id: str, repo_url: str) -> str:
        """The name of the registered model the project's final model becomes a version of
        (the customer's model of ``repo_url``), prepared for the project's user."""
        ...

    def end_runs(self, experiment_name: str, status: str) -> list[str]:
        """End the experiment's ``RUNNING`` runs with ``status``; returns their ids."""
        ...


def retrying_session(connect_retries: int = CONNECT_RETRIES) -> requests.Session:
    """A ``requests`` session that retries connection errors (refused, reset before the
    request was sent) ``connect_retries`` times with backoff, and reads of idempotent
    requests twice; other answers are returned as they are. Close it after use."""
    retry = Retry(
        total=None,
        connect=connect_retries,
        read=2,
        status=0,
        other=0,
        redirect=0,
        backoff_factor=RETRY_BACKOFF_FACTOR_S,
        backoff_max=RETRY_BACKOFF_MAX_S,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def end_running_runs(
    tracking_url: str,
    experiment_name: str,
    status: str,
    auth: tuple[str, str] | None = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
    connect_retries: int = 0,
) -> list[str]:
    """Mark every ``RUNNING`` run of the experiment ``experiment_name`` (a project's: its
    aggregator's run and the cluster aggregators' child runs) as ended with ``status``
    (``FAILED`` or ``KILLED``), now: a run whose process was killed never ends by itself.
    ``connect_retries``: how often a request is tried again while the server cannot be reached
    (:func:`retrying_session`; default none, since the lifecycle calls this while it stops a
    project's services). Returns the run ids changed. Raises :class:`MlflowAccessError` when
    the server refuses or does not answer."""
    url = tracking_url.rstrip("/")

    with retrying_session(connect_retries) as session:
        return _end_running_runs(session, url, experiment_name, status, auth, timeout_s)


def _end_running_runs(
    session: requests.Session,
    url: str,
    experiment_name: str,
    status: str,
    auth: tuple[str, str] | None,
    timeout_s: float,
) -> list[str]:
    def call(step: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = session.post(f"{url}{path}", json=body, auth=auth, timeout=timeout_s)
        except requests.RequestException as exc:
            raise MlflowAccessError(
                f"Could not {step}: the MLflow tracking server at {url} does not answer "
                f"({type(exc).__name__})."
            ) from exc
        if not response.ok:
            raise MlflowAccessError(
                f"The MLflow tracking server at {url} refused to {step} "
                f"(HTTP {response.status_code})."
            )
        return _json(response)

    try:
        found = session.get(
            f"{url}{_EXPERIMENTS}/get-by-name",
            params={"experiment_name": experiment_name},
            auth=auth,
            timeout=timeout_s,
        )
    except requests.RequestException as exc:
        raise MlflowAccessError(
            f"Could not look up the experiment: the MLflow tracking server at {url} does not "
            f"answer ({type(exc).__name__})."
        ) from exc
    if not found.ok:
        return []  # no experiment: the aggregator never started a run
    experiment_id = str(_json(found).get("experiment", {}).get("experiment_id", ""))
    search = {
        "experiment_ids": [experiment_id],
        "filter": "attributes.status = 'RUNNING'",
        "max_results": 1000,
    }
    runs = call("search the project's runs", "/api/2.0/mlflow/runs/search", search)
    ended = []
    now_ms = int(time.time() * 1000)
    for run in runs.get("runs", []):
        run_id = str(run["info"]["run_id"])
        body = {"run_id": run_id, "status": status, "end_time": now_ms}
        call("end a run", "/api/2.0/mlflow/runs/update", body)
        ended.append(run_id)
    return ended


class NoMlflowAccess:
    """The :class:`MlflowAccessControl` of a server without authentication: no users.

    Args:
        tracking_url: the server (for :meth:`end_runs`); empty: no server to talk to.
    """

    def __init__(self, tracking_url: str = "") -> None:
        self.tracking_url = tracking_url

    def end_runs(self, experiment_name: str, status: str) -> list[str]:
        """:func:`end_running_runs` without a login."""
        if not self.tracking_url:
            return []
        return end_running_runs(self.tracking_url, experiment_name, status)

    def project(self, project_id: str, experiment_name: str, customer_id: str) -> dict[str, str]:
        """``{}``: the aggregators connect anonymously."""
        return {}

    def customer_credential(self, customer_id: str) -> MlflowCredential | None:
        """``None``: everyone reads everything without a password."""
        return None

    def revoke(self, project_id: str) -> None:
        """Nothing to revoke."""

    def registered_model(self, project_id: str, customer_id: str, repo_url: str) -> str:
        """``registered_model_name(customer_id, repo_url)``; the aggregator creates the model
        at its first version (nothing to grant without authentication)."""
        return registered_model_name(customer_id, repo_url)


class MlflowAccess:
    """Issues and revokes MLflow users on a tracking server running the basic-auth app.

    Args:
        tracking_url: ``http://HOST:PORT`` of the tracking server.
        admin_username / admin_password: an MLflow admin (the server's admin credential).
        timeout_s: seconds one request may take.

    Thread-safe (one HTTP request per step, no shared state). A server that cannot be reached
    (restarting) is tried again for about 55 s (:func:`retrying_session`). Raises
    :class:`MlflowAccessError` when the server refuses a request or does not answer; its
    message names the step and MLflow's error code, never a password.
    """

    def __init__(
        self,
        tracking_url: str,
        admin_username: str,
        admin_password: str,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.tracking_url = tracking_url.rstrip("/")
        self.admin = MlflowCredential(admin_username, admin_password)
        self.timeout_s = timeout_s

    def end_runs(self, experiment_name: str, status: str) -> list[str]:
        """:func:`end_running_runs` as the admin."""
        auth = (self.admin.username, self.admin.password)
        return end_running_runs(self.tracking_url, experiment_name, status, auth, self.timeout_s)

    def project(self, project_id: str, experiment_name: str, customer_id: str) -> dict[str, str]:
        """Prepare MLflow for a project and return its aggregators' credential.

        Creates (idempotently) the experiment ``experiment_name``
        (``flops_utils.contract.services.experiment_name``), the user :func:`project_username`
        with a new password (a second call replaces the password: call it once per deployment
        and give the result to every aggregator of the project) and
        :data:`EXPERIMENT_PERMISSION` on the experiment, and :data:`CUSTOMER_PERMISSION` on it
        for the customer's user (created, with a password nobody knows yet, when missing). The
        registered model the final model becomes a version of is prepared by
        :meth:`registered_model`.

        Returns ``{MLFLOW_TRACKING_USERNAME: ..., MLFLOW_TRACKING_PASSWORD: ...}``.
        """
        username = project_username(project_id)
        experiment_id = self.ensure_experiment(experiment_name, project_id)
        credential = MlflowCredential(username, new_password())
        self._set_user(credential)
        customer = customer_username(customer_id)
        if not self._user_exists(customer):
            self._set_user(MlflowCredential(customer, new_password()))
        for user, permission in (
            (username, EXPERIMENT_PERMISSION),
            (customer, CUSTOMER_PERMISSION),
        ):
            self._grant(user, "experiment", experiment_id, permission)
        return credential.env()

    def customer_credential(self, customer_id: str) -> MlflowCredential:
        """Give the customer's MLflow user (:func:`customer_username`, created when missing) a
        new password and return the credential; the previous password stops working."""
        credential = MlflowCredential(customer_username(customer_id), new_password())
        self._set_user(credential)
        return credential

    def registered_model(self, project_id: str, customer_id: str, repo_url: str) -> str:
        """Prepare the customer's registered model of ``repo_url`` for the project and return
        its name.

        The name is :func:`~flops_utils.contract.tracking.registered_model_name`; when a model
        of that name already exists for another repository or customer (its tags
        ``flops.repo_url`` / ``flops.customer_id`` differ, or it was not made by FLOps), the
        ``distinct`` one (with a hash of the repository). The model is created when missing
        (tags ``flops.customer_id``, ``flops.repo_url``), and the project's user (from
        :meth:`project`, called first) gets :data:`EXPERIMENT_PERMISSION` and the customer's
        user :data:`CUSTOMER_PERMISSION` on it. Raises :class:`MlflowAccessError` when both
        names belong to someone else or the server refuses.
        """
        for distinct in (False, True):
            name = registered_model_name(customer_id, repo_url, distinct=distinct)
            if self._model_is_ours(name, customer_id, repo_url):
                break
        else:
            raise MlflowAccessError(
                f"The MLflow registered models {registered_model_name(customer_id, repo_url)!r} "
                "and its distinct variant exist for another repository or customer; rename or "
                "delete them as the MLflow admin."
            )
        tags = {CUSTOMER_TAG: customer_id, REPO_URL_TAG: without_credentials(repo_url)}
        self._call(
            "create the registered model",
            "POST",
            f"{_MODELS}/create",
            json={"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]},
            ok=(_EXISTS,),
        )
        self._grant(project_username(project_id), "registered_model", name, EXPERIMENT_PERMISSION)
        self._grant(customer_username(customer_id), "registered_model", name, CUSTOMER_PERMISSION)
        return name

    def _model_is_ours(self, name: str, customer_id: str, repo_url: str) -> bool:
        """Whether the registered model ``name`` is missing or belongs to ``customer_id``'s
        ``repo_url`` (by its tags)."""
        found = self._call(
            "look up the registered model",
            "GET",
            f"{_MODELS}/get",
            params={"name": name},
            ok=(_MISSING,),
        )
        model = found.get("registered_model")
        if model is None:
            return True
        tags = {str(t.get("key")): str(t.get("value")) for t in model.get("tags", [])}
        same_repo = repo_identity(tags.get(REPO_URL_TAG, "")) == repo_identity(repo_url)
        return same_repo and tags.get(CUSTOMER_TAG) == customer_id

    def revoke(self, project_id: str) -> None:
        """Delete the project's MLflow user (its permissions go with it; requests with its
        password are refused from now on). The experiment, runs and models stay, readable by
        the customer. Idempotent."""
        username = project_username(project_id)
        self._call(
            "delete the project's user",
            "DELETE",
            f"{_USERS}/delete",
            json={"username": username},
            ok=(_MISSING,),
        )

    def ensure_experiment(self, name: str, project_id: str) -> str:
        """The id of the active experiment ``name``: found, restored when deleted, or created
        (tags ``flops.project_id`` and ``mlflow.experimentKind`` = model training, so that
        MLflow's GUI does not treat it as a GenAI experiment)."""
        found = self._call(
            "look up the experiment",
            "GET",
            f"{_EXPERIMENTS}/get-by-name",
            params={"experiment_name": name},
            ok=(_MISSING,),
        )
        experiment = found.get("experiment")
        if experiment is None:
            created = self._call(
                "create the experiment",
                "POST",
                f"{_EXPERIMENTS}/create",
                json={
                    "name": name,
                    "tags": [
                        {"key": PROJECT_ID_TAG, "value": project_id},
                        {"key": EXPERIMENT_KIND_TAG, "value": MODEL_TRAINING_KIND},
                    ],
                },
                ok=(_EXISTS,),
            )
            if "experiment_id" in created:
                return str(created["experiment_id"])
            return self.ensure_experiment(name, project_id)  # created meanwhile
        experiment_id = str(experiment["experiment_id"])
        if experiment.get("lifecycle_stage") == "deleted":
            self._call(
                "restore the experiment",
                "POST",
                f"{_EXPERIMENTS}/restore",
                json={"experiment_id": experiment_id},
            )
        return experiment_id

    def _user_exists(self, username: str) -> bool:
        found = self._call(
            "look up a user", "GET", f"{_USERS}/get", params={"username": username}, ok=(_MISSING,)
        )
        return "user" in found

    def _set_user(self, credential: MlflowCredential) -> None:
        """Create the user with ``credential``'s password, or set that password if it exists."""
        body = {"username": credential.username, "password": credential.password}
        created = self._call("create a user", "POST", f"{_USERS}/create", json=body, ok=(_EXISTS,))
        if "user" not in created:
            self._call("set a user's password", "PATCH", f"{_USERS}/update-password", json=body)

    def _grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        self._call(
            f"grant {permission} on the {resource_type.replace('_', ' ')}",
            "POST",
            _GRANT,
            json={
                "username": username,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "permission": permission,
            },
            ok=(_EXISTS,),  # granted by an earlier call (the same level: ours are fixed)
        )

    def _call(
        self,
        step: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        ok: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """One admin request; returns its JSON body, or ``{}`` when MLflow answered with an
        error code in ``ok``. Raises :class:`MlflowAccessError` otherwise."""
        try:
            with retrying_session() as session:
                response = session.request(
                    method,
                    f"{self.tracking_url}{path}",
                    params=params,
                    json=json,
                    auth=(self.admin.username, self.admin.password),
                    timeout=self.timeout_s,
                )
        except requests.RequestException as exc:
            raise MlflowAccessError(
                f"Could not {step}: the MLflow tracking server at {self.tracking_url} does not "
                f"answer ({type(exc).__name__}); check that it runs."
            ) from exc
        body = _json(response)
        if response.ok:
            return body
        code = str(body.get("error_code", ""))
        if code in ok:
            return {}
        # MLflow's message may quote the request (a password hash); only its code is safe.
        hint = (
            "check the admin credential (basic_auth.ini in the server's workdir)"
            if response.status_code in (401, 403)
            else "see the tracking server's log"
        )
        raise MlflowAccessError(
            f"The MLflow tracking server at {self.tracking_url} refused to {step} "
            f"(HTTP {response.status_code}{', ' + code if code else ''}); {hint}."
        )


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
