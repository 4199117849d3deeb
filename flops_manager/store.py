"""The project store: MongoDB through pymongo, or the embedded on-disk ``mongita``.

Both speak the pymongo collection API, so :class:`ProjectStore` holds the one code path and
the two subclasses only open their client: :class:`EmbeddedProjectStore` (a directory) and
:class:`MongoProjectStore` (a ``mongodb://`` URL). :func:`open_store` picks one from the URL.

Collections: ``projects`` (one :class:`~flops_manager.records.ProjectRecord` document per
project, ``_id`` = project id) and ``nodes`` (``_id`` = node id). The listing fields of every
project (:data:`SUMMARY_FIELDS`) are also kept in memory, loaded at start and updated by every
write, so that listing and filtering many projects never loads their event logs (one manager
process owns a store).
"""

import contextlib
import itertools
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flops_manager.records import PROJECT_FIELDS, Event, ProjectRecord
from flops_utils.errors import FlopsError

PROJECTS = "projects"
NODES = "nodes"
DEFAULT_DATABASE = "flops"
"""The database name when a ``mongodb://`` URL names none (and the embedded store's)."""
SERVER_SELECTION_TIMEOUT_S = 5.0
"""How long a MongoDB operation waits for a reachable server before it fails."""
SUMMARY_FIELDS = (
    "project_id",
    "customer_id",
    "status",
    "status_message",
    "created_at",
    "updated_at",
)
"""The fields of a project that ``GET /projects`` lists and filters by."""
INDEXED_FIELDS = ("customer_id", "status", "created_at")
"""Fields of ``projects`` that MongoDB indexes."""
_IMMUTABLE_FIELDS = frozenset({"_id", "id", "project_id"})


class StoreUnavailable(FlopsError):
    """The project store (MongoDB) cannot be reached."""

    code = "store_unavailable"


def _summary(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k in SUMMARY_FIELDS}


def _created_at(summary: dict[str, Any]) -> float:
    return float(summary.get("created_at") or 0.0)


