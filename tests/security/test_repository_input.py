"""Repository input stays inside the repository (issue 12, attack 1).

Real git repositories (``git init`` in ``tmp_path``, made from ``examples/mnist_sklearn``) are
built with the real ``venv`` builder; every refusal happens before an installer runs, so the
tests are fast. A marker secret outside the repository must never show up in an error, and a
local package's ``setup.py`` must never run.
"""

from pathlib import Path

import git
import pydantic
import pytest
from builder_testing import commit_all, copy_example

from flops_manager.sla import LocalRepoNotAllowed, ProjectSLA, check_repo_url
from image_builder.errors import DependencyFileError, UnsafeRepoInputError
from image_builder.python_env import redact_paths
from image_builder.repo import checked_out_repo
from image_builder.venv_builder import VenvBuilder

SECRET = "FLOPS-TEST-SECRET-7f3a9c"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A file outside every repository, holding the marker secret as a requirement line."""
    path = tmp_path / "outside" / "api-token"
    path.parent.mkdir()
    path.write_text(f"{SECRET}==1.0\n")
    return path


def make_repo(tmp_path: Path, files: dict[str, str], links: dict[str, Path] | None = None) -> Path:
    """The example repository with ``files`` (relative path → text) written and ``links``
    (relative path → target) as symbolic links, committed with real git; its path."""
    path = copy_example(tmp_path / "repo")
    for name in ("requirements.txt", "conda.yaml", "conda.yml", "pyproject.toml"):
        (path / name).unlink(missing_ok=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    for name, target in (links or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).symlink_to(target)
    repo = git.Repo.init(path, initial_branch="main")
    commit_all(repo, "example")
    repo.close()
    return path


def build(tmp_path: Path, repo: Path) -> None:
    """Build ``repo`` with the real venv builder (the repository is cloned with git)."""
    VenvBuilder(tmp_path / "cache").build(repo.as_uri(), None, tmp_path / "work")


def assert_no_leak(error: BaseException, *secrets: str) -> None:
    text = f"{error} {getattr(error, 'details', '')}"
    for secret in secrets:
        assert secret not in text, text


def test_symlinked_requirements_file_is_refused(tmp_path: Path, secret_file: Path) -> None:
    repo = make_repo(tmp_path, {}, links={"requirements.txt": secret_file})

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert "requirements.txt" in caught.value.message
    assert "outside the repository" in caught.value.message
    assert_no_leak(caught.value, SECRET, str(secret_file), str(tmp_path))


def test_symlink_to_a_missing_file_gives_the_same_answer(tmp_path: Path) -> None:
    """Whether the target exists must not change the error (no existence oracle)."""
    repo = make_repo(tmp_path, {}, links={"requirements.txt": tmp_path / "no-such-file"})

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert "outside the repository" in caught.value.message


def test_symlinked_contract_file_is_refused(tmp_path: Path, secret_file: Path) -> None:
    repo = copy_example(tmp_path / "repo")
    (repo / "data_manager.py").unlink()
    (repo / "data_manager.py").symlink_to(secret_file)
    git_repo = git.Repo.init(repo, initial_branch="main")
    commit_all(git_repo, "example")
    git_repo.close()

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert "data_manager.py" in caught.value.message
    assert_no_leak(caught.value, SECRET, str(secret_file))


@pytest.mark.parametrize(
    "line",
    [
        "-r {secret}",
        "-r /proc/self/environ",
        "--requirement={secret}",
        "-c {secret}",
        "-r ../../outside/api-token",
        "-r ../outside/api-token",
        "-r{secret}",
        "-r file://{secret}",
        "-r ~/.netrc",
    ],
)
def test_include_outside_the_repository_is_refused(
    tmp_path: Path, secret_file: Path, line: str
) -> None:
    text = "scikit-learn\n" + line.format(secret=secret_file) + "\n"
    repo = make_repo(tmp_path, {"requirements.txt": text})

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert "requirements.txt" in caught.value.message
    assert_no_leak(caught.value, SECRET)


def test_nested_include_is_checked_too(tmp_path: Path, secret_file: Path) -> None:
    repo = make_repo(
        tmp_path,
        {
            "requirements.txt": "-r reqs/base.txt\n",
            "reqs/base.txt": "numpy\n-r ../../outside/api-token\n",
        },
    )

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert "reqs/base.txt" in caught.value.message
    assert_no_leak(caught.value, SECRET)


def test_nested_symlink_include_is_refused(tmp_path: Path, secret_file: Path) -> None:
    repo = make_repo(
        tmp_path, {"requirements.txt": "-r base.txt\n"}, links={"base.txt": secret_file}
    )

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert_no_leak(caught.value, SECRET, str(secret_file))


def test_includes_inside_the_repository_are_accepted(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path,
        {
            "requirements.txt": "-r reqs/base.txt\n-c reqs/pins.txt\nscikit-learn>=1.5\n",
            "reqs/base.txt": "numpy\n-r more.txt\n",
            "reqs/more.txt": "pandas ; python_version >= '3.9'\n-r base.txt\n",
            "reqs/pins.txt": "numpy<3\n",
        },
    )

    with checked_out_repo(repo.as_uri(), None, tmp_path / "work") as checked_out:
        assert "-r reqs/base.txt" in checked_out.requirements


def test_environment_variables_in_requirements_are_refused(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path, {"requirements.txt": "--extra-index-url https://evil.invalid/${HOME}/\n"}
    )

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert "${" in caught.value.message


@pytest.mark.parametrize(
    "requirements",
    [
        "./pkg\n",
        "-e ./pkg\n",
        "-e .\n",
        "pkg/\n",
        "marker-pkg @ file://{repo}/pkg\n",
        "--find-links ./pkg\nmarker-pkg\n",
        "marker_pkg-1.0.tar.gz\n",
    ],
)
def test_local_package_build_never_runs(tmp_path: Path, requirements: str) -> None:
    marker = tmp_path / "setup-py-ran"
    setup_py = (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from setuptools import setup\n"
        "setup(name='marker-pkg', version='1.0')\n"
    )
    repo_path = tmp_path / "repo"
    text = requirements.format(repo=repo_path)
    repo = make_repo(tmp_path, {"requirements.txt": text, "pkg/setup.py": setup_py})
    (repo / "setup.py").write_text(setup_py)

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert "local package" in caught.value.message
    assert not marker.exists()


@pytest.mark.parametrize(
    "line",
    [
        "--index-url file:///etc/",
        "pkg @ file:///etc/passwd",
        "--global-option=--evil",
        "numpy --install-option=--prefix=/tmp",
        "--use-feature=truststore",
    ],
)
def test_other_host_reaching_lines_are_refused(tmp_path: Path, line: str) -> None:
    repo = make_repo(tmp_path, {"requirements.txt": f"numpy\n{line}\n"})

    with (
        pytest.raises(UnsafeRepoInputError),
        checked_out_repo(repo.as_uri(), None, tmp_path / "work"),
    ):
        pass


@pytest.mark.parametrize(
    "line",
    [
        "--extra-index-url https://download.pytorch.org/whl/cpu",
        "torch @ https://download.pytorch.org/whl/cpu/torch-2.3.0.whl",
        "flwr[simulation]>=1.8 ; python_version >= '3.9'",
        "numpy==1.26.4 --hash=sha256:" + "0" * 64,
        "git+https://github.com/example/pkg.git@v1#egg=pkg",
        "--only-binary :all:",
    ],
)
def test_ordinary_requirement_lines_are_accepted(tmp_path: Path, line: str) -> None:
    repo = make_repo(tmp_path, {"requirements.txt": f"{line}\n"})

    with checked_out_repo(repo.as_uri(), None, tmp_path / "work") as checked_out:
        assert checked_out.requirements == [line]


def test_conda_pip_section_is_checked(tmp_path: Path, secret_file: Path) -> None:
    conda = f"dependencies:\n  - numpy=1.26\n  - pip:\n    - -r {secret_file}\n"
    repo = make_repo(tmp_path, {"conda.yaml": conda})

    with pytest.raises(UnsafeRepoInputError) as caught:
        build(tmp_path, repo)

    assert_no_leak(caught.value, SECRET)


def test_pyproject_file_reference_is_refused(tmp_path: Path) -> None:
    pyproject = '[project]\nname = "x"\nversion = "1"\ndependencies = ["x @ file:///etc"]\n'
    repo = make_repo(tmp_path, {"pyproject.toml": pyproject})

    with pytest.raises(UnsafeRepoInputError):
        build(tmp_path, repo)


def test_unreadable_dependency_file_error_names_no_host_path(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, {"requirements.txt": "numpy\n"})
    (repo / "requirements.txt").write_bytes(b"\xff\xfe numpy\n")
    git_repo = git.Repo(repo)
    commit_all(git_repo, "binary")
    git_repo.close()

    with pytest.raises(DependencyFileError) as caught:
        build(tmp_path, repo)

    assert str(tmp_path) not in caught.value.message


def test_installer_output_is_scrubbed_of_host_paths() -> None:
    staging = "/home/flops/.flops/envs/.tmp-abc-123"
    stderr = (
        f"error: Failed to read `{staging}/repo/reqs.txt`\n"
        "  Caused by: /home/flops/.cache/uv/sdists-v9/x: permission denied\n"
        "  hint: see https://pypi.org/simple/numpy/ for versions\n"
        "  /proc/self/environ: not allowed\n"
    )

    text = redact_paths(stderr, {f"{staging}/repo": "<repository>", staging: "<build directory>"})

    assert "<repository>/reqs.txt" in text
    assert "https://pypi.org/simple/numpy/" in text
    for host_path in ("/home/flops", "/proc/self", ".cache/uv"):
        assert host_path not in text


def test_local_repo_url_is_refused_unless_allowed() -> None:
    for url in ("/proc/self/root/etc", "file:///srv/repos/x.git", "examples/mnist_sklearn",
                "~/repo", "../repo"):  # fmt: skip
        with pytest.raises(LocalRepoNotAllowed) as caught:
            check_repo_url(url, allow_local=False)
        assert caught.value.code == "ml_repo_url_not_allowed"
        check_repo_url(url, allow_local=True)
    for url in ("https://github.com/org/repo.git", "git@github.com:org/repo.git",
                "ssh://git@host/repo.git", "git://host/repo.git"):  # fmt: skip
        check_repo_url(url, allow_local=False)


def test_refusal_hides_credentials_of_the_url() -> None:
    with pytest.raises(LocalRepoNotAllowed) as caught:
        check_repo_url("file://user:hunter2@localhost/srv/x", allow_local=False)

    assert "hunter2" not in caught.value.message


@pytest.mark.parametrize(
    "url", ["https://[evil", "https://host:99999/x", "http://[::1/x", "https://:80/x"]
)
def test_malformed_repo_url_is_a_validation_error(url: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        ProjectSLA(ml_repo_url=url)

    assert caught.value.errors()[0]["loc"] == ("ml_repo_url",)
