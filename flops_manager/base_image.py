"""The Python 3.11 base image the manager makes itself when none is configured.

Trained-model images (:mod:`image_builder.model_image`) are built ``FROM`` a Python 3.11 image.
With no ``FLOPS_BASE_IMAGE`` the embedded suite makes one, once, on the first build that needs
it (:class:`BaseImageMaker`): Debian 12 (``bookworm``) ``--variant=minbase`` with
``python3`` (3.11, as the manager) and ``ca-certificates``, made by ``debootstrap`` from the
Debian mirror this machine's apt uses (:func:`debian_mirror`), trimmed (:data:`BASE_TRIM`),
imported with buildah and kept as an OCI archive under ``~/.cache/flops/base-images``
(``XDG_CACHE_HOME``), named by the hash of :data:`BASE_RECIPE` and the architecture
(:func:`recipe_key`). It is pushed to the embedded registry as
``<registry>/flops/base:<recipe key>``; a registry that has that tag already is not pushed to.

What it costs: 70-120 s on a 2-core machine the first time (debootstrap downloads and unpacks
about 40 Debian packages), seconds afterwards; 123 MB uncompressed.

Reproducibility: the recipe (suite, variant, packages, trim, configuration) is fixed and
hashed; the packages are the suite's current versions on the mirror, so two machines make the
same image while the mirror serves the same point release.

Downloads: ``debootstrap`` fetches Debian packages from the machine's configured apt mirror,
as ``apt-get install`` does; these are operating-system packages, not data sets or models.
Nothing is pulled from a public image registry.

Needs root (debootstrap), ``debootstrap`` and ``buildah`` (:func:`missing_requirements`).
The tests (``tests/oci_testing.py``) use the same recipe and cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flops_manager.embedded_registry import find_tool
from image_builder.python_env import file_lock

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flops"
"""Where base image archives are kept (``<CACHE_ROOT>/base-images``)."""

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
"""What the base image is made of; its hash names the cached archive and the image's tag."""

FOREIGN_METHOD = "debootstrap-foreign+dpkg-deb-x"
"""How a base image of another architecture is made (part of its recipe key; the tests make
those, ``tests/oci_testing.py``)."""

REPOSITORY = "base"
"""The base image's repository under the registry namespace (``<registry>/flops/base``)."""

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT_S = 1200.0
TOOL_TIMEOUT_S = 600.0

REQUIREMENTS = {"debootstrap": "debootstrap", "buildah": "buildah"}
"""Executable → Debian package making the base image needs."""

_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}

Progress = Callable[[str], None]
"""Called with a sentence for the user at each milestone of making the base image."""


class BaseImageError(Exception):
    """Making or pushing the base image failed; the message says which command and why."""


def missing_requirements(cache_root: Path = CACHE_ROOT) -> list[str]:
    """What this machine lacks to make the base image (``[]`` when it can, or when the
    archive is cached already): root, debootstrap, buildah."""
    if archive_path(cache_root).is_file():
        return [] if find_tool("buildah") else ["buildah (apt-get install buildah)"]
    problems = [] if os.geteuid() == 0 else ["root (debootstrap)"]
    problems += [
        f"{tool} (apt-get install {package})"
        for tool, package in REQUIREMENTS.items()
        if find_tool(tool) is None
    ]
    return problems


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
            if BASE_SUITE in fields.get("suites", "").split() and fields.get("uris"):
                return fields["uris"].split()[0]
    sources = Path("/etc/apt/sources.list")
    if sources.is_file():
        for line in sources.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and BASE_SUITE in parts:
                return next(part for part in parts[1:] if "://" in part)
    return DEFAULT_MIRROR


def host_arch() -> str:
    """This machine's Debian/OCI architecture (``amd64``, ``arm64``)."""
    machine = platform.machine().lower()
    return _DEBIAN_ARCH.get(machine, machine)


