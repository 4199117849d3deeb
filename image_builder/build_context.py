"""What goes into a buildah build context, shared by the image builders.

The learner and aggregator images (:mod:`image_builder.oci_builder`) and the trained-model
images (:mod:`image_builder.model_image`) install their dependencies the same way: a ``build/``
directory with the generated requirement files and the installer (:data:`INSTALLER_FILES`,
copied from :data:`TEMPLATES` by :func:`stage_installer`), and a ``tools/`` directory with uv
and the host's CA bundle that the install step mounts (:func:`stage_tools`). Their
Containerfiles are :data:`TEMPLATES` filled in with :class:`string.Template`, labels written by
:func:`label_arguments`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from image_builder.python_env import uv_binary

TEMPLATES = Path(__file__).resolve().parent / "templates"
"""The Containerfile templates, the installer and the helpers copied into images."""

INSTALLER_FILES = ("install.sh", "slim_site_packages.py")
"""The dependency installer every image uses, copied into the context's ``build/``:
``install.sh`` and the helper it runs after an install (``slim_site_packages.py``, which
removes the test suites of big packages)."""


@functools.cache
def templates_hash(names: tuple[str, ...]) -> str:
    """SHA-256 (hex) of the :data:`TEMPLATES` files ``names`` (names and contents); read once
    per process (the templates are part of the installed package)."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (TEMPLATES / name).read_bytes())
    return digest.hexdigest()


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path``, one a line (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` to ``dest`` (same file system), else copy it with its mode."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def stage_installer(build: Path) -> None:
    """Copy :data:`INSTALLER_FILES` into the context directory ``build`` (which must exist)."""
    for name in INSTALLER_FILES:
        shutil.copyfile(TEMPLATES / name, build / name)


def stage_tools(context: Path) -> None:
    """Make ``context/tools/``: ``uv`` (:func:`~image_builder.python_env.uv_binary`) and, when
    ``SSL_CERT_FILE`` names a file, ``ca-certificates.crt``: uv on this machine trusts that
    bundle (e.g. a proxy's CA), so does uv in the build. The install step mounts the directory,
    so nothing of it stays in an image."""
    (context / "tools").mkdir()
    link_or_copy(uv_binary(), context / "tools" / "uv")
    ca_bundle = os.environ.get("SSL_CERT_FILE", "")
    if ca_bundle and Path(ca_bundle).is_file():
        shutil.copyfile(ca_bundle, context / "tools" / "ca-certificates.crt")


def label_arguments(labels: Mapping[str, str]) -> str:
    """The arguments of one Containerfile ``LABEL`` instruction: ``name="value"`` a line
    (continued with ``\\``), values on one line, with ``\\``, ``"`` and ``$`` escaped."""
    return " \\\n      ".join(f"{name}={_quote(value)}" for name, value in labels.items())


def _quote(value: str) -> str:
    flat = " ".join(value.split())
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'
