"""The docker-compose suite under test: local stand-ins for its images, and a compose project.

No public image registry is reachable here, so every image of ``docker-compose.yml`` is built
locally from the tests' debootstrapped Debian 12 base (:func:`oci_testing.base_image_archive`,
copied into dockerd with ``skopeo copy oci-archive:... docker-daemon:...``):

- the manager image from the repository's ``Containerfile`` (``BASE_IMAGE`` = that base);
- stand-ins with the official images' interfaces (``tests/deploy/images/<name>/``): Mosquitto,
  PostgreSQL and the registry from Debian's packages, and for MongoDB (no MongoDB binary
  installs here) SecantusDB's wire-protocol server, the store contract tests' server.

Each image is tagged ``flops-test/<name>:<hash of its inputs>`` and built only when that tag is
missing, so a session rebuilds only what changed (and Docker's layer cache keeps the manager's
dependency layer while only code changes). A TLS-inspecting proxy's CA certificates
(``/usr/local/share/ca-certificates/*.crt``) are passed to the builds (``EXTRA_CA_CERTS``).

:class:`ComposeProject` runs ``docker-compose`` for one uniquely named project with its own
``.env`` and removes everything of it (``down -v``) when done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from oci_testing import base_image_archive, recipe_key

REPO = Path(__file__).resolve().parent.parent
"""The repository root (``docker-compose.yml``, ``Containerfile``)."""

IMAGES = Path(__file__).resolve().parent / "deploy" / "images"
"""The stand-in images' build contexts."""

STAND_INS = ("mongo", "mosquitto", "postgres", "registry")
"""Services of ``docker-compose.yml`` whose official image is replaced by a local stand-in."""

MANAGER_INPUTS = (
    "Containerfile",
    ".dockerignore",
    "pyproject.toml",
    "uv.lock",
    "README.md",
    "utils_pkg",
    "flops_manager",
    "image_builder",
    "learner",
    "aggregator",
    "data_server",
    "observatory",
)
"""What the manager image is built from (``.dockerignore`` lets only these through)."""

EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
"""Where this machine's locally added CA certificates are (Debian's place for them)."""

BUILD_TIMEOUT_S = 1800.0
COMMAND_TIMEOUT_S = 300.0
IGNORED_PARTS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


class DockerUnavailable(Exception):
    """dockerd does not answer, or docker, docker-compose or skopeo is missing."""


def missing_requirements() -> list[str]:
    """Why the compose suite cannot run here (tools, a daemon); ``[]`` when it can."""
    problems = [
        f"{tool} (apt-get install {package})"
        for tool, package in (
            ("docker", "docker.io"),
            ("docker-compose", "docker-compose"),
            ("skopeo", "skopeo"),
            ("debootstrap", "debootstrap"),
        )
        if shutil.which(tool) is None
    ]
    if not problems and run(["docker", "info"], check=False, timeout_s=30).returncode != 0:
        problems.append("a running dockerd (scripts/bootstrap starts one)")
    return problems


