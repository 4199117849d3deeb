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
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import requests
from oakestra_double import OakestraDouble, WorkerSpec
from oci_testing import base_image_archive, recipe_key

from flops_utils.net import find_free_port, wait_for_port
from flops_utils.processes import stop_process_groups

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
COMPOSE_HTTP_TIMEOUT_S = 600.0
DOWN_TIMEOUT_S = 900.0
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
    remove_other_tags(tags["FLOPS_MANAGER_IMAGE"])
    for name in STAND_INS:
        context = IMAGES / name
        variable = f"FLOPS_{name.upper()}_IMAGE"
        tags[variable], seconds[name] = build_image(
            name, context, context / "Containerfile", [context], base
        )
    return tags, seconds


def remove_other_tags(tag: str) -> None:
    """Remove the other tags of ``tag``'s repository (earlier builds of changed inputs; the
    manager image is rebuilt at every code change). An image a container uses stays."""
    repository = tag.rsplit(":", 1)[0]
    listed = run(["docker", "images", repository, "--format", "{{.Repository}}:{{.Tag}}"])
    for other in listed.stdout.split():
        if other != tag:
            run(["docker", "image", "rm", other], check=False)


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
        """Run ``docker-compose ARGS`` (without ``FLOPS_*`` variables of this process), its
        requests to dockerd allowed :data:`COMPOSE_HTTP_TIMEOUT_S` (removing the manager's
        buildah storage volume takes longer than docker-compose's default 60 s on a loaded
        machine, and docker-compose then stops removing the other volumes)."""
        env = {**env_without_flops(), "COMPOSE_HTTP_TIMEOUT": str(int(COMPOSE_HTTP_TIMEOUT_S))}
        return run(self.command(*args), check=check, timeout_s=timeout_s, env=env)

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
        """Remove the project's containers, networks and volumes; ``RuntimeError`` quoting
        docker-compose when it fails."""
        self.run("down", "-v", "--remove-orphans", "--timeout", "20", timeout_s=DOWN_TIMEOUT_S)

    def __enter__(self) -> ComposeProject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()


# ---- the host side of a project run through the suite ---------------------------------------

DOUBLE_START_TIMEOUT_S = 30.0
DOUBLE_STOP_TIMEOUT_S = 30.0


def docker_gateway() -> str:
    """The address of this machine on Docker's default bridge (``docker0``): what
    ``host-gateway`` (``extra_hosts: host.docker.internal:host-gateway``) resolves to in a
    container. Listening there, a host process is reachable from the suite's containers and
    from this machine, not from the network."""
    template = "{{range .IPAM.Config}}{{.Gateway}} {{end}}"
    inspected = run(["docker", "network", "inspect", "bridge", "--format", template])
    gateways = [g for g in inspected.stdout.split() if "." in g]
    if not gateways:
        raise DockerUnavailable(f"Docker's bridge network has no IPv4 gateway: {inspected.stdout}")
    return gateways[0]


@contextmanager
def oakestra_double_on(
    host: str, port: int, workdir: Path, workers: Sequence[WorkerSpec]
) -> Iterator[OakestraDouble]:
    """The Oakestra double (``python -m oakestra_double``) listening on ``host:port``, its
    instances run with buildah on this machine; yields an :class:`OakestraDouble` whose
    ``url`` is that address (its test hooks work; it was not started by it). Stopped
    (SIGTERM: it undeploys every instance) at the end; ``RuntimeError`` with its log when it
    does not answer within :data:`DOUBLE_START_TIMEOUT_S`."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "oakestra_double", "--host", host, "--port", str(port),
        "--report-delay-s", "0.5", "--restart-delay-s", "2",
        "--workdir", str(workdir / "instances"),
        *(f"--worker={w.cluster}:{w.hostname}:{w.arch}" for w in workers),
    ]  # fmt: skip
    tests = str(Path(__file__).resolve().parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    double = OakestraDouble(workdir, workers=workers, port=port)
    double.url = f"http://{host}:{port}"
    with (workdir / "double.log").open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        started = _wait(lambda: _answers(f"{double.url}/double/stats"), DOUBLE_START_TIMEOUT_S)
        if not started:
            raise RuntimeError(f"the Oakestra double did not answer: {double.log_tail()}")
        yield double
    finally:
        stop_process_groups([process], timeout_s=DOUBLE_STOP_TIMEOUT_S)


class GitDaemon:
    """A bare git repository made from a directory, served read-only by ``git daemon``
    (``git://``, which shallow clones need; git's "dumb" HTTP cannot serve them) on
    ``host:<free port>``; ``url`` is the clone URL as a client at ``advertised_host`` reaches
    it. A context manager; ``RuntimeError`` when the daemon does not listen within 10 s."""

    def __init__(self, source: Path, workdir: Path, host: str, advertised_host: str) -> None:
        self.workdir = workdir
        self.host = host
        self.port = find_free_port(host)
        self.name = f"{source.name}.git"
        self.url = f"git://{advertised_host}:{self.port}/{self.name}"
        self._make(source)
        self._process: subprocess.Popen[bytes] | None = None

    def _make(self, source: Path) -> None:
        work = self.workdir / "work"
        shutil.copytree(source, work, ignore=shutil.ignore_patterns("__pycache__"))
        identity = ["-c", "user.name=FLOps tests", "-c", "user.email=tests@flops.invalid"]
        run(["git", "-C", str(work), "init", "-q"])
        run(["git", "-C", str(work), "add", "-A"])
        run(["git", "-C", str(work), *identity, "commit", "-q", "-m", "example"])
        run(["git", "clone", "-q", "--bare", str(work), str(self.workdir / "served" / self.name)])

    def __enter__(self) -> GitDaemon:
        served = self.workdir / "served"
        with (self.workdir / "git-daemon.log").open("ab") as log:
            self._process = subprocess.Popen(
                ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={served}",
                 f"--listen={self.host}", f"--port={self.port}", str(served)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        if not wait_for_port(self.host, self.port, 10.0):
            self.__exit__()
            raise RuntimeError(f"git daemon did not listen on {self.host}:{self.port}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            stop_process_groups([self._process], timeout_s=10.0)
            self._process = None


def remove_buildah_names(registry: str) -> list[str]:
    """Remove the names under ``registry`` (``host:port``) from buildah's (test) storage: the
    images the double's workers pulled from the suite's registry. Returns the names removed."""
    listed = json.loads(run(["buildah", "images", "--json"]).stdout or "[]")
    names = [
        n for image in listed for n in image.get("names") or [] if n.startswith(f"{registry}/")
    ]
    for name in names:
        run(["buildah", "rmi", name], check=False)
    return names


def docker_images_from(registry: str) -> list[str]:
    """Ids of the images in dockerd pulled from ``registry`` (``host:port``)."""
    listed = run(["docker", "images", "--digests", "--format", "{{.Repository}} {{.ID}}"])
    return sorted({
        line.split()[1] for line in listed.stdout.splitlines()
        if line.startswith(f"{registry}/")
    })  # fmt: skip


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False