def _plain(value: Any) -> Any:
    """``value`` with pydantic models dumped to JSON types and enums to their values."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _check_paths(set_paths: Iterable[str], push_paths: Iterable[str]) -> None:
    """Raise ``ValueError`` for an update path that is not a project field, that would change
    the project id, or that is both set and pushed to (MongoDB refuses overlapping paths)."""
    set_paths, push_paths = list(set_paths), list(push_paths)
    for path in [*set_paths, *push_paths]:
        top = path.split(".", 1)[0]
        if top not in PROJECT_FIELDS:
            raise ValueError(f"{path!r} is not a project field; known: {sorted(PROJECT_FIELDS)}")
        if top in _IMMUTABLE_FIELDS:
            raise ValueError(f"{path!r} cannot be updated: a project's id never changes")
    for pushed in push_paths:
        for set_path in set_paths:
            shorter, longer = sorted((pushed, set_path), key=len)
            if longer == shorter or longer.startswith(shorter + "."):
                raise ValueError(f"{set_path!r} and {pushed!r} overlap in one update")


def build_update(
    fields: dict[str, Any], event: Event | None, push: dict[str, Any] | None, now_s: float
) -> dict[str, Any]:
    """The MongoDB update document of :meth:`ProjectStore.update_project`.

    Returns ``{"$set": {...}, "$push": {...}}`` (``$push`` only when something is appended),
    with JSON values and ``updated_at = now_s``. Raises ``ValueError`` as
    :meth:`ProjectStore.update_project` documents.
    """
    appended = {key: _plain(value) for key, value in (push or {}).items()}
    if event is not None:
        if "events" in appended:
            raise ValueError("pass an event either as 'event' or in 'push', not both")
        appended["events"] = _plain(event)
    to_set = {key: _plain(value) for key, value in fields.items()}
    _check_paths(to_set, appended)
    update: dict[str, Any] = {"$set": {**to_set, "updated_at": now_s}}
    if appended:
        update["$push"] = appended
    return update


class ProjectStore(ABC):
    """Persistence of projects, their events and worker nodes.

    Subclasses open the database (:attr:`_db`, a pymongo-like database) and call
    :meth:`_load_summaries`. All methods are thread-safe: a lock serialises the operations
    (mongita is not thread-safe, and the summaries must follow the documents).
    """

    def __init__(self, database: Any) -> None:
        self._db = database
        self._lock = threading.RLock()
        self._summaries: dict[str, dict[str, Any]] = {}
        """Project id → summary, oldest first (dict order = creation order)."""

    def _load_summaries(self) -> None:
        with self._lock, self._guard():
            docs = sorted(self._summary_documents(), key=_created_at)
            self._summaries = {str(d["_id"]): _summary(d) for d in docs}

    @abstractmethod
    def _summary_documents(self) -> Iterable[dict[str, Any]]:
        """Every project document, with at least :data:`SUMMARY_FIELDS` and ``_id``."""

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Translates the database client's connection errors (none for the embedded one)."""
        yield

    # projects -------------------------------------------------------------------------
    def insert_project(self, record: ProjectRecord) -> None:
        """Store a new project. Raises the client's duplicate-key error when its id exists."""
        doc = record.document()
        summary = _summary(doc)
        with self._lock, self._guard():
            self._db[PROJECTS].insert_one(doc)
            newest = next(reversed(self._summaries.values()), None)
            self._summaries[record.id] = summary
            if newest is not None and _created_at(newest) > _created_at(summary):
                self._summaries = dict(
                    sorted(self._summaries.items(), key=lambda i: _created_at(i[1]))
                )

    def get_project(self, project_id: str) -> ProjectRecord | None:
        """Return the project, or ``None`` when there is none with that id."""
        with self._lock, self._guard():
            doc = self._db[PROJECTS].find_one({"_id": project_id})
        return None if doc is None else ProjectRecord.from_document(doc)

    def list_projects(self) -> list[ProjectRecord]:
        """Return every project, oldest first (by ``created_at``)."""
        with self._lock, self._guard():
            docs = list(self._db[PROJECTS].find({}))
        docs.sort(key=_created_at)
        return [ProjectRecord.from_document(d) for d in docs]

    def find_projects(
        self, query: dict[str, str], offset: int = 0, limit: int = 50
    ) -> tuple[list[dict[str, Any]], int]:
        """Summaries (:data:`SUMMARY_FIELDS`) of the projects whose fields equal ``query``'s
        values, oldest first; never reads the documents.

        Returns ``(page, total)``: at most ``limit`` summaries after skipping ``offset``, and
        how many match in all. Raises ``ValueError`` for a query key not in SUMMARY_FIELDS.
        """
        unknown = sorted(set(query) - set(SUMMARY_FIELDS))
        if unknown:
            raise ValueError(f"cannot filter projects by {unknown}; use {list(SUMMARY_FIELDS)}")
        wanted = {key: _plain(value) for key, value in query.items()}
        with self._lock:
            if not wanted:
                page = itertools.islice(self._summaries.values(), offset, offset + limit)
                return [dict(d) for d in page], len(self._summaries)
            docs = [
                d for d in self._summaries.values() if all(d.get(k) == v for k, v in wanted.items())
            ]
            return [dict(d) for d in docs[offset : offset + limit]], len(docs)

    def update_project(
        self,
        project_id: str,
        fields: dict[str, Any],
        event: Event | None = None,
        push: dict[str, Any] | None = None,
    ) -> None:
        """Set ``fields`` (dotted paths allowed, e.g. ``phases.training.ended_at``), append
        ``event`` to ``events`` and each value of ``push`` to the list under its key, and set
        ``updated_at`` to now (seconds since the epoch), in one atomic update.

        Values may be pydantic models (stored as their JSON dump). A project that does not
        exist is left alone. Raises ``ValueError`` when a key's top-level name is not in
        ``PROJECT_FIELDS``, would change the id, or a path is both set and pushed to.
        """
        update = build_update(fields, event, push, time.time())
        summary = _summary(update["$set"])
        with self._lock, self._guard():
            self._db[PROJECTS].update_one({"_id": project_id}, update)
            if project_id in self._summaries:
                self._summaries[project_id].update(summary)

    def delete_all(self) -> None:
        """Remove every project and node."""
        with self._lock, self._guard():
            self._db[PROJECTS].delete_many({})
            self._summaries.clear()
            self._db[NODES].delete_many({})

    # nodes ----------------------------------------------------------------------------
    def upsert_node(self, node: dict[str, Any]) -> None:
        """Insert or replace the node document with ``_id == node["node_id"]``."""
        doc = {**_plain(node), "_id": node["node_id"]}
        with self._lock, self._guard():
            self._db[NODES].replace_one({"_id": doc["_id"]}, doc, upsert=True)

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return every registered node document, ordered by node id."""
        with self._lock, self._guard():
            docs = list(self._db[NODES].find({}))
        return sorted(docs, key=lambda d: str(d["_id"]))

    def delete_node(self, node_id: str) -> bool:
        """Remove the node; ``False`` when there was none with that id."""
        with self._lock, self._guard():
            result = self._db[NODES].delete_one({"_id": node_id})
        return bool(result.deleted_count)

    @abstractmethod
    def close(self) -> None:
        """Release the client; the store must not be used afterwards."""


class EmbeddedProjectStore(ProjectStore):
    """The store in a directory on disk (``mongita``), created when missing."""

    def __init__(self, directory: str | Path) -> None:
        from mongita import MongitaClientDisk

        Path(directory).mkdir(parents=True, exist_ok=True)
        self._client = MongitaClientDisk(str(directory))
        super().__init__(self._client[DEFAULT_DATABASE])
        self._load_summaries()

    def _summary_documents(self) -> Iterable[dict[str, Any]]:
        # mongita has no projections: the whole documents are read, once, at start.
        docs: Iterable[dict[str, Any]] = self._db[PROJECTS].find({})
        return docs

    def close(self) -> None:
        """Flush and release the directory's files."""
        with self._lock:
            self._client.close()


