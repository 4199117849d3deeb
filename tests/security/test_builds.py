"""Builds are bounded (issue 12, attack 6, the build parts): a tarpit git server, an oversized
repository and a cancelled project cannot hold a build worker.

The tarpit is a real HTTP server (a thread) that answers git's first request and then sends one
byte a second; git fetches from it over real HTTP. Bounds are shrunk through
:class:`~image_builder.repo.FetchLimits`, never by sleeping.
"""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import git
import pytest
from builder_testing import commit_all, copy_example
from tarpit_testing import tarpit_server
from waiting import wait_until

from flops_manager.builds import VenvProjectBuilder
from flops_manager.sla import ProjectSLA
from image_builder.build_processes import BuildRegistry, group_exists, run_bounded
from image_builder.errors import BuildCancelled, RepoFetchLimitError
from image_builder.repo import FetchLimits, fetch_repo
from image_builder.venv_builder import VenvBuilder


@pytest.fixture
def tarpit() -> Iterator[str]:
    """The URL of a repository on a tarpit git HTTP server."""
    with tarpit_server() as url:
        yield f"{url}/slow/repo.git"


def test_tarpit_below_the_minimum_rate_fails_within_the_bound(tarpit: str, tmp_path: Path) -> None:
    limits = FetchLimits(timeout_s=60, low_speed_bytes_per_s=1000, low_speed_time_s=2)
    builder = VenvBuilder(tmp_path / "cache", fetch_limits=limits)
    started = time.monotonic()

    with pytest.raises(RepoFetchLimitError) as caught:
        builder.build(tarpit, None, tmp_path / "work")

    assert time.monotonic() - started < 15
    assert "less than 1000 bytes/s for 2 s" in caught.value.message
    assert str(tmp_path) not in caught.value.message


def test_tarpit_above_the_minimum_rate_stops_at_the_total_timeout(
    tarpit: str, tmp_path: Path
) -> None:
    limits = FetchLimits(timeout_s=2, low_speed_bytes_per_s=1, low_speed_time_s=60)
    started = time.monotonic()

    with pytest.raises(RepoFetchLimitError) as caught:
        fetch_repo(tarpit, None, tmp_path / "clone", limits=limits)

    assert time.monotonic() - started < 10
    assert "did not finish within 2 s" in caught.value.message


def test_oversized_repository_is_stopped(tmp_path: Path) -> None:
    path = copy_example(tmp_path / "big")
    (path / "weights.bin").write_bytes(os.urandom(3 << 20))
    repo = git.Repo.init(path, initial_branch="main")
    commit_all(repo, "big")
    repo.close()
    limits = FetchLimits(max_bytes=1 << 20, size_check_interval_s=0)

    with pytest.raises(RepoFetchLimitError) as caught:
        fetch_repo(path.as_uri(), None, tmp_path / "clone", limits=limits)

    assert "larger than 1 MiB" in caught.value.message


def test_cancel_kills_a_running_clone(tarpit: str, tmp_path: Path) -> None:
    limits = FetchLimits(timeout_s=120, low_speed_bytes_per_s=1, low_speed_time_s=120)
    builder = VenvProjectBuilder(tmp_path / "envs", fetch_limits=limits)
    sla = ProjectSLA(ml_repo_url=tarpit)
    outcome: list[BaseException] = []

    def build() -> None:
        try:
            builder.build("p-cancel", sla, tmp_path / "work")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    # git fetch runs git-remote-http as its child, which talks to the tarpit
    pids = wait_until(
        lambda: [pid for pid in _scope_pids(builder) if _has_child(pid)],
        message="git fetch never started",
    )

    assert builder.cancel("p-cancel")

    thread.join(timeout=15)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], BuildCancelled)
    for pid in pids:
        wait_until(partial(_group_gone, pid), timeout_s=5, message="git survived")
    assert not builder.cancel("p-cancel")  # nothing runs any more


def _group_gone(pgid: int) -> bool:
    return not group_exists(pgid)


def _read_pid(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def _scope_pids(builder: VenvProjectBuilder) -> list[int]:
    scope = builder.builds.get("p-cancel")
    return scope.pids() if scope is not None else []


def _has_child(pid: int) -> bool:
    """True once ``pid`` has a child process (git's ``git-remote-http``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return bool(children.read_text().split())
    except OSError:
        return False


def test_a_cancelled_build_starts_nothing_more(tmp_path: Path) -> None:
    registry = BuildRegistry()

    with registry.scope("p") as scope:
        scope.cancel()
        with pytest.raises(BuildCancelled):
            run_bounded(["true"], timeout_s=5, timeout_error=lambda: AssertionError("timed out"))


def test_image_builder_service_stops_its_processes_on_sigterm(tmp_path: Path) -> None:
    """The ``oci`` backend's service cancels on SIGTERM (what ImageBuildService.cancel sends):
    its running programs' groups are gone and it fails with BuildCancelled."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from image_builder.build_processes import BuildRegistry, run_bounded\n"
        "from image_builder.errors import BuildCancelled\n"
        "from image_builder.main import _cancel_on_sigterm\n"
        "registry = BuildRegistry()\n"
        "with registry.scope('p') as scope, _cancel_on_sigterm(scope):\n"
        "    try:\n"
        "        run_bounded(['sh', '-c', f'echo $$ > {sys.argv[1]}; exec sleep 120'],\n"
        "                    timeout_s=120, timeout_error=RuntimeError)\n"
        "    except BuildCancelled:\n"
        "        sys.exit(9)\n"
    )
    service = subprocess.Popen([sys.executable, "-c", code, str(pid_file)], start_new_session=True)
    try:
        child = int(wait_until(partial(_read_pid, pid_file)))

        service.terminate()

        assert service.wait(timeout=15) == 9
        wait_until(lambda: not group_exists(child), timeout_s=5, message="sleep survived")
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
