"""Helpers for the builder tests: the example ML repository as real git repositories."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import git

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_sklearn"
AUTHOR = git.Actor("FLOps Test", "test@flops.invalid")


@dataclass(frozen=True)
class ExampleRepo:
    """A git work tree: ``first`` (tag ``v1``, branch ``stable``) then ``second`` on ``main``."""

    path: Path
    first: str
    second: str


def commit_all(repo: git.Repo, message: str) -> str:
    """Stage every file of the work tree and commit; return the commit SHA."""
    repo.git.add(A=True)
    return repo.index.commit(message, author=AUTHOR, committer=AUTHOR).hexsha


def copy_example(dest: Path) -> Path:
    """Copy the example ML repository (without caches) to ``dest``; return ``dest``."""
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest
