"""Fetching and validating ML repositories: real git repositories on disk, real git."""

import re
from pathlib import Path

import git
import pytest
from builder_testing import ExampleRepo, copy_example

from flops_utils.errors import FlopsError
from flops_utils.net import find_free_port
from image_builder.errors import RepoFetchError, RepoLayoutError, RepoRefError
from image_builder.repo import (
    condense_git_error,
    content_hash,
    fetch_repo,
    redact_url,
    validate_repo,
)


def _commit_count(path: Path) -> int:
    with git.Repo(path) as repo:
        return int(repo.git.rev_list("--count", "HEAD"))


def test_fetch_local_git_path_is_shallow_clone_of_head(
    example_repo: ExampleRepo, tmp_path: Path
) -> None:
    # Prepare
    dest = tmp_path / "clone"

    # Execute
    fetched = fetch_repo(str(example_repo.path), None, dest)

    # Assert
    assert fetched.is_git
    assert fetched.commit == example_repo.second
    assert (dest / "model_manager.py").is_file()
    assert (dest / "NOTES.md").is_file()
    assert _commit_count(dest) == 1


def test_fetch_file_url(example_repo: ExampleRepo, tmp_path: Path) -> None:
    # Prepare
    url = example_repo.path.as_uri()

    # Execute
    fetched = fetch_repo(url, None, tmp_path / "clone")

    # Assert
    assert fetched.commit == example_repo.second
    assert fetched.source == url


def test_relative_path_resolves_against_cwd(
    example_repo: ExampleRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.chdir(example_repo.path.parent)

    # Execute
    fetched = fetch_repo(example_repo.path.name, None, tmp_path / "clone")

    # Assert
    assert fetched.commit == example_repo.second


@pytest.mark.parametrize("ref_name", ["stable", "v1", "first-sha", "short-sha"])
def test_ref_checks_out_branch_tag_or_commit(
    example_repo: ExampleRepo, tmp_path: Path, ref_name: str
) -> None:
    # Prepare
    ref = {
        "stable": "stable",
        "v1": "v1",
        "first-sha": example_repo.first,
        "short-sha": example_repo.first[:10],
    }[ref_name]

    # Execute
    fetched = fetch_repo(example_repo.path.as_uri(), ref, tmp_path / "clone")

    # Assert
    assert fetched.commit == example_repo.first
    assert not (fetched.path / "NOTES.md").exists()


@pytest.mark.parametrize("ref", ["no-such-branch", "0123456789abcdef"])
def test_unknown_ref_is_a_clean_error(example_repo: ExampleRepo, tmp_path: Path, ref: str) -> None:
    # Execute
    with pytest.raises(RepoRefError) as caught:
        fetch_repo(str(example_repo.path), ref, tmp_path / "clone")

    # Assert
    assert caught.value.code == "ml_repo_ref_not_found"
    assert ref in caught.value.message
    assert "\n" not in caught.value.message


def test_plain_directory_is_copied_with_content_hash(tmp_path: Path) -> None:
    # Prepare
    source = copy_example(tmp_path / "plain")
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "model_manager.cpython-311.pyc").write_bytes(b"\0cache")
    twin = copy_example(tmp_path / "twin")

    # Execute
    fetched = fetch_repo(str(source), None, tmp_path / "copy")
    twin_hash = content_hash(twin)
    (twin / "model_manager.py").write_text("# changed\n", encoding="utf-8")
    changed_hash = content_hash(twin)

    # Assert
    assert not fetched.is_git
    assert re.fullmatch(r"[0-9a-f]{64}", fetched.commit)
    assert fetched.commit == twin_hash != changed_hash
    assert (fetched.path / "conda.yaml").is_file()
    assert not (fetched.path / "__pycache__").exists()


def test_ref_for_plain_directory_is_rejected(tmp_path: Path) -> None:
    # Prepare
    source = copy_example(tmp_path / "plain")

    # Execute
    with pytest.raises(RepoRefError) as caught:
        fetch_repo(str(source), "main", tmp_path / "copy")

    # Assert
    assert "not a git repository" in caught.value.message


