"""Real OCI components for tests (DESIGN.md §4): a registry v2 on loopback and a local base image.

- :class:`LocalRegistry`: Debian's ``docker-registry serve CONFIG`` with filesystem storage in a
  directory, plain HTTP on ``127.0.0.1:<free port>``.
- :func:`base_image_archive`: a small Debian 12 image with ``python3`` (3.11, as the manager) and
  ``ca-certificates``, made with ``debootstrap --variant=minbase`` from the machine's apt mirror
  and imported with buildah; cached as an OCI archive under ``~/.cache/flops/base-images/``
  keyed by :data:`BASE_RECIPE`, so only the first run pays (70-120 s here).
  :func:`push_archive` copies it into a registry with skopeo. Nothing is pulled from public
  registries.
- :func:`use_test_storage`: points buildah and skopeo at a containers storage of their own
  (``~/.cache/flops/containers``, via ``CONTAINERS_STORAGE_CONF``), so the tests' images and
  layer cache stay apart from the machine's and can be pruned.

Everything needs root and the Debian packages buildah, skopeo, docker-registry and debootstrap
(``scripts/bootstrap`` installs them); :func:`missing_requirements` says what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import yaml

from flops_utils.net import find_free_port, wait_for_port
from flops_utils.processes import StartStop, stop_process_groups
from image_builder.python_env import file_lock

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flops"
"""Where the tests keep what outlives a session: the base image archive, the test storage."""

TOOLS = {
    "buildah": "buildah",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "debootstrap": "debootstrap",
}
"""Executable → Debian package the OCI tests need."""

BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
BASE_PACKAGES = ("ca-certificates", "python3")
BASE_TRIM = (
    "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*",
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
)
"""Paths removed from the debootstrapped rootfs (``usr/share/locale/locale.alias`` is kept)."""

BASE_RECIPE = {
    "suite": BASE_SUITE,
    "variant": BASE_VARIANT,
    "include": list(BASE_PACKAGES),
    "trim": list(BASE_TRIM),
    "config": {"env": ["LANG=C.UTF-8"], "cmd": ["python3"]},
    "version": 1,
}
"""What the test base image is made of; its hash names the cached archive."""

DEFAULT_MIRROR = "http://deb.debian.org/debian"
START_TIMEOUT_S = 15.0
DEBOOTSTRAP_TIMEOUT_S = 1200.0
TOOL_TIMEOUT_S = 600.0


def missing_requirements() -> list[str]:
    """Why the OCI tests cannot run here (not root, missing packages); ``[]`` if they can."""
    problems = [] if os.geteuid() == 0 else ["root (buildah builds, debootstrap)"]
    for tool, package in TOOLS.items():
        if _which(tool) is None:
            problems.append(f"{tool} (apt-get install {package})")
    return problems


class LocalRegistry(StartStop):
    """A registry v2 (``docker-registry serve``) on ``127.0.0.1:<free port>``, plain HTTP.

    ``workdir``: holds the generated ``config.yml``, the storage (``storage/``) and the log.
    ``address`` is ``127.0.0.1:PORT`` (what image references start with); ``url`` the HTTP
    base URL. Use as a context manager; :meth:`start` raises ``RuntimeError`` with the log's
    tail if the registry does not answer ``GET /v2/`` within 15 s.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = find_free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalRegistry:
        """Write the config, start the registry and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.workdir / "storage")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.address, "secret": secrets.token_hex(16)},
        }
        config_path = self.workdir / "config.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        executable = _which("docker-registry")
        if executable is None:
            raise RuntimeError("docker-registry is missing; apt-get install docker-registry")
        log = (self.workdir / "registry.log").open("wb")
        try:
            self._process = subprocess.Popen(
                [executable, "serve", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        if wait_for_port("127.0.0.1", self.port, START_TIMEOUT_S):
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{self.url}/v2/", timeout=2).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.1)
        self.stop()
        tail = (self.workdir / "registry.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"docker-registry did not start on {self.address}: {tail}")

    def stop(self) -> None:
        """Stop the registry process (its process group)."""
        if self._process is not None:
            stop_process_groups([self._process])
            self._process = None


def use_test_storage(root: Path = CACHE_ROOT / "containers") -> Path:
    """Point buildah and skopeo (this process and its children) at a storage under ``root``.

    Writes ``root/storage.conf`` (overlay driver, ``graphroot`` ``root/storage``, ``runroot``
    ``/run/flops-test-containers``) and sets ``CONTAINERS_STORAGE_CONF``; returns the conf.
    """
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "storage.conf"
    conf.write_text(
        "[storage]\n"
        'driver = "overlay"\n'
        f'graphroot = "{root / "storage"}"\n'
        'runroot = "/run/flops-test-containers"\n',
        encoding="utf-8",
    )
    os.environ["CONTAINERS_STORAGE_CONF"] = str(conf)
    return conf


def prune_other_registries(keep_address: str) -> list[str]:
    """Remove local image names of loopback registries that are gone, except ``keep_address``.

    Earlier test sessions ran registries on other ports; their names keep images alive. A
    registry port that still accepts connections may belong to a session running now, so its
    names stay. Images of this session keep the shared layer cache (base, dependencies) alive.
    Returns the names removed.
    """
    result = _run(["buildah", "images", "--json"], 60)
    removed = []
    alive: dict[str, bool] = {}
    for image in json.loads(result.stdout or "[]"):
        for name in image.get("names") or []:
            address = name.split("/", 1)[0]
            if not address.startswith("127.0.0.1:") or address == keep_address:
                continue
            if address not in alive:
                alive[address] = _listening(int(address.rsplit(":", 1)[1]))
            if (
                not alive[address]
                and _run(["buildah", "rmi", name], 120, check=False).returncode == 0
            ):
                removed.append(name)
    return removed


def _listening(port: int) -> bool:
    """True if something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def debian_mirror() -> str:
    """The Debian mirror apt uses here (``URIs:`` of the ``bookworm`` deb822 source, or a
    ``deb URI bookworm`` line), else ``http://deb.debian.org/debian``."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file():
        for stanza in deb822.read_text(encoding="utf-8").split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
            if "bookworm" in fields.get("suites", "").split() and fields.get("uris"):
                return fields["uris"].split()[0]
    sources = Path("/etc/apt/sources.list")
    if sources.is_file():
        for line in sources.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "bookworm" in parts:
                return next(part for part in parts[1:] if "://" in part)
    return DEFAULT_MIRROR


def recipe_key() -> str:
    """16-hex hash of :data:`BASE_RECIPE` and this machine's architecture."""
    material = json.dumps({**BASE_RECIPE, "arch": platform.machine()}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def base_image_archive(cache_root: Path = CACHE_ROOT) -> Path:
    """The test base image as an OCI archive, made once per :data:`BASE_RECIPE` and cached.

    Path: ``cache_root/base-images/debian-bookworm-python3-<recipe key>.oci.tar``. Concurrent
    sessions wait on a lock. Raises ``RuntimeError`` with the failing command's output.
    """
    directory = cache_root / "base-images"
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / f"debian-bookworm-python3-{recipe_key()}.oci.tar"
    with file_lock(directory / ".lock", timeout_s=DEBOOTSTRAP_TIMEOUT_S):
        if not archive.is_file():
            _make_base_archive(archive)
    return archive


def push_archive(archive: Path, registry: str, name: str = "flops/base") -> str:
    """Copy ``archive`` into ``registry`` (plain HTTP) as ``name:<recipe key>``; return the ref."""
    ref = f"{registry}/{name}:{recipe_key()}"
    _run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci-archive:{archive}", f"docker://{ref}"],
        TOOL_TIMEOUT_S,
    )  # fmt: skip
    return ref


