"""Fixtures of the builder tests: real git repositories made from ``examples/mnist_sklearn``.
The real OCI components (``oci_tools``, ``oci_registry``, ``oci_base_image``) are session
fixtures of ``tests/conftest.py``, shared with the Oakestra tests; the multi-platform base image
(``oci_multiplatform_base``) is made here."""

from pathlib import Path

import git
import pytest
from builder_testing import ExampleRepo, commit_all, copy_example
from oci_testing import base_image_archive, push_archive, push_manifest_list, recipe_key


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


@pytest.fixture(scope="session")
def oci_multiplatform_base(oci_registry: str, oci_base_image: str) -> str:
    """One base reference for linux/amd64 and linux/arm64: a manifest list in the session's
    registry of the local Debian 12 base (``oci_base_image``) and its arm64 twin, made from
    the same packages without running arm64 code (:func:`oci_testing.base_image_archive`
    with ``arch="arm64"``, cached like the amd64 one); its ref (``.../flops/base:multi-...``)."""
    arm64 = push_archive(base_image_archive(arch="arm64"), oci_registry, arch="arm64")
    tag = f"multi-{recipe_key()}-{recipe_key('arm64')}"
    return push_manifest_list([oci_base_image, arm64], f"{oci_registry}/flops/base:{tag}")