def public_url(db_url: str) -> str:
    """``db_url`` without its user name, password and options (safe in error messages)."""
    without_options = db_url.split("?", 1)[0]
    return re.sub(r"^([a-z+]+://)[^@/]*@", r"\1", without_options)


class MongoProjectStore(ProjectStore):
    """The store in MongoDB (pymongo).

    Args:
        db_url: ``mongodb://`` or ``mongodb+srv://`` URL; its path names the database
            (``flops`` when it names none).
        server_selection_timeout_s: how long an operation waits for a reachable server.

    Raises ``StoreUnavailable`` (naming the URL without credentials) when the URL is invalid
    or no server answers within ``server_selection_timeout_s``; the same later, when the
    server becomes unreachable during an operation. Creates the indexes on
    :data:`INDEXED_FIELDS` (idempotent).
    """

    def __init__(
        self, db_url: str, server_selection_timeout_s: float = SERVER_SELECTION_TIMEOUT_S
    ) -> None:
        import pymongo
        import pymongo.errors

        self._public_url = public_url(db_url)
        try:
            self._client: Any = pymongo.MongoClient(
                db_url, serverSelectionTimeoutMS=int(server_selection_timeout_s * 1000)
            )
        except pymongo.errors.PyMongoError as error:
            raise StoreUnavailable(
                f"The project store URL {self._public_url} is invalid ({type(error).__name__}). "
                "Fix FLOPS_DB_URL (mongodb://HOST:PORT/DATABASE)."
            ) from None
        super().__init__(self._client.get_default_database(default=DEFAULT_DATABASE))
        try:
            with self._guard():
                self._client.admin.command("ping")
                for field in INDEXED_FIELDS:
                    self._db[PROJECTS].create_index(field)
        except pymongo.errors.OperationFailure as error:
            self._client.close()
            raise StoreUnavailable(
                f"The project store MongoDB at {self._public_url} refused the manager "
                f"(error code {error.code}). Check the user name and password in "
                "FLOPS_DB_URL and the user's roles on the database."
            ) from None
        except StoreUnavailable:
            self._client.close()
            raise
        self._load_summaries()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        import pymongo.errors

        try:
            yield
        except pymongo.errors.ConnectionFailure:
            raise StoreUnavailable(
                f"The project store MongoDB at {self._public_url} is not reachable. Start it "
                "or fix FLOPS_DB_URL, then retry."
            ) from None

    def _summary_documents(self) -> Iterable[dict[str, Any]]:
        projection = dict.fromkeys(SUMMARY_FIELDS, 1)
        docs: Iterable[dict[str, Any]] = self._db[PROJECTS].find({}, projection)
        return docs

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()


def open_store(db_url: str) -> ProjectStore:
    """The store for ``db_url``: :class:`MongoProjectStore` for a ``mongodb://`` or
    ``mongodb+srv://`` URL, else :class:`EmbeddedProjectStore` in that directory.

    Raises ``StoreUnavailable`` when MongoDB cannot be reached (see MongoProjectStore).
    """
    if db_url.startswith(("mongodb://", "mongodb+srv://")):
        return MongoProjectStore(db_url)
    return EmbeddedProjectStore(db_url)
