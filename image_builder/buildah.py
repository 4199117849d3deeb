"""buildah and skopeo, as the image builders run them, and their errors in a sentence.

:class:`Buildah` runs ``buildah build`` (daemonless: ``--isolation chroot --layers``, as root;
the output goes to a log file), pushes an image (``buildah push``) or a manifest list
(``buildah manifest create/add/push --all``) and then checks the registry's digest against the
pushed one (``skopeo inspect``, ``--raw`` for a list), queries the registry (a missing image is
``None``, any other failure a :class:`~image_builder.errors.RegistryUnreachableError`) and
mounts an image to read its files (``buildah from`` + ``buildah mount``; nothing in it runs).

Errors: :func:`build_failure` turns a failed build's output into a
:class:`~image_builder.errors.DependencyInstallError` (``install.sh`` exited with
:data:`DEPENDENCY_INSTALL_EXIT`: uv's message, from :func:`uv_attempts`) or an
:class:`~image_builder.errors.ImageBuildError` naming the failing step and its last output lines
(:func:`failing_step`); :func:`condense_tool_error` makes one clause of buildah's or skopeo's
own error output. Manifests: :func:`manifest_digest` and :func:`manifest_entries` read
``skopeo inspect --raw`` output; :func:`strip_tag` drops a reference's tag or digest.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flops_utils.logging import logger
from image_builder.build_processes import run_bounded
from image_builder.errors import (
    BaseImageError,
    BuilderError,
    BuildToolMissingError,
    ImageBuildError,
    ImagePushError,
    RegistryUnreachableError,
)
from image_builder.python_env import dependency_install_error

DEPENDENCY_INSTALL_EXIT = 42
"""Exit status of ``install.sh`` when no uv attempt could install the requirements."""

_NOT_FOUND = re.compile(r"manifest unknown|name unknown|not found|no such image", re.IGNORECASE)
_LOGRUS_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_STEP = re.compile(r"^STEP (\d+/\d+): (.*)$")
_BUILDAH_NOISE = re.compile(
    r"^(subprocess exited with status|error building at step|error: building at step|"
    r"time=|\[\d+/\d+\] step)",
    re.IGNORECASE,
)
_LIST_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)


def require_tools() -> tuple[str, str]:
    """Paths of buildah and skopeo; :class:`BuildToolMissingError` naming the install line."""
    found = {name: shutil.which(name) for name in ("buildah", "skopeo")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise BuildToolMissingError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed on "
            "this machine; install with `apt-get install buildah skopeo` (or run "
            "scripts/bootstrap)."
        )
    return str(found["buildah"]), str(found["skopeo"])


def run_tool(
    command: Sequence[str], timeout_s: float, what: str
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` capturing text output; :class:`ImageBuildError` after ``timeout_s``.

    Runs through :func:`~image_builder.build_processes.run_bounded` (own process group,
    stopped when the build is cancelled)."""
    return run_bounded(
        command,
        timeout_s=timeout_s,
        timeout_error=lambda: ImageBuildError(
            f"{what} did not finish within {timeout_s:.0f} s; check the registry connection."
        ),
    )


