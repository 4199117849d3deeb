"""Fixtures of the builder tests: real git repositories made from ``examples/mnist_sklearn``.
The real OCI components (``oci_tools``, ``oci_registry``, ``oci_base_image``) are session
fixtures of ``tests/conftest.py``, shared with the Oakestra tests."""

from pathlib import Path

import git
import pytest
from builder_testing import ExampleRepo, commit_all, copy_example


@pytest.fixture
def example_repo(tmp_path: Path) -> ExampleRepo:
    """The example as a git repository with two commits, a tag and a second branch."""
    path = copy_example(tmp_path / "mnist_repo")
    repo = git.Repo.init(path, initial_branch="main")
    first = commit_all(repo, "example")
    repo.create_tag("v1")
    repo.create_head("stable", first)
    (path / "NOTES.md").write_text("second commit\n")
    second = commit_all(repo, "notes")
    repo.close()
    return ExampleRepo(path=path, first=first, second=second)
