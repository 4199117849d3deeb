"""What an Oakestra worker node does with an instance, done with buildah on this machine (or,
with the ``process`` runtime, as a plain host process).

An :class:`InstanceRunner` pulls the service's image into a working container
(``buildah from --tls-verify=false``), runs its command in it (``buildah run --isolation
chroot --network host``) as a child process in its own session, and reports each step:
``NODE_SCHEDULED`` → ``RUNNING`` → ``COMPLETED`` (exit 0 of a one-shot service) or ``DEAD``
(the container exited with an error, or a long-running service exited at all), as the
NodeEngine marks them; ``FAILED`` means the instance could not be started (a failed pull, a
platform the worker does not have, no command). A container killed by signal N exits
``128 + N`` as a container runtime reports it. :meth:`InstanceRunner.undeploy` kills the
process group; the working container is removed when the instance ends either way. The
cluster manager restarts ``FAILED`` and ``DEAD`` instances (see :mod:`.root`).

The ``process`` runtime (``process_images``) needs neither root nor buildah: an image
reference names an entrypoint argv that runs as a host process with the service's
environment added to the double's, for tests of scheduling, ports and statuses.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flops_utils.processes import signal_group, stop_process_groups

PULL_TIMEOUT_S = 600.0
TOOL_TIMEOUT_S = 60.0

Report = Callable[[dict[str, Any]], None]
"""Receives the fields of the instance that changed (``status``, ``status_detail``, ...)."""

ProcessImages = dict[str, list[str]]
"""The ``process`` runtime's images: reference → the entrypoint argv it runs on the host."""

ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}