class Buildah:
    """buildah and skopeo on this machine, run with one builder's registry settings.

    ``buildah``/``skopeo``: the executables (:func:`require_tools` finds them). ``tls_verify``:
    ``False`` for plain-HTTP registries (pushes, queries and pulls alike). Timeouts in seconds:
    ``build_timeout_s`` per ``buildah build`` (default 1800), ``push_timeout_s`` per push or
    pull (default 900; a manifest list's push gets it once per image), ``registry_timeout_s``
    per registry query (default 60).
    """

    def __init__(
        self,
        buildah: str,
        skopeo: str,
        *,
        tls_verify: bool = True,
        build_timeout_s: float = 1800.0,
        push_timeout_s: float = 900.0,
        registry_timeout_s: float = 60.0,
    ) -> None:
        self.buildah = buildah
        self.skopeo = skopeo
        self.tls_verify = tls_verify
        self.build_timeout_s = build_timeout_s
        self.push_timeout_s = push_timeout_s
        self.registry_timeout_s = registry_timeout_s

    @property
    def _tls(self) -> str:
        return f"--tls-verify={str(self.tls_verify).lower()}"

    # -- the registry ------------------------------------------------------------------
    def inspect(self, image: str) -> dict[str, Any] | None:
        """``skopeo inspect`` of ``image`` (``host/path:tag``); ``None`` if it does not exist.

        Raises :class:`RegistryUnreachableError` for any other failure (connection, TLS,
        authentication), with skopeo's reason in the message.
        """
        output = self._skopeo_inspect(image)
        if output is None:
            return None
        parsed: dict[str, Any] = json.loads(output)
        return parsed

    def inspect_raw(self, image: str) -> str | None:
        """The manifest (or manifest list) of ``image`` as the registry serves it
        (``skopeo inspect --raw``); ``None`` if it does not exist. Errors as :meth:`inspect`."""
        return self._skopeo_inspect(image, "--raw")

    def _skopeo_inspect(self, image: str, *options: str) -> str | None:
        command = [
            self.skopeo, "inspect", *options, self._tls, "--retry-times", "2",
            f"docker://{image}",
        ]  # fmt: skip
        result = run_tool(command, self.registry_timeout_s, f"skopeo inspect {image}")
        if result.returncode == 0:
            return result.stdout
        reason = condense_tool_error(result.stderr)
        if _NOT_FOUND.search(reason):
            return None
        host = image.split("/", 1)[0]
        fix = "log in with `buildah login " + host + "`" if "unauthorized" in reason.lower() else (
            "start it, or fix the registry address and its TLS setting"
        )  # fmt: skip
        raise RegistryUnreachableError(
            f"Cannot use the image registry {host}: {reason}; {fix}.", details=[result.stderr]
        )

    # -- building ----------------------------------------------------------------------
    def build(
        self,
        context: Path,
        containerfile: Path,
        *,
        tag: str,
        platform: str,
        role: str,
        log_path: Path,
        volumes: Sequence[str] = (),
    ) -> None:
        """Run ``buildah build`` of ``containerfile`` in ``context`` for ``platform``
        (``os/arch``), naming the image ``tag``; its output goes to ``log_path``.

        ``role``: what the image is (``learner``, ``model``), for the messages. ``volumes``:
        ``--volume`` values (``host:container[:options]``). Raises :func:`build_failure`'s
        errors, or :class:`ImageBuildError` after ``build_timeout_s``.
        """
        command = [
            self.buildah, "build", "--isolation", "chroot", "--layers", "--force-rm",
            "--platform", platform, self._tls,
            *(option for volume in volumes for option in ("--volume", volume)),
            "-f", str(containerfile), "-t", tag, str(context),
        ]  # fmt: skip
        started = time.monotonic()
        logger.info("building the %s image %s for %s", role, tag, platform)
        log_path.unlink(missing_ok=True)
        with log_path.open("ab") as log:
            log.write(f"$ {shlex.join(command)}\n".encode())
            log.flush()
            returncode = run_bounded(
                command,
                timeout_s=self.build_timeout_s,
                timeout_error=lambda: ImageBuildError(
                    f"Building the {role} image did not finish within "
                    f"{self.build_timeout_s:.0f} s; see {log_path}, or raise build_timeout_s."
                ),
                stdout=log,
            ).returncode
        output = log_path.read_text(encoding="utf-8", errors="replace")
        if returncode != 0:
            raise build_failure(role, output, log_path)
        logger.info("built the %s image in %.1f s", role, time.monotonic() - started)

    @contextmanager
    def mounted_base_image(self, base_ref: str, platform: str) -> Iterator[Path]:
        """Pull the ``platform`` image of ``base_ref`` and mount it; yields its root file system
        (read it, nothing runs). Raises :class:`BaseImageError` when it cannot be pulled."""
        command = [
            self.buildah, "from", "--quiet", "--pull", "--platform", platform, self._tls,
            f"docker://{base_ref}",
        ]  # fmt: skip
        result = run_tool(command, self.push_timeout_s, f"buildah from {base_ref}")
        if result.returncode != 0:
            raise BaseImageError(
                f"Cannot pull the {platform} base image {base_ref}: "
                f"{condense_tool_error(result.stderr)}; check the base image and its registry."
            )
        container = result.stdout.strip().splitlines()[-1]
        try:
            mounted = run_tool([self.buildah, "mount", container], 120, "buildah mount")
            if mounted.returncode != 0:
                raise ImageBuildError(
                    f"Cannot mount the {platform} base image: "
                    f"{condense_tool_error(mounted.stderr)}; the oci builder needs root."
                )
            yield Path(mounted.stdout.strip())
        finally:
            run_tool([self.buildah, "rm", container], 120, "buildah rm")

    # -- pushing -----------------------------------------------------------------------
    def push(self, ref: str, digest_file: Path) -> str:
        """Push the local image ``ref`` to ``docker://ref``; return its digest (written to
        ``digest_file`` too) after checking that the registry serves it. Raises
        :class:`ImagePushError`."""
        command = [
            self.buildah, "push", self._tls, "--digestfile", str(digest_file), ref,
            f"docker://{ref}",
        ]  # fmt: skip
        result = run_tool(command, self.push_timeout_s, f"buildah push {ref}")
        pushed = _pushed_digest(ref, result, digest_file)
        info = self.inspect(ref)
        _check_registry_holds(ref, pushed, None if info is None else str(info["Digest"]))
        return pushed

    def push_manifest_list(
        self, ref: str, images: Mapping[str, str], digest_file: Path
    ) -> tuple[str, dict[str, str]]:
        """Push the local ``images`` (platform → local name) as one manifest list ``ref``, with
        every image (``buildah manifest push --all``).

        Returns ``(list digest, {platform: image digest})`` as the registry holds them, after
        checking that ``skopeo inspect --raw`` of ``ref`` has the pushed digest and exactly
        these platforms. Raises :class:`ImagePushError` (or :class:`ImageBuildError` when the
        list cannot be made locally).
        """
        exists = run_tool([self.buildah, "manifest", "exists", ref], 60, "buildah manifest exists")
        if exists.returncode == 0:  # left by an interrupted run
            run_tool([self.buildah, "manifest", "rm", ref], 120, "buildah manifest rm")
        steps = [[self.buildah, "manifest", "create", ref]] + [
            [self.buildah, "manifest", "add", ref, f"containers-storage:{image}"]
            for image in images.values()
        ]
        for command in steps:
            result = run_tool(command, 120, f"buildah manifest {command[2]}")
            if result.returncode != 0:
                raise ImageBuildError(
                    f"Cannot make the manifest list {ref}: {condense_tool_error(result.stderr)}; "
                    "retry the build."
                )
        command = [
            self.buildah, "manifest", "push", "--all", "--rm", self._tls,
            "--digestfile", str(digest_file), ref, f"docker://{ref}",
        ]  # fmt: skip
        result = run_tool(
            command, self.push_timeout_s * len(images), f"buildah manifest push {ref}"
        )
        pushed = _pushed_digest(ref, result, digest_file)
        raw = self.inspect_raw(ref)
        _check_registry_holds(ref, pushed, None if raw is None else manifest_digest(raw))
        assert raw is not None
        entries = manifest_entries(json.loads(raw))
        if sorted(entries) != sorted(images):
            raise ImagePushError(
                f"The manifest list {ref} holds {', '.join(sorted(entries)) or 'no platform'} "
                f"after pushing {', '.join(sorted(images))}; retry the build."
            )
        return pushed, entries


