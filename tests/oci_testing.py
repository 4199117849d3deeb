"""Real OCI components for tests: a registry v2 on loopback and a local base image.

- :class:`LocalRegistry`: Debian's ``docker-registry serve CONFIG`` with filesystem storage in a
  directory, plain HTTP on ``127.0.0.1:<free port>`` (the manager's embedded registry,
  :class:`flops_manager.embedded_registry.RegistryServer`).
- :func:`base_image_archive`: a small Debian 12 image with ``python3`` (3.11, as the manager) and
  ``ca-certificates``, made with ``debootstrap --variant=minbase`` from the machine's apt mirror
  and imported with buildah; cached as an OCI archive under ``~/.cache/flops/base-images/``
  keyed by :data:`BASE_RECIPE` and the architecture, so only the first run pays (70-120 s
  here). This machine's is the base image the manager makes itself
  (:mod:`flops_manager.base_image`, same recipe and cache). For another architecture
  (``arch="arm64"``, which this machine cannot run) the same packages are fetched with
  ``debootstrap --foreign`` and unpacked with ``dpkg-deb`` without running any of their code
  (:func:`_make_foreign_base_archive`, about 35 s here).
  :func:`push_archive` copies an archive into a registry with skopeo, and
  :func:`push_manifest_list` joins pushed images into one multi-platform reference. Nothing is
  pulled from public registries.
- :func:`layer_sizes`: the uncompressed size of each layer of a local image;
  :func:`skopeo_json`, :func:`run_in_image` and :func:`mounted_image` look at pushed images.
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
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flops_manager.base_image import (
    BASE_PACKAGES,
    BASE_RECIPE,
    BASE_SUITE,
    BASE_TRIM,
    BASE_VARIANT,
    FOREIGN_METHOD,
    archive_path,
    archive_rootfs,
    debian_mirror,
    host_arch,
    make_base_archive,
    recipe_key,
    trim_rootfs,
)
from flops_manager.embedded_registry import RegistryServer
from flops_utils.processes import StartStop
from image_builder.python_env import file_lock

__all__ = [
    "BASE_PACKAGES",
    "BASE_RECIPE",
    "BASE_SUITE",
    "BASE_TRIM",
    "BASE_VARIANT",
    "FOREIGN_METHOD",
    "debian_mirror",
    "host_arch",
    "recipe_key",
]
"""The recipe names re-exported for the tests (defined in :mod:`flops_manager.base_image`)."""

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flops"
"""Where the tests keep what outlives a session: the base image archive, the test storage."""

TOOLS = {
    "buildah": "buildah",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "debootstrap": "debootstrap",
    "dpkg-deb": "dpkg",
}
"""Executable → Debian package the OCI tests need."""


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
    base URL. Use as a context manager; :meth:`start` raises ``RegistryUnavailable`` with the
    log's tail if the registry does not answer ``GET /v2/`` within 15 s.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._server = RegistryServer(workdir)
        self.port = self._server.port
        self.address = self._server.address
        self.url = self._server.url

    def start(self) -> LocalRegistry:
        """Write the config, start the registry and wait until it answers."""
        self._server.start()
        self.port, self.address, self.url = (
            self._server.port,
            self._server.address,
            self._server.url,
        )
        return self

    def stop(self) -> None:
        """Stop the registry process (its process group)."""
        self._server.stop()


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


def skopeo_json(*args: str) -> dict[str, object]:
    """``skopeo ARGS`` (e.g. ``inspect --tls-verify=false docker://REF``) parsed as JSON."""
    result = _run(["skopeo", *args], 120)
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def run_in_image(ref: str, code: str) -> dict[str, object]:
    """Run ``python -c code`` as the image's user in a container of the pushed image ``ref``
    (pulled; from a manifest list, this machine's platform) with ``buildah run --isolation
    chroot``; return the JSON object its last output line holds. Raises ``RuntimeError`` with
    stderr's tail if the code fails."""
    container = _run(
        ["buildah", "from", "--quiet", "--tls-verify=false", f"docker://{ref}"], TOOL_TIMEOUT_S
    ).stdout.strip()
    try:
        result = _run(
            ["buildah", "run", "--isolation", "chroot", container, "--", "python", "-c", code],
            TOOL_TIMEOUT_S,
        )
    finally:
        _run(["buildah", "rm", container], 120, check=False)
    parsed: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


@contextmanager
def mounted_image(ref: str, arch: str) -> Iterator[Path]:
    """The root file system of the pushed image ``ref`` for ``arch`` (``arm64``; from a
    manifest list, that entry), pulled and mounted read-write in a working container that is
    removed afterwards. Nothing in it runs."""
    container = _run(
        ["buildah", "from", "--quiet", "--arch", arch, "--tls-verify=false", f"docker://{ref}"],
        TOOL_TIMEOUT_S,
    ).stdout.strip()
    try:
        yield Path(_run(["buildah", "mount", container], 120).stdout.strip())
    finally:
        _run(["buildah", "rm", container], 120, check=False)


def _listening(port: int) -> bool:
    """True if something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def base_image_archive(cache_root: Path = CACHE_ROOT, arch: str | None = None) -> Path:
    """The test base image as an OCI archive, made once per :data:`BASE_RECIPE` and
    architecture and cached.

    ``arch``: Debian architecture (``arm64``); ``None`` for this machine's. Path:
    ``cache_root/base-images/debian-bookworm-python3-<recipe key>.oci.tar`` (another
    architecture: ``...-python3-<arch>-<recipe key>.oci.tar``). Concurrent sessions wait on a
    lock. Raises ``RuntimeError`` with the failing command's output.
    """
    archive = archive_path(cache_root, arch)
    directory = archive.parent
    directory.mkdir(parents=True, exist_ok=True)
    foreign = arch is not None and arch != host_arch()
    with file_lock(directory / ".lock", timeout_s=DEBOOTSTRAP_TIMEOUT_S):
        if not archive.is_file():
            if foreign:
                assert arch is not None
                _make_foreign_base_archive(archive, arch)
            else:
                make_base_archive(archive)
    return archive


def push_archive(
    archive: Path, registry: str, name: str = "flops/base", arch: str | None = None
) -> str:
    """Copy ``archive`` into ``registry`` (plain HTTP) as ``name:<recipe key of arch>``;
    return the ref."""
    ref = f"{registry}/{name}:{recipe_key(arch)}"
    _run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci-archive:{archive}", f"docker://{ref}"],
        TOOL_TIMEOUT_S,
    )  # fmt: skip
    return ref


def push_manifest_list(refs: list[str], ref: str) -> str:
    """Push one manifest list ``ref`` (``host/name:tag``, plain HTTP) of the images ``refs``,
    which must be in the same repository of that registry already; return ``ref``.

    Each entry's platform is its image's (``buildah manifest add`` reads the config).
    """
    local = f"localhost/flops-test-list:{hashlib.sha256(ref.encode()).hexdigest()[:12]}"
    if _run(["buildah", "manifest", "exists", local], 60, check=False).returncode == 0:
        _run(["buildah", "manifest", "rm", local], 60)
    _run(["buildah", "manifest", "create", local], 60)
    try:
        for image in refs:
            _run(
                ["buildah", "manifest", "add", "--tls-verify=false", local, f"docker://{image}"],
                TOOL_TIMEOUT_S,
            )
        _run(
            ["buildah", "manifest", "push", "--tls-verify=false", local, f"docker://{ref}"],
            TOOL_TIMEOUT_S,
        )
    finally:
        _run(["buildah", "manifest", "rm", local], 60, check=False)
    return ref


def layer_sizes(image: str) -> list[int]:
    """Uncompressed size in bytes of each layer of the local image ``image`` (a name in the
    storage buildah uses), base first: the ``diff-size`` its containers storage records for
    each of the config's ``rootfs.diff_ids``."""
    inspected = json.loads(_run(["buildah", "inspect", "--type", "image", image], 60).stdout)
    diff_ids = inspected["OCIv1"]["rootfs"]["diff_ids"]
    info = json.loads(_run(["buildah", "info"], 60).stdout)
    graph_root = Path(info["store"]["GraphRoot"])
    driver = info["store"]["GraphDriverName"]
    layers = json.loads((graph_root / f"{driver}-layers" / "layers.json").read_text())
    sizes = {layer.get("diff-digest"): int(layer.get("diff-size", 0)) for layer in layers}
    return [sizes[diff_id] for diff_id in diff_ids]


def _make_foreign_base_archive(archive: Path, arch: str) -> None:
    """The base image for ``arch`` (a Debian architecture this machine cannot run), made
    without running any of its code.

    ``debootstrap --foreign`` downloads the packages (its first stage; the second, which runs
    the maintainer scripts, needs the target CPU); every ``.deb`` is unpacked into the rootfs
    as ``debootstrap`` does (``dpkg-deb --fsys-tarfile | tar --keep-directory-symlink``, so
    the merged ``/usr`` symlinks stay). What the maintainer scripts would have made is made
    here: ``/etc/passwd`` and ``/etc/group`` from ``base-passwd``'s masters, the CA bundle
    from ``/usr/share/ca-certificates`` (as ``update-ca-certificates``), a real ``/proc``
    directory. The interpreter (``/usr/bin/python3.11``, an ``arch`` ELF binary) and its
    standard library are all the oci builder reads. Imported with buildah as an ``arch``
    image and saved as an OCI archive.
    """
    scratch = Path(tempfile.mkdtemp(prefix="flops-base-", dir=archive.parent))
    rootfs = scratch / "rootfs"
    try:
        _run(
            ["debootstrap", "--foreign", f"--arch={arch}", f"--variant={BASE_VARIANT}",
             f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, str(rootfs), debian_mirror()],
            DEBOOTSTRAP_TIMEOUT_S,
        )  # fmt: skip
        for deb in sorted((rootfs / "var/cache/apt/archives").glob("*.deb")):
            _unpack_deb(deb, rootfs)
        shutil.rmtree(rootfs / "debootstrap", ignore_errors=True)
        proc = rootfs / "proc"
        if proc.is_symlink():  # the first stage links the host's /proc
            proc.unlink()
            proc.mkdir(mode=0o555)
        for name in ("passwd", "group"):
            master = rootfs / "usr/share/base-passwd" / f"{name}.master"
            if not (rootfs / "etc" / name).exists() and master.is_file():
                shutil.copyfile(master, rootfs / "etc" / name)
        certificates = sorted((rootfs / "usr/share/ca-certificates").rglob("*.crt"))
        bundle = rootfs / "etc/ssl/certs/ca-certificates.crt"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.write_bytes(b"".join(path.read_bytes() for path in certificates))
        for path in (rootfs / "etc/hostname", rootfs / "etc/resolv.conf"):
            path.unlink(missing_ok=True)  # the host's, copied by debootstrap
        trim_rootfs(rootfs)
        archive_rootfs(rootfs, archive, arch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _unpack_deb(deb: Path, rootfs: Path) -> None:
    """Unpack the files of ``deb`` into ``rootfs`` (owners and modes kept), no scripts run."""
    extract = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    unpack = subprocess.run(
        ["tar", "-C", str(rootfs), "--keep-directory-symlink", "--numeric-owner", "-xpf", "-"],
        stdin=extract.stdout,
        capture_output=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )
    assert extract.stdout is not None
    extract.stdout.close()
    if extract.wait(timeout=TOOL_TIMEOUT_S) != 0 or unpack.returncode != 0:
        raise RuntimeError(f"unpacking {deb.name} failed: {unpack.stderr.decode()[-2000:]}")


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
