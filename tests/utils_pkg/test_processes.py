"""Running a child to a log file with a timeout (flops_utils.processes.run_to_log)."""

import sys
import time
from pathlib import Path

from waiting import wait_until

from flops_utils.processes import run_to_log


def test_exit_status_and_output_land_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    code = "import sys; print('out', flush=True); print('err', file=sys.stderr); sys.exit(3)"

    status = run_to_log([sys.executable, "-c", code], log, 30, header="$ child\n")

    assert status == 3
    assert log.read_text().splitlines() == ["$ child", "out", "err"]


def test_a_child_past_its_timeout_is_stopped_with_its_group(tmp_path: Path) -> None:
    # Setup: the child starts a grandchild that would outlive it
    pid_file = tmp_path / "grandchild.pid"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    child = tmp_path / "child.py"
    child.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(grandchild)!r}])\n"
        "time.sleep(60)\n"
    )

    started = time.monotonic()
    status = run_to_log([sys.executable, str(child)], tmp_path / "child.log", 1.0)

    assert status is None
    assert time.monotonic() - started < 15
    grandchild_pid = int(wait_until(pid_file.read_text, 5, "the grandchild's pid file"))
    wait_until(  # the grandchild was stopped with the group
        lambda: not _alive(grandchild_pid), 5, "the grandchild still runs"
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