def test_missing_path_is_a_clean_error(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(RepoFetchError) as caught:
        fetch_repo(str(tmp_path / "nowhere"), None, tmp_path / "clone")

    # Assert
    assert caught.value.code == "ml_repo_fetch_failed"
    assert "does not exist" in caught.value.message
    assert isinstance(caught.value, FlopsError)


def test_unreachable_url_condenses_git_error_and_hides_credentials(tmp_path: Path) -> None:
    # Prepare: nothing listens on this loopback port
    url = f"https://alice:s3cret-token@127.0.0.1:{find_free_port()}/team/repo.git"

    # Execute
    with pytest.raises(RepoFetchError) as caught:
        fetch_repo(url, None, tmp_path / "clone", timeout_s=30)

    # Assert
    message = caught.value.message
    assert "s3cret-token" not in message and "alice" not in message
    assert "s3cret-token" not in str(caught.value.details)
    assert "\n" not in message
    assert "unable to access" in message or "Failed to connect" in message
    assert message.startswith("Cannot fetch the ML repository https://***@127.0.0.1")


def test_git_dir_that_is_not_a_repository_is_a_clean_error(tmp_path: Path) -> None:
    # Prepare: a directory that claims to be a work tree but holds no repository
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ".git").write_text("gitdir: /nonexistent/path\n")

    # Execute
    with pytest.raises(RepoFetchError) as caught:
        fetch_repo(str(broken), None, tmp_path / "clone")

    # Assert
    assert "\n" not in caught.value.message
    assert "fatal" not in caught.value.message
    assert str(broken) in caught.value.message


@pytest.mark.parametrize("url", ["ftp://example.org/repo.git", "ext::sh -c touch% /tmp/pwned"])
def test_unsupported_urls_are_rejected(url: str, tmp_path: Path) -> None:
    # Execute
    with pytest.raises(RepoFetchError) as caught:
        fetch_repo(url, None, tmp_path / "clone")

    # Assert
    assert caught.value.code == "ml_repo_fetch_failed"
    assert not (tmp_path / "clone" / ".git").exists()


def test_missing_model_manager_is_named(tmp_path: Path) -> None:
    # Prepare
    repo_dir = copy_example(tmp_path / "repo")
    (repo_dir / "model_manager.py").unlink()

    # Execute
    with pytest.raises(RepoLayoutError) as caught:
        validate_repo(repo_dir, "my-repo")

    # Assert
    assert caught.value.code == "ml_repo_invalid"
    assert caught.value.details == ["model_manager.py"]
    assert caught.value.message.startswith("The ML repository my-repo lacks model_manager.py at")
    assert "class ModelManager" in caught.value.message


def test_missing_data_manager_and_dependency_file_are_named(tmp_path: Path) -> None:
    # Prepare
    repo_dir = copy_example(tmp_path / "repo")
    (repo_dir / "data_manager.py").unlink()
    (repo_dir / "conda.yaml").unlink()

    # Execute
    with pytest.raises(RepoLayoutError) as caught:
        validate_repo(repo_dir)

    # Assert
    assert caught.value.details[0] == "data_manager.py"
    assert "requirements.txt" in caught.value.details[1]
    assert "lacks data_manager.py and a dependency file" in caught.value.message


def test_validate_prefers_conda_yaml(tmp_path: Path) -> None:
    # Prepare
    repo_dir = copy_example(tmp_path / "repo")
    (repo_dir / "requirements.txt").write_text("scikit-learn\n")

    # Execute
    layout = validate_repo(repo_dir)

    # Assert
    assert layout.dependency_file == repo_dir / "conda.yaml"
    assert layout.model_manager == repo_dir / "model_manager.py"


def test_condense_git_error_keeps_first_fatal_line() -> None:
    # Prepare
    stderr = (
        "Cloning into 'x'...\n"
        "fatal: unable to access 'https://bob:pw@host/r.git/': Could not resolve host: host\n"
        "fatal: Could not read from remote repository.\n\n"
        "Please make sure you have the correct access rights\nand the repository exists.\n"
    )

    # Execute
    condensed = condense_git_error(stderr)

    # Assert
    assert condensed == "unable to access 'https://***@host/r.git/': Could not resolve host: host"
    assert redact_url("see https://u:p@h/x and http://h/y") == "see https://***@h/x and http://h/y"


def test_plain_directory_holding_the_work_dir_is_copied_without_it(tmp_path: Path) -> None:
    # Prepare: the destination lies inside the source (ml_repo_url "." with a local work dir)
    source = copy_example(tmp_path / "plain")
    dest = source / "work" / "clone"

    # Execute
    fetched = fetch_repo(str(source), None, dest, exclude=[source / "work"])

    # Assert
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        p.name for p in copy_example(tmp_path / "twin").iterdir()
    )
    assert fetched.commit == content_hash(tmp_path / "twin")


def test_oversized_plain_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a lower file limit stands in for a huge directory such as "/" or "~"
    source = copy_example(tmp_path / "plain")
    monkeypatch.setattr("image_builder.repo.MAX_COPY_FILES", 3)

    # Execute
    with pytest.raises(RepoFetchError) as caught:
        fetch_repo(str(source), None, tmp_path / "copy")

    # Assert
    assert "point it at the ML repository's root" in caught.value.message
    assert not any((tmp_path / "copy").iterdir())