def _make_base_archive(archive: Path) -> None:
    """debootstrap a minbase rootfs, trim it, import it with buildah, save it as OCI archive."""
    scratch = Path(tempfile.mkdtemp(prefix="flops-base-", dir=archive.parent))
    rootfs = scratch / "rootfs"
    local = f"localhost/flops-test-base:{recipe_key()}"
    container = ""
    try:
        _run(
            ["debootstrap", f"--variant={BASE_VARIANT}", f"--include={','.join(BASE_PACKAGES)}",
             BASE_SUITE, str(rootfs), debian_mirror()],
            DEBOOTSTRAP_TIMEOUT_S,
        )  # fmt: skip
        for pattern in BASE_TRIM:
            for path in rootfs.glob(pattern):
                if path.name == "locale.alias":
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        container = _run(["buildah", "from", "scratch"], 60).stdout.strip()
        mount = _run(["buildah", "mount", container], 60).stdout.strip()
        # tar keeps owners, modes, setuid bits and device nodes exactly as debootstrap made them
        pack = subprocess.Popen(["tar", "-C", str(rootfs), "-cf", "-", "."], stdout=subprocess.PIPE)
        unpack = subprocess.run(
            ["tar", "-C", mount, "-xpf", "-"],
            stdin=pack.stdout,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
        assert pack.stdout is not None
        pack.stdout.close()
        if pack.wait(timeout=TOOL_TIMEOUT_S) != 0 or unpack.returncode != 0:
            raise RuntimeError("copying the debootstrap rootfs into the buildah container failed")
        _run(["buildah", "umount", container], 60)
        _run(
            ["buildah", "config", "--env", "LANG=C.UTF-8", "--env",
             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--cmd", "python3", "--label", "org.opencontainers.image.title=flops-test-base",
             "--label", f"org.flops.recipe={recipe_key()}", container],
            60,
        )  # fmt: skip
        _run(["buildah", "commit", "--quiet", "--rm", container, local], TOOL_TIMEOUT_S)
        container = ""
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        _run(["buildah", "push", "--quiet", local, f"oci-archive:{partial}"], TOOL_TIMEOUT_S)
        partial.rename(archive)
    finally:
        if container:
            _run(["buildah", "rm", container], 60, check=False)
        _run(["buildah", "rmi", local], 60, check=False)
        shutil.rmtree(scratch, ignore_errors=True)


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")


def _run(
    command: list[str], timeout_s: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    executable = _which(command[0]) or command[0]
    result = subprocess.run(
        [executable, *command[1:]], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:3])} failed ({result.returncode}): {result.stderr[-3000:]}"
        )
    return result
