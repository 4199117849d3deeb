"""Running a child to a log file with a timeout (flops_utils.processes.run_to_log)."""

import sys
import time
from pathlib import Path

from flops_utils.processes import run_to_log


def test_exit_status_and_output_land_in_the_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    code = "import sys; print('out', flush=True); print('err', file=sys.stderr); sys.exit(3)"

    status = run_to_log([sys.executable, "-c", code], log, 30, header="$ child\n")

    assert status == 3
    assert log.read_text().splitlines() == ["$ child", "out", "err"]


def test_a_child_past_its_timeout_is_stopped_with_its_group(tmp_path: Path) -> None:
    # Setup: the child starts a grandchild that would outlive it
    marker = tmp_path / "grandchild-alive"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').close()\n")
    child = tmp_path / "child.py"
    child.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(grandchild)!r}])\n"
        "time.sleep(60)\n"
    )

    started = time.monotonic()
    status = run_to_log([sys.executable, str(child)], tmp_path / "child.log", 1.0)
    time.sleep(3.5)

    assert status is None
    assert time.monotonic() - started < 15
    assert not marker.exists()  # the grandchild was stopped with the group