def recipe_key(arch: str | None = None) -> str:
    """16-hex hash of :data:`BASE_RECIPE` and the architecture (``None``: this machine's).

    This machine's key hashes the architecture as ``platform.machine()`` names it; another
    architecture's also names :data:`FOREIGN_METHOD`.
    """
    if arch is None or arch == host_arch():
        material = {**BASE_RECIPE, "arch": platform.machine()}
    else:
        material = {**BASE_RECIPE, "arch": arch, "method": FOREIGN_METHOD}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def archive_path(cache_root: Path = CACHE_ROOT, arch: str | None = None) -> Path:
    """``cache_root/base-images/debian-bookworm-python3-[<arch>-]<recipe key>.oci.tar``."""
    foreign = arch is not None and arch != host_arch()
    label = f"{arch}-" if foreign else ""
    return cache_root / "base-images" / f"debian-bookworm-python3-{label}{recipe_key(arch)}.oci.tar"


def base_image_archive(cache_root: Path = CACHE_ROOT, on_progress: Progress | None = None) -> Path:
    """This machine's base image as an OCI archive (:func:`archive_path`), made once and
    cached; concurrent callers (other processes too) wait on a lock. ``on_progress`` hears
    when it is being made. Raises :class:`BaseImageError` with the failing command's output."""
    archive = archive_path(cache_root)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(archive.parent / ".lock", timeout_s=DEBOOTSTRAP_TIMEOUT_S):
        if not archive.is_file():
            if on_progress is not None:
                on_progress(
                    f"making the Python 3.11 base image (Debian {BASE_SUITE} {BASE_VARIANT} "
                    f"with {', '.join(BASE_PACKAGES)} from the apt mirror {debian_mirror()}); "
                    "only the first build does this, it takes a few minutes"
                )
            started = time.monotonic()
            make_base_archive(archive)
            if on_progress is not None:
                on_progress(f"base image made in {time.monotonic() - started:.0f} s")
    return archive


