"""The project store: MongoDB through pymongo, or the embedded on-disk ``mongita``.

Both expose the pymongo collection API, so one code path serves both (DESIGN.md §4).
Collections: ``projects`` (one document per project, ``_id`` = project id) and ``nodes``
(``_id`` = node id). The listing fields of every project (:data:`SUMMARY_FIELDS`) are also
kept in memory, loaded at start and updated by every write, so that listing and filtering
many projects never loads their event logs (one manager process owns a store).
"""

import itertools
import threading
import time
from pathlib import Path
from typing import Any

PROJECTS = "projects"
NODES = "nodes"
SUMMARY_FIELDS = (
    "project_id",
    "customer_id",
    "status",
    "status_message",
    "created_at",
    "updated_at",
)
"""The fields of a project that ``GET /projects`` lists and filters by."""


def _summary(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k in SUMMARY_FIELDS}


class ProjectStore:
    """Persistence of projects, their events and worker nodes.

    Args:
        db_url: a ``mongodb://`` URL selects MongoDB; anything else is a directory for the
            embedded mongita store.

    All methods are thread-safe (a lock serialises writes; mongita is not safe otherwise).
    """

    def __init__(self, db_url: str) -> None:
        if db_url.startswith(("mongodb://", "mongodb+srv://")):
            import pymongo

            client: Any = pymongo.MongoClient(db_url, serverSelectionTimeoutMS=5000)
        else:
            from mongita import MongitaClientDisk

            Path(db_url).mkdir(parents=True, exist_ok=True)
            client = MongitaClientDisk(db_url)
        self._db = client["flops"]
        self._lock = threading.RLock()
        docs = sorted(self._db[PROJECTS].find({}), key=lambda d: d.get("created_at", 0.0))
        self._summaries: dict[str, dict[str, Any]] = {str(d["_id"]): _summary(d) for d in docs}
        """Project id → summary, oldest first (dict order = creation order)."""

    # projects -------------------------------------------------------------------------
    def insert_project(self, project: dict[str, Any]) -> None:
        """Store a new project document (its ``_id`` is the project id)."""
        with self._lock:
            self._db[PROJECTS].insert_one(dict(project))
            summary = _summary(project)
            newest = next(reversed(self._summaries.values()), None)
            self._summaries[str(project["_id"])] = summary
            if newest is not None and newest.get("created_at", 0.0) > summary.get(
                "created_at", 0.0
            ):
                ordered = sorted(self._summaries.items(), key=lambda i: i[1].get("created_at", 0.0))
                self._summaries = dict(ordered)

    def get_project(self, project_id: str) -> dict[str, Any] | None:
        """Return the project document or ``None``."""
        with self._lock:
            doc: dict[str, Any] | None = self._db[PROJECTS].find_one({"_id": project_id})
            return doc

    def list_projects(self) -> list[dict[str, Any]]:
        """Return every project document, oldest first."""
        with self._lock:
            docs = list(self._db[PROJECTS].find({}))
        return sorted(docs, key=lambda d: d.get("created_at", 0.0))

    def find_projects(
        self, query: dict[str, Any], offset: int = 0, limit: int = 50
    ) -> tuple[list[dict[str, Any]], int]:
        """Summaries (:data:`SUMMARY_FIELDS`) of the projects matching ``query`` (equality on
        those fields), oldest first.

        Returns ``(page, total)``: at most ``limit`` summaries after skipping ``offset``, and
        how many match in all.
        """
        with self._lock:
            if not query:
                page = itertools.islice(self._summaries.values(), offset, offset + limit)
                return [dict(d) for d in page], len(self._summaries)
            docs = [
                d for d in self._summaries.values() if all(d.get(k) == v for k, v in query.items())
            ]
        return [dict(d) for d in docs[offset : offset + limit]], len(docs)

    def update_project(
        self,
        project_id: str,
        fields: dict[str, Any],
        event: dict[str, Any] | None = None,
        push: dict[str, Any] | None = None,
    ) -> None:
        """Set ``fields`` (dotted paths allowed), append ``event`` to the event log and each
        value of ``push`` to the list under its key, in one atomic update.

        ``updated_at`` is set to now (seconds since the epoch).
        """
        appended = dict(push or {})
        if event is not None:
            appended["events"] = event
        update: dict[str, Any] = {"$set": {**fields, "updated_at": time.time()}}
        if appended:
            update["$push"] = appended
        summary = _summary(update["$set"])
        with self._lock:
            self._db[PROJECTS].update_one({"_id": project_id}, update)
            if project_id in self._summaries:
                self._summaries[project_id].update(summary)

    def delete_all(self) -> None:
        """Remove every project and node."""
        with self._lock:
            self._db[PROJECTS].delete_many({})
            self._summaries.clear()
            self._db[NODES].delete_many({})

    # nodes ----------------------------------------------------------------------------
    def upsert_node(self, node: dict[str, Any]) -> None:
        """Insert or replace the node document with ``_id == node["node_id"]``."""
        doc = {**node, "_id": node["node_id"]}
        with self._lock:
            self._db[NODES].replace_one({"_id": doc["_id"]}, doc, upsert=True)

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return every registered node, ordered by node id."""
        with self._lock:
            docs = list(self._db[NODES].find({}))
        return sorted(docs, key=lambda d: str(d["_id"]))

    def delete_node(self, node_id: str) -> bool:
        """Remove the node; ``False`` when there was none with that id."""
        with self._lock:
            result = self._db[NODES].delete_one({"_id": node_id})
        return bool(result.deleted_count)