def _pushed_digest(ref: str, result: subprocess.CompletedProcess[str], digest_file: Path) -> str:
    """The digest a successful push wrote to ``digest_file``; :class:`ImagePushError` with the
    tool's reason if the push failed."""
    if result.returncode != 0:
        reason = condense_tool_error(result.stderr)
        raise ImagePushError(
            f"Cannot push {ref}: {reason}; check that the registry is up and accepts pushes.",
            details=[result.stderr[-4000:]],
        )
    return digest_file.read_text().strip()


def _check_registry_holds(ref: str, pushed: str, found: str | None) -> None:
    """:class:`ImagePushError` unless the registry's digest of ``ref`` (``found``; ``None``:
    missing) is the ``pushed`` one."""
    if found != pushed:
        raise ImagePushError(
            f"The registry holds {found or 'nothing'} as {ref} after pushing {pushed}; "
            "another client may have pushed the same tag, retry the build."
        )


# -- a failed build in a sentence ---------------------------------------------------------------
def build_failure(role: str, output: str, log_path: Path) -> BuilderError:
    """The error for a failed ``buildah build`` of ``role`` whose combined output is ``output``.

    A failed dependency install (``install.sh`` exit :data:`DEPENDENCY_INSTALL_EXIT`) becomes a
    :class:`~image_builder.errors.DependencyInstallError` carrying uv's condensed message;
    anything else an :class:`ImageBuildError` naming the failing step and its last output
    lines, and the log file.
    """
    attempts = uv_attempts(output)
    if attempts and re.search(rf"exit(?:ed with)? status {DEPENDENCY_INSTALL_EXIT}\b", output):
        return dependency_install_error(attempts)
    step, tail = failing_step(output)
    where = f" at step {step}" if step else ""
    return ImageBuildError(
        f"Building the {role} image failed{where}: {tail or 'buildah gave no output'}. "
        f"The full log is {log_path}.",
        details=output.splitlines()[-40:],
    )