def make_base_archive(archive: Path) -> None:
    """debootstrap a minbase rootfs, trim it, import it with buildah, save it as ``archive``."""
    scratch = Path(tempfile.mkdtemp(prefix="flops-base-", dir=archive.parent))
    rootfs = scratch / "rootfs"
    try:
        run_tool(
            ["debootstrap", f"--variant={BASE_VARIANT}", f"--include={','.join(BASE_PACKAGES)}",
             BASE_SUITE, str(rootfs), debian_mirror()],
            DEBOOTSTRAP_TIMEOUT_S,
        )  # fmt: skip
        trim_rootfs(rootfs)
        archive_rootfs(rootfs, archive, None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def archive_rootfs(rootfs: Path, archive: Path, arch: str | None) -> None:
    """Import ``rootfs`` with buildah as the base image (for ``arch``; ``None``: this
    machine's) and save it as the OCI archive ``archive`` (written whole, then renamed)."""
    platform_options = [] if arch is None else ["--arch", arch, "--os", "linux"]
    local = f"localhost/flops-base:{recipe_key(arch)}"
    container = run_tool(["buildah", "from", *platform_options, "scratch"], 60).stdout.strip()
    try:
        copy_rootfs(rootfs, container)
        run_tool(
            ["buildah", "config", *platform_options, "--env", "LANG=C.UTF-8",
             "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--cmd", "python3", "--label", "org.opencontainers.image.title=flops-base",
             "--label", f"org.flops.recipe={recipe_key(arch)}", container],
            60,
        )  # fmt: skip
        run_tool(["buildah", "commit", "--quiet", "--rm", container, local], TOOL_TIMEOUT_S)
        container = ""
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        run_tool(["buildah", "push", "--quiet", local, f"oci-archive:{partial}"], TOOL_TIMEOUT_S)
        partial.rename(archive)
    finally:
        if container:
            run_tool(["buildah", "rm", container], 60, check=False)
        run_tool(["buildah", "rmi", local], 60, check=False)


def trim_rootfs(rootfs: Path) -> None:
    """Remove :data:`BASE_TRIM` from ``rootfs`` (``locale.alias`` is kept)."""
    for pattern in BASE_TRIM:
        for path in rootfs.glob(pattern):
            if path.name == "locale.alias":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def copy_rootfs(rootfs: Path, container: str) -> None:
    """Copy ``rootfs`` into the mounted buildah ``container`` with tar (owners, modes,
    setuid bits and device nodes exactly as they are), then unmount it."""
    mount = run_tool(["buildah", "mount", container], 60).stdout.strip()
    pack = subprocess.Popen(["tar", "-C", str(rootfs), "-cf", "-", "."], stdout=subprocess.PIPE)
    unpack = subprocess.run(
        ["tar", "-C", mount, "-xpf", "-"], stdin=pack.stdout, timeout=TOOL_TIMEOUT_S, check=False
    )
    assert pack.stdout is not None
    pack.stdout.close()
    if pack.wait(timeout=TOOL_TIMEOUT_S) != 0 or unpack.returncode != 0:
        raise BaseImageError("copying the rootfs into the buildah container failed")
    run_tool(["buildah", "umount", container], 60)


def push_archive(archive: Path, ref: str, tls_verify: bool = False) -> None:
    """Copy the OCI ``archive`` to ``ref`` (``host:port/name:tag``) with buildah (pulled into
    the local storage, then pushed). Raises :class:`BaseImageError`."""
    pulled = run_tool(["buildah", "pull", "--quiet", f"oci-archive:{archive}"], TOOL_TIMEOUT_S)
    image_id = pulled.stdout.strip().splitlines()[-1]
    verify = f"--tls-verify={str(tls_verify).lower()}"
    run_tool(["buildah", "push", "--quiet", verify, image_id, f"docker://{ref}"], TOOL_TIMEOUT_S)


def registry_has(ref: str, tls_verify: bool = False, timeout_s: float = 10.0) -> bool:
    """Whether the registry of ``ref`` (``host:port/name:tag``) has that tag (``HEAD`` of
    its manifest, registry v2 API)."""
    host, _, path = ref.partition("/")
    name, _, tag = path.rpartition(":")
    scheme = "https" if tls_verify else "http"
    request = urllib.request.Request(f"{scheme}://{host}/v2/{name}/manifests/{tag}", method="HEAD")
    accept = (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
    request.add_header("Accept", ", ".join(accept))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


class BaseImageMaker:
    """Makes the base image once and pushes it to ``registry`` (``host:port``, plain HTTP
    unless ``tls_verify``) as ``<registry>/<namespace>/base:<recipe key>``.

    :meth:`ref` is thread-safe; the first call pays (see the module docstring), later ones
    return the reference at once.
    """

    def __init__(
        self,
        registry: str,
        namespace: str = "flops",
        tls_verify: bool = False,
        cache_root: Path = CACHE_ROOT,
    ) -> None:
        self.registry = registry
        self.namespace = namespace
        self.tls_verify = tls_verify
        self.cache_root = cache_root
        self._lock = threading.Lock()
        self._ready = False

    @property
    def target(self) -> str:
        """The reference the base image is pushed as."""
        return f"{self.registry}/{self.namespace}/{REPOSITORY}:{recipe_key()}"

    def missing(self) -> list[str]:
        """What this machine lacks to make the base image (:func:`missing_requirements`)."""
        return missing_requirements(self.cache_root)

    def ref(self, on_progress: Progress | None = None) -> str:
        """The base image's reference in the registry, made and pushed first when the
        registry does not have it; ``on_progress`` hears the milestones. Raises
        :class:`BaseImageError`."""
        with self._lock:
            if self._ready and registry_has(self.target, self.tls_verify):
                return self.target
            if not registry_has(self.target, self.tls_verify):
                if problems := self.missing():
                    raise BaseImageError(
                        "The manager cannot make the Python 3.11 base image: it needs "
                        f"{', '.join(problems)}. Install them, or set FLOPS_BASE_IMAGE."
                    )
                archive = base_image_archive(self.cache_root, on_progress)
                started = time.monotonic()
                push_archive(archive, self.target, self.tls_verify)
                if on_progress is not None:
                    on_progress(
                        f"base image pushed to {self.target} in {time.monotonic() - started:.1f} s"
                    )
            self._ready = True
            return self.target


def run_tool(
    command: list[str], timeout_s: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (its executable looked up with :func:`find_tool`), output captured.
    Raises :class:`BaseImageError` with the end of stderr when it fails and ``check``."""
    executable = find_tool(command[0]) or command[0]
    try:
        result = subprocess.run(
            [executable, *command[1:]],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaseImageError(f"{' '.join(command[:3])} failed: {exc}") from exc
    if check and result.returncode != 0:
        raise BaseImageError(
            f"{' '.join(command[:3])} failed ({result.returncode}): {result.stderr[-3000:]}"
        )
    return result
