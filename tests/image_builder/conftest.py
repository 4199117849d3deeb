"""Fixtures of the builder tests: real git repositories made from ``examples/mnist_sklearn``,
and the real OCI components of the ``oci`` builder tests (:mod:`oci_testing`)."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import git
import pytest
from builder_testing import ExampleRepo, commit_all, copy_example
from oci_testing import (
    LocalRegistry,
    base_image_archive,
    missing_requirements,
    prune_other_registries,
    push_archive,
    use_test_storage,
)


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
def oci_tools() -> Iterator[None]:
    """buildah, skopeo, docker-registry and debootstrap as root, with a test-only storage.

    Skips the OCI tests when something is missing, or fails them when ``FLOPS_REQUIRE_OCI=1``
    (CI sets it, so that a broken bootstrap cannot pass silently).
    """
    missing = missing_requirements()
    if missing:
        message = f"the oci builder tests need {', '.join(missing)}; run scripts/bootstrap"
        if os.environ.get("FLOPS_REQUIRE_OCI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    previous = os.environ.get("CONTAINERS_STORAGE_CONF")
    use_test_storage()
    yield
    if previous is None:
        os.environ.pop("CONTAINERS_STORAGE_CONF", None)
    else:
        os.environ["CONTAINERS_STORAGE_CONF"] = previous


@pytest.fixture(scope="session")
def oci_registry(oci_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry v2 on loopback for the session; yields its ``127.0.0.1:PORT``.

    Its storage (about 350 MB after the builder tests) is deleted at the end, and local image
    names of earlier sessions' registries are pruned from the test storage.
    """
    workdir = tmp_path_factory.mktemp("registry")
    with LocalRegistry(workdir) as registry:
        yield registry.address
        prune_other_registries(registry.address)
    shutil.rmtree(workdir / "storage", ignore_errors=True)


@pytest.fixture(scope="session")
def oci_base_image(oci_registry: str) -> str:
    """The local Debian 12 + python3 base image, pushed to the session's registry; its ref."""
    return push_archive(base_image_archive(), oci_registry)