def run(
    command: Sequence[str],
    *,
    check: bool = True,
    timeout_s: float = COMMAND_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` capturing text output; ``RuntimeError`` quoting it when ``check`` and
    it fails."""
    result = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:4])} ... exited with {result.returncode}: "
            f"{(result.stdout + result.stderr)[-3000:]}"
        )
    return result


def image_exists(tag: str) -> bool:
    """Whether dockerd holds the image ``tag``."""
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


def extra_ca_certs() -> str:
    """PEM text of this machine's locally added CA certificates (empty when none)."""
    if not EXTRA_CA_DIR.is_dir():
        return ""
    return "".join(path.read_text() for path in sorted(EXTRA_CA_DIR.glob("*.crt")))


def inputs_hash(paths: Iterable[Path], root: Path, extra: Mapping[str, str]) -> str:
    """16-hex hash of the files under ``paths`` (relative names and contents) and ``extra``."""
    digest = hashlib.sha256(json.dumps(dict(extra), sort_keys=True).encode())
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if IGNORED_PARTS.intersection(path.parts) or path.suffix == ".pyc":
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def base_image() -> str:
    """The tests' Debian 12 + python3 base in dockerd (``flops-test/base:<recipe key>``),
    copied from the cached OCI archive when missing."""
    tag = f"flops-test/base:{recipe_key()}"
    if not image_exists(tag):
        archive = base_image_archive()
        run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"docker-daemon:{tag}"])
    return tag


def build_image(
    name: str, context: Path, containerfile: Path, inputs: Iterable[Path], base: str
) -> tuple[str, float]:
    """Build ``flops-test/<name>:<inputs hash>`` from ``context`` unless it exists.

    Returns the tag and the build's seconds (0 when it existed). Raises ``RuntimeError``
    quoting the build's output when it fails.
    """
    ca = extra_ca_certs()
    tag = f"flops-test/{name}:{inputs_hash(inputs, context, {'base': base, 'ca': ca})}"
    if image_exists(tag):
        return tag, 0.0
    started = time.monotonic()
    run(
        ["docker", "build", "--quiet", "-f", str(containerfile), "-t", tag,
         "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"EXTRA_CA_CERTS={ca}",
         str(context)],
        timeout_s=BUILD_TIMEOUT_S,
    )  # fmt: skip
    return tag, time.monotonic() - started


def suite_images() -> tuple[dict[str, str], dict[str, float]]:
    """Build (or find) every image of the suite.

    Returns ``({FLOPS_*_IMAGE: tag}, {name: build seconds})``: the ``.env`` settings that
    point ``docker-compose.yml`` at the local images, and how long each build took.
    """
    base = base_image()
    tags: dict[str, str] = {}
    seconds: dict[str, float] = {}
    manager_inputs = [REPO / name for name in MANAGER_INPUTS]
    tags["FLOPS_MANAGER_IMAGE"], seconds["manager"] = build_image(
        "manager", REPO, REPO / "Containerfile", manager_inputs, base
    )
    for name in STAND_INS:
        context = IMAGES / name
        variable = f"FLOPS_{name.upper()}_IMAGE"
        tags[variable], seconds[name] = build_image(
            name, context, context / "Containerfile", [context], base
        )
    return tags, seconds


def env_without_flops() -> dict[str, str]:
    """This process's environment without ``FLOPS_*`` variables (which would override
    ``.env``: docker-compose prefers the shell's)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}


def write_env(path: Path, overrides: Mapping[str, str]) -> Path:
    """Write ``.env.example`` with ``overrides`` (replaced or appended) to ``path``."""
    lines = (REPO / ".env.example").read_text().splitlines()
    remaining = dict(overrides)
    out = []
    for line in lines:
        name = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#") and name in remaining:
            out.append(f"{name}={remaining.pop(name)}")
        else:
            out.append(line)
    out += [f"{name}={value}" for name, value in remaining.items()]
    path.write_text("\n".join(out) + "\n")
    return path


class ComposeProject:
    """``docker-compose -p NAME --env-file ENV -f docker-compose.yml`` of this repository.

    ``name``: the project name (unique per test); ``env_file``: its ``.env``. Use as a context
    manager: leaving runs ``down -v --remove-orphans`` (containers, networks, volumes).
    """

    def __init__(self, name: str, env_file: Path) -> None:
        self.name = name
        self.env_file = env_file

    def command(self, *args: str) -> list[str]:
        """The docker-compose command line for ``args``."""
        return [
            "docker-compose", "--project-directory", str(REPO), "-p", self.name,
            "--env-file", str(self.env_file), "-f", str(REPO / "docker-compose.yml"), *args,
        ]  # fmt: skip

    def run(
        self, *args: str, check: bool = True, timeout_s: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker-compose ARGS`` (without ``FLOPS_*`` variables of this process)."""
        return run(self.command(*args), check=check, timeout_s=timeout_s, env=env_without_flops())

    def container_ids(self) -> list[str]:
        """Ids of every container (running or not) labelled with this project."""
        return self._listed("ps", "-aq")

    def volume_names(self) -> list[str]:
        """Names of the volumes labelled with this project."""
        return self._listed("volume", "ls", "-q")

    def network_names(self) -> list[str]:
        """Names of the networks labelled with this project."""
        return self._listed("network", "ls", "-q")

    def _listed(self, *command: str) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        return run(["docker", *command, "--filter", label]).stdout.split()

    def health(self) -> dict[str, str]:
        """Service → its container's health (``healthy``, ``starting``, ``unhealthy``), or its
        state when it has no health check (``running``, ``exited(0)``)."""
        states: dict[str, str] = {}
        for container in self.container_ids():
            info = json.loads(run(["docker", "inspect", container]).stdout)[0]
            service = info["Config"]["Labels"]["com.docker.compose.service"]
            state = info["State"]
            if "Health" in state:
                states[service] = state["Health"]["Status"]
            elif state["Status"] == "exited":
                states[service] = f"exited({state['ExitCode']})"
            else:
                states[service] = state["Status"]
        return states

    def logs(self) -> str:
        """The last lines of every service's log (for a failure's message)."""
        return self.run("logs", "--no-color", "--tail", "40", check=False).stdout

    def down(self) -> None:
        """Remove the project's containers, networks and volumes."""
        self.run("down", "-v", "--remove-orphans", "--timeout", "20", check=False)

    def __enter__(self) -> ComposeProject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()