def uv_attempts(output: str) -> list[tuple[str, str]]:
    """``[(mode, stderr)]`` of the failed uv attempts ``install.sh`` printed in ``output``."""
    attempts = []
    for match in re.finditer(
        r"^##flops-uv-attempt (\w+)\n(.*?)^##flops-uv-end$", output, re.MULTILINE | re.DOTALL
    ):
        attempts.append((match.group(1), match.group(2)))
    return attempts


def failing_step(output: str, lines: int = 4, limit: int = 400) -> tuple[str, str]:
    """``("3/12 (RUN sh ...)", "last; output; lines")`` of a failed buildah build's output.

    The step is the last ``STEP n/m:`` line (its instruction cut to 60 characters); the tail
    is up to ``lines`` non-empty lines printed after it, buildah's own error lines left out,
    joined with ``" / "`` and cut to ``limit`` characters.
    """
    all_lines = output.splitlines()
    start = 0
    step = ""
    for index, line in enumerate(all_lines):
        match = _STEP.match(line.strip())
        if match:
            instruction = " ".join(match.group(2).split())
            if len(instruction) > 60:
                instruction = instruction[:57] + "..."
            step = f"{match.group(1)} ({instruction})"
            start = index + 1
    body = [
        " ".join(line.split())
        for line in all_lines[start:]
        if line.strip() and not _BUILDAH_NOISE.match(line.strip())
    ]
    if not body:  # buildah's own error is all there is (e.g. a missing base image)
        body = [condense_tool_error(line) for line in all_lines[start:] if line.strip()]
    tail = " / ".join(body[-lines:]).rstrip(".")
    return step, tail if len(tail) <= limit else "..." + tail[-(limit - 3) :]


def condense_tool_error(stderr: str, limit: int = 300) -> str:
    """One clause from buildah/skopeo error output (logrus ``msg="..."`` unwrapped).

    Keeps the last error line, drops the ``Error parsing image name "...": `` prefix and a
    trailing period, cut to ``limit`` characters.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "no error message"
    line = lines[-1]
    match = _LOGRUS_MSG.search(line)
    if match:
        line = match.group(1).replace('\\"', '"')
    line = re.sub(r'^(Error: )?(Error parsing image name|initializing source) "[^"]*": ', "", line)
    line = re.sub(r"^Error: ", "", line).rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- references and manifests -------------------------------------------------------------------
def strip_tag(image: str) -> str:
    """``host:port/path`` of ``host:port/path:tag`` or ``host:port/path@sha256:...``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        last[-1] = last[-1].split(":", 1)[0]
    return "/".join(last)


def manifest_digest(raw: str) -> str:
    """``sha256:<hex>`` of a manifest as served (``skopeo inspect --raw`` output).

    skopeo prints the manifest's bytes followed by a newline the manifest itself lacks, which
    is dropped (a registry's JSON manifests do not end with one).
    """
    body = raw[:-1] if raw.endswith("\n") and not raw.endswith("}\n\n") else raw
    return "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()


def manifest_entries(manifest: Mapping[str, Any]) -> dict[str, str]:
    """``{os/arch: digest}`` of a manifest list or OCI index (``{}`` for an image manifest).

    Entries without a platform (e.g. attestations) are skipped; a variant (``v8``) is ignored.
    """
    if manifest.get("mediaType") not in _LIST_TYPES and "manifests" not in manifest:
        return {}
    entries: dict[str, str] = {}
    for entry in manifest.get("manifests") or []:
        platform = entry.get("platform") or {}
        if platform.get("os") and platform.get("architecture"):
            entries.setdefault(f"{platform['os']}/{platform['architecture']}", entry["digest"])
    return entries