@dataclass(frozen=True)
class WorkerSpec:
    """One worker node: its cluster's name, its hostname and its architecture (``amd64``,
    ``arm64``; the platform's second part, e.g. ``linux/arm64`` → ``arm64``)."""

    cluster: str
    hostname: str
    arch: str = ARCH_ALIASES.get(platform.machine(), platform.machine())

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        """``CLUSTER:HOSTNAME[:ARCH]`` → a spec (ARCH defaults to this machine's)."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"worker {text!r} is not CLUSTER:HOSTNAME[:ARCH]")
        return cls(*parts)


def platform_arch(value: str) -> str:
    """``linux/arm64/v8`` → ``arm64``; ``x86_64`` → ``amd64``; ``amd64`` → ``amd64``."""
    parts = value.split("/")
    arch = parts[1] if len(parts) > 1 else parts[0]
    return ARCH_ALIASES.get(arch, arch)


class InstanceRunner(threading.Thread):
    """Runs one instance of ``service`` (the job record: ``image``, ``cmd``, ``environment``,
    ``platform``, ``one_shot``, ``port``) on ``worker``; reports through ``report``.

    ``container`` names the working container; ``log_path`` receives the instance's output.
    ``process_images``: run with the ``process`` runtime from these images (see the module
    docstring); ``None``: with buildah.
    """

    def __init__(
        self,
        service: dict[str, Any],
        worker: WorkerSpec,
        container: str,
        log_path: Path,
        report: Report,
        process_images: ProcessImages | None = None,
    ) -> None:
        super().__init__(name=f"instance-{container}", daemon=True)
        self.process_images = process_images
        self.service = service
        self.worker = worker
        self.container = container
        self.log_path = log_path
        self.report = report
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.status = "NODE_SCHEDULED"
        self._undeployed = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        """Pull, run, wait, report; always removes the working container at the end."""
        self._report("NODE_SCHEDULED", "the worker is pulling the image")
        created = False
        try:
            wanted = self.service.get("platform")
            if wanted and platform_arch(str(wanted)) != self.worker.arch:
                self._report(
                    "FAILED",
                    f"platform {wanted} does not match worker {self.worker.hostname} "
                    f"({self.worker.arch})",
                )
                return
            if self.process_images is not None:
                entrypoint = self.process_images.get(str(self.service["image"]))
                if entrypoint is None:
                    self._report("FAILED", f"image pull failed: {self.service['image']} unknown")
                    return
                command = [str(part) for part in self.service.get("cmd") or entrypoint]
            else:
                pulled = self._tool(
                    ["buildah", "from", "--tls-verify=false", "--retry", "0", "--name",
                     self.container, str(self.service["image"])],
                    PULL_TIMEOUT_S,
                )  # fmt: skip
                if pulled.returncode != 0:
                    self._report("FAILED", f"image pull failed: {_last_line(pulled.stderr)}")
                    return
                created = True
                command = self._command()
            if not command:
                self._report("FAILED", "the image has no entrypoint or cmd and none was given")
                return
            if not self._start(command):
                return
            self._report(
                "RUNNING",
                "the instance is running",
                publicip="127.0.0.1",
                host_ip="127.0.0.1",
                host_port=_host_port(self.service.get("port")),
            )
            assert self.process is not None
            code = self.process.wait()
            self.returncode = 128 - code if code < 0 else code
            if self._undeployed.is_set():
                return
            detail = f"the instance exited with code {self.returncode}"
            logs = _tail(self.log_path)
            if self.returncode == 0 and self.service.get("one_shot"):
                self._report("COMPLETED", detail, logs=logs)
            else:
                self._report("DEAD", detail, logs=logs)
        except Exception as exc:  # a worker that breaks reports it, like the NodeEngine
            self._report("FAILED", f"worker error: {exc}")
        finally:
            if created:
                self._tool(["buildah", "rm", self.container], TOOL_TIMEOUT_S)

    def undeploy(self, timeout_s: float = 10.0) -> None:
        """Kill the instance's process group (SIGTERM, then SIGKILL after ``timeout_s``) and
        wait until the working container is removed; no report follows."""
        self._undeployed.set()
        self.kill(signal.SIGTERM, grace_s=timeout_s)
        self.join(timeout=PULL_TIMEOUT_S)

    def kill(self, sig: signal.Signals = signal.SIGKILL, grace_s: float = 10.0) -> None:
        """Send ``sig`` to the instance's process group (a test hook: the instance then
        ends and is reported ``DEAD``); with SIGTERM, SIGKILL follows after ``grace_s``."""
        with self._lock:
            process = self.process
        if process is None or process.poll() is not None:
            return  # not started yet, or reaped (its pid may belong to another process now)
        if sig == signal.SIGTERM:
            stop_process_groups([process], timeout_s=grace_s)
        else:
            signal_group(process.pid, sig)

    def describe(self) -> dict[str, Any]:
        """The worker-side view: image, container, pid, status, return code, log path."""
        return {
            "image": str(self.service.get("image") or self.service.get("code") or ""),
            "host_port": _host_port(self.service.get("port")),
            "container": self.container,
            "pid": self.process.pid if self.process else None,
            "status": self.status,
            "returncode": self.returncode,
            "log": str(self.log_path),
            "worker": self.worker.hostname,
            "alive": self.is_alive(),
        }

    def _start(self, command: list[str]) -> bool:
        """Start ``buildah run``; False when the instance was undeployed meanwhile."""
        env_args: list[str] = []
        for item in self.service.get("environment") or []:
            env_args += ["--env", str(item)]
        argv = [
            _which("buildah"), "run", "--isolation", "chroot", "--network", "host", *env_args,
            self.container, "--", *command,
        ]  # fmt: skip
        env = None
        if self.process_images is not None:
            argv = command
            items = (str(item).partition("=") for item in self.service.get("environment") or [])
            env = {**os.environ, **{name: value for name, _, value in items}}
        with self._lock:
            if self._undeployed.is_set():
                return False
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        return True

    def _command(self) -> list[str]:
        """``cmd`` of the service (it replaces the entrypoint), else the image's
        entrypoint followed by its cmd."""
        if self.service.get("cmd"):
            return [str(part) for part in self.service["cmd"]]
        inspected = self._tool(
            ["buildah", "inspect", "--type", "container", self.container], TOOL_TIMEOUT_S
        )
        config = json.loads(inspected.stdout or "{}").get("OCIv1", {}).get("config", {})
        return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]

    def _report(self, status: str, detail: str, **fields: Any) -> None:
        self.status = status
        self.report({"status": status, "status_detail": detail, **fields})

    def _tool(self, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
        return subprocess.run(
            [_which(argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


def _which(tool: str) -> str:
    return shutil.which(tool) or tool


def _tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the instance's output (what the NodeEngine sends as
    ``logs``)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "no output"


def _host_port(port: object) -> str:
    """Oakestra's ``port`` (``"8080"``, ``"8080:80"``, ``"8080:80/tcp"``) → the host port."""
    if not port:
        return ""
    return str(port).split(":")[0].split("/")[0]
