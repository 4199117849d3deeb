"""Multi-platform images of the oci builder: one manifest list per role for linux/amd64 and
linux/arm64, the arm64 images assembled without running arm64 code (this machine has no
emulator), checked by reading their files.

Real buildah, skopeo, a registry v2 on loopback and a base manifest list of the local Debian 12
base and its arm64 twin (``oci_multiplatform_base``). The cold and the no-op build print their
times (``pytest -s``).
"""

import base64
import functools
import hashlib
import http.server
import importlib.metadata
import importlib.util
import json
import re
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from builder_testing import copy_example
from oci_testing import layer_sizes, mounted_image, run_in_image, skopeo_json

from image_builder.buildah import manifest_digest, manifest_entries
from image_builder.cross_platform import (
    PLATFORMS,
    add_passwd_user,
    elf_machine,
    foreign_elf_files,
    platform_install_error,
    read_base_facts,
    resolve_in_root,
)
from image_builder.errors import BaseImageError, DependencyInstallError, ImageBuildError
from image_builder.oci_builder import (
    IMAGE_UID,
    LABEL_INPUTS_HASH,
    UNUSED_DEPENDENCIES,
    BuiltImages,
    OciBuilder,
    render_containerfile,
    render_cross_containerfile,
)

pytestmark = pytest.mark.oci
BOTH = ["linux/amd64", "linux/arm64"]
EM_AARCH64 = 183
VENV = "opt/flops/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"
USER_VENV = "opt/flops/user-venv"
USER_SITE = f"{USER_VENV}/lib/python3.11/site-packages"

USER_IMPORTS = """
import importlib.metadata, json
import flops_utils.model_worker, model_manager, data_manager, pyarrow, datasets, mlflow
manager = model_manager.ModelManager()
print(json.dumps({
    "parameters": [list(p.shape) for p in manager.get_model_parameters()],
    "dists": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
}))
"""

LEARNER_IMPORTS = """
import importlib.metadata, json, os, subprocess
import flwr.client, learner.main, learner.flower_client
from flwr.client import start_client
user = subprocess.run(
    [os.environ["FLOPS_USER_PYTHON"], "-c", USER_IMPORTS],
    capture_output=True, text=True, check=True,
).stdout.strip().splitlines()[-1]
print(json.dumps({
    "arch": os.uname().machine,
    "uid": os.getuid(),
    "user": json.loads(user),
    "dists": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
}))
""".replace("USER_IMPORTS", repr(USER_IMPORTS))


def _raw(ref: str) -> str:
    """``skopeo inspect --raw`` of ``ref`` exactly as printed."""
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def _x86_only_wheel(directory: Path, name: str = "flops-x86-only-demo") -> Path:
    """A wheel of ``name`` 1.0 tagged for CPython 3.11 on x86_64 Linux only (what a package
    with a C extension and no arm64 build publishes), written to ``directory``."""
    module = name.replace("-", "_")
    tag = "cp311-cp311-manylinux_2_17_x86_64"
    info = f"{module}-1.0.dist-info"
    files = {
        f"{module}/__init__.py": "VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: flops-test\nRoot-Is-Purelib: false\n"
        f"Tag: {tag}\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text)}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{module}-1.0-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def builder(
    oci_registry: str, oci_multiplatform_base: str, tmp_path_factory: pytest.TempPathFactory
) -> OciBuilder:
    """A builder pushing to the session's registry, FROM the amd64 + arm64 base list."""
    return OciBuilder(
        tmp_path_factory.mktemp("oci-cache"), oci_registry, oci_multiplatform_base, tls_verify=False
    )


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_example(tmp_path_factory.mktemp("repos") / "mnist")


@pytest.fixture(scope="module")
def multi_build(
    builder: OciBuilder, example_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> BuiltImages:
    """The example's learner and aggregator for linux/amd64 and linux/arm64, built once."""
    images = builder.build(
        str(example_dir), None, tmp_path_factory.mktemp("work"), flavor="sklearn", platforms=BOTH
    )
    sizes = {
        f"{image.role} {arch}": layer_sizes(f"{image.ref}-{arch}")
        for image in images.images
        for arch in ("amd64", "arm64")
    }
    print(
        f"\nmulti-platform build of the example: {images.seconds:.1f} s (learner "
        f"{images.learner.seconds:.1f} s, aggregator {images.aggregator.seconds:.1f} s); "
        "uncompressed MB per layer: "
        + "; ".join(
            f"{name} {sum(layers) / 1e6:.0f} = {'+'.join(f'{s / 1e6:.0f}' for s in layers)}"
            for name, layers in sizes.items()
        )
    )
    return images


# -- real builds -----------------------------------------------------------------------------
def test_each_role_is_one_manifest_list_with_amd64_and_arm64(multi_build: BuiltImages) -> None:
    for image in multi_build.images:
        # Execute
        raw = _raw(image.ref)
        entries = manifest_entries(json.loads(raw))
        configs = {
            platform: skopeo_json(
                "inspect", "--config", "--tls-verify=false",
                f"docker://{image.repository}@{digest}",
            )
            for platform, digest in entries.items()
        }  # fmt: skip

        # Assert
        assert multi_build.platforms == tuple(BOTH)
        assert image.is_manifest_list and manifest_digest(raw) == image.digest
        assert entries == dict(image.platform_digests) and sorted(entries) == BOTH
        for platform, config in configs.items():
            settings = config["config"]
            assert isinstance(settings, dict)
            assert config["architecture"] == PLATFORMS[platform].arch and config["os"] == "linux"
            assert settings["Labels"][LABEL_INPUTS_HASH] == multi_build.key
            assert settings["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
            assert settings["Entrypoint"] == ["/opt/flops/venv/bin/python", "-m", image.role]
            assert "FLOPS_ML_REPO_DIR=/opt/flops/repo" in settings["Env"]
            assert "FLOPS_USER_PYTHON=/opt/flops/user-venv/bin/python" in settings["Env"]


def test_arm64_images_hold_aarch64_binaries_and_a_working_layout(
    multi_build: BuiltImages,
) -> None:
    # Execute: read the arm64 learner's files (nothing can run here)
    with mounted_image(multi_build.learner.pinned_ref, "arm64") as root:
        interpreter = resolve_in_root(root, f"/{VENV}/bin/python")
        assert interpreter is not None
        user_interpreter = resolve_in_root(root, f"/{USER_VENV}/bin/python")
        site, user_site = root / SITE, root / USER_SITE
        extensions = {
            "python": root / interpreter.lstrip("/"),
            "numpy": next(site.glob("numpy/_core/_multiarray_umath.cpython-311-*.so")),
            "grpc": next(site.glob("grpc/_cython/cygrpc.cpython-311-*.so")),
            "user numpy": next(user_site.glob("numpy/_core/_multiarray_umath.cpython-311-*.so")),
            "pyarrow": next(user_site.glob("pyarrow/lib.cpython-311-*.so")),
            "libarrow": next(user_site.glob("pyarrow/libarrow.so.*")),
            "sklearn": next(user_site.glob("sklearn/utils/_cython_blas.cpython-311-*.so")),
        }
        machines = {name: elf_machine(path) for name, path in extensions.items()}
        foreign = foreign_elf_files(root / VENV, EM_AARCH64)
        foreign += foreign_elf_files(root / USER_VENV, EM_AARCH64)
        pyvenv = (root / VENV / "pyvenv.cfg").read_text()
        user_pyvenv = (root / USER_VENV / "pyvenv.cfg").read_text()
        in_runtime = sorted(
            name for name in ("sklearn", "pyarrow", "datasets", "mlflow") if (site / name).exists()
        )
        user_names = {path.name.lower() for path in user_site.glob("*.dist-info")}
        passwd = (root / "etc/passwd").read_text()
        home, repo = (root / "home/flops").stat(), (root / "opt/flops/repo").stat()
        source_hash = importlib.util.source_hash((site / "numpy/__init__.py").read_bytes())
        with (site / "numpy/__pycache__/__init__.cpython-311.pyc").open("rb") as pyc:
            _, flags, pyc_hash = struct.unpack("<4sI8s", pyc.read(16))
        flwr_script = (root / VENV / "bin/flwr").read_text().splitlines()[0]
        names = {path.name.lower() for path in site.glob("*.dist-info")}
        suites = [
            path.relative_to(root)
            for packages in (site, user_site)
            for package in ("numpy", "scipy", "pandas", "sklearn", "pyarrow")
            for path in (packages / package).rglob("tests")
            if path.is_dir()
        ]
        glibc_minors = re.findall(
            rb"GLIBC_2\.(\d+)", (root / "usr/lib/aarch64-linux-gnu/libc.so.6").read_bytes()
        )

    # Assert
    assert interpreter == user_interpreter == "/usr/bin/python3.11"
    assert machines == dict.fromkeys(extensions, EM_AARCH64)
    assert in_runtime == []  # the repository's packages are in its own environment only
    assert "home = /usr/bin" in user_pyvenv
    assert any(name.startswith("scikit_learn-") for name in user_names)
    assert any(name.startswith("mlflow") for name in user_names)
    assert foreign == []  # every ELF file of the environment is an aarch64 one
    assert "home = /usr/bin" in pyvenv and "include-system-site-packages = false" in pyvenv
    assert f"flops:x:{IMAGE_UID}:{IMAGE_UID}::/home/flops:/usr/sbin/nologin" in passwd
    assert (home.st_uid, home.st_gid, repo.st_uid) == (IMAGE_UID, IMAGE_UID, IMAGE_UID)
    # bytecode is kept and valid: hash-checked (a COPY rounds file times), matching its source
    assert flags == 0b11 and pyc_hash == source_hash
    assert flwr_script == "#!/opt/flops/venv/bin/python"
    assert not [
        name for name in names if name.split("-")[0].replace("_", "-") in UNUSED_DEPENDENCIES
    ]
    assert suites == []
    assert max(int(m) for m in glibc_minors) == 36  # Debian 12: wheels up to manylinux_2_36


def test_arm64_aggregator_shares_the_dependency_layer_and_adds_mlflow(
    multi_build: BuiltImages,
) -> None:
    # Execute
    layers = {
        image.role: skopeo_json(
            "inspect", "--tls-verify=false",
            f"docker://{image.repository}@{image.platform_digests['linux/arm64']}",
        )["Layers"]
        for image in multi_build.images
    }  # fmt: skip
    with mounted_image(multi_build.aggregator.pinned_ref, "arm64") as root:
        site = root / SITE
        mlflow = sorted(path.name for path in site.glob("mlflow*.dist-info"))
        uvicorn = sorted(path.name for path in site.glob("uvicorn-*.dist-info"))
        foreign = foreign_elf_files(root / VENV, EM_AARCH64)

    # Assert: base, passwd, home, FLOps' runtime and the repository's environment are the same
    # blobs; the extras add the MLflow tracking client
    learner, aggregator = layers["learner"], layers["aggregator"]
    assert isinstance(learner, list) and isinstance(aggregator, list)
    assert learner[:5] == aggregator[:5] and learner[5:] != aggregator[5:]
    assert mlflow == [f"mlflow_skinny-{importlib.metadata.version('mlflow-skinny')}.dist-info"]
    assert uvicorn  # MLflow needs it: not left out for the aggregator
    assert foreign == []


def test_amd64_entry_runs_the_learner_imports(multi_build: BuiltImages) -> None:
    # Execute: the list's amd64 image (this machine's) in a chroot
    seen = run_in_image(multi_build.learner.pinned_ref, LEARNER_IMPORTS)

    # Assert
    assert seen["arch"] == "x86_64" and seen["uid"] == IMAGE_UID
    dists, user = seen["dists"], seen["user"]
    assert isinstance(dists, list) and "flwr" in dists and "scikit-learn" not in dists
    assert not set(UNUSED_DEPENDENCIES) & set(dists)
    assert isinstance(user, dict) and user["parameters"] == [[10, 784], [10]]
    assert "scikit-learn" in user["dists"] and "flwr" not in user["dists"]


def test_same_platforms_again_reuse_the_lists(
    builder: OciBuilder, multi_build: BuiltImages, example_dir: Path, tmp_path: Path
) -> None:
    # Execute: the same set in another order
    again = builder.build(
        str(example_dir), None, tmp_path / "work", flavor="sklearn", platforms=BOTH[::-1]
    )
    print(f"\nno-op multi-platform build: {again.seconds:.2f} s")

    # Assert
    assert again.cache_hit and again.key == multi_build.key
    assert [i.digest for i in again.images] == [i.digest for i in multi_build.images]
    assert [dict(i.platform_digests) for i in again.images] == [
        dict(i.platform_digests) for i in multi_build.images
    ]
    assert again.seconds < 2.0


def test_dependency_without_arm64_wheel_fails_naming_it(
    builder: OciBuilder, tmp_path: Path
) -> None:
    # Prepare: a requirement only published as an x86_64 wheel (on a find-links page served
    # over HTTP: a local directory is the manager's disk, which repositories may not name)
    wheels = tmp_path / "wheels"
    _x86_only_wheel(wheels)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(wheels))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"http://127.0.0.1:{server.server_address[1]}/"
    path = copy_example(tmp_path / "x86-only")
    (path / "conda.yaml").unlink()
    (path / "requirements.txt").write_text(
        f"scikit-learn>=1.5\n--find-links {index}\nflops-x86-only-demo==1.0\n"
    )

    # Execute
    try:
        with pytest.raises(DependencyInstallError) as caught:
            builder.build(str(path), None, tmp_path / "work", flavor="sklearn", platforms=BOTH)
    finally:
        server.shutdown()
        server.server_close()

    # Assert
    message = caught.value.message
    assert message.startswith(
        "flops-x86-only-demo has no wheel for linux/arm64 (Python 3.11) (its wheels are for "
        "manylinux_2_17_x86_64); "
    )
    assert "remove linux/arm64 from supported_platforms" in message
    assert "\n" not in message and len(message) < 600
    assert not any((tmp_path / "work").iterdir())


def test_base_image_without_arm64_is_refused(
    oci_registry: str, oci_base_image: str, example_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the plain amd64 base
    builder = OciBuilder(tmp_path / "cache", oci_registry, oci_base_image, tls_verify=False)

    # Execute
    with pytest.raises(BaseImageError) as caught:
        builder.build(str(example_dir), None, tmp_path / "work", platforms=BOTH)

    # Assert
    assert "has no linux/arm64 image (it has linux/amd64)" in caught.value.message


# -- no build needed -------------------------------------------------------------------------
def _fake_rootfs(
    root: Path, machine: int, libc: bytes | None = b"GLIBC_2.17\0GLIBC_2.36\0"
) -> Path:
    """A merged-/usr root file system with a Python 3.11 whose ELF header says ``machine``."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    header = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", machine) + bytes(40)
    (root / "usr/bin/python3.11").write_bytes(header)
    (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "usr/lib/python3.11").mkdir(parents=True)
    (root / "usr/lib/python3.11/os.py").write_text("")
    (root / "usr/lib/aarch64-linux-gnu").mkdir(parents=True)
    if libc is not None:
        (root / "usr/lib/aarch64-linux-gnu/libc.so.6").write_bytes(b"\x7fELF" + libc)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return root


def test_base_facts_are_read_from_files(tmp_path: Path) -> None:
    # Prepare
    root = _fake_rootfs(tmp_path / "root", EM_AARCH64)
    arm64 = PLATFORMS["linux/arm64"]

    # Execute
    facts = read_base_facts(root, "python3", arm64)

    # Assert
    assert (facts.python, facts.version, facts.glibc) == ("/usr/bin/python3.11", "3.11", (2, 36))
    assert facts.uv_platform(arm64) == "aarch64-manylinux_2_36"
    assert facts.passwd.startswith("root:x:0:0")
    assert resolve_in_root(root, "/bin/python3") == "/usr/bin/python3.11"
    assert resolve_in_root(root, "/bin/python2") is None


@pytest.mark.parametrize(
    ("machine", "libc", "expected"),
    [
        (62, b"GLIBC_2.36", "is x86_64, not aarch64"),
        (EM_AARCH64, None, "has no glibc (libc.so.6)"),
    ],
)
def test_unfit_base_images_are_refused(
    tmp_path: Path, machine: int, libc: bytes | None, expected: str
) -> None:
    # Prepare
    root = _fake_rootfs(tmp_path / "root", machine, libc)

    # Execute
    with pytest.raises(BaseImageError) as caught:
        read_base_facts(root, "python3", PLATFORMS["linux/arm64"])

    # Assert
    assert expected in caught.value.message


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the wheel tags name Python 3.11")
def test_uv_no_wheel_messages_are_condensed() -> None:
    # Prepare: uv's stderr for a wheel of another platform and for a source-only package
    other_platform = (
        "error: No solution found when resolving dependencies\n  cause: Because foo==1.0 has "
        "no wheels with a matching platform tag (e.g., `manylinux_2_36_aarch64`) and you "
        "require foo==1.0, we can conclude that your requirements are unsatisfiable.\n\n"
        "hint: Wheels are available for `foo` (v1.0) on the following platforms: "
        "`manylinux_2_17_x86_64`, `win_amd64`\n"
    )
    source_only = (
        "  \u00d7 No solution found when resolving dependencies:\n"
        "  \u2570\u2500\u25b6 Because all versions of "
        "bar have no usable wheels and you require bar, we can conclude that your "
        "requirements are unsatisfiable.\n"
    )
    unrelated = "error: Failed to parse: `numpy>>2`\n"

    # Execute
    first = platform_install_error("linux/arm64", "3.11", [("offline", other_platform)])
    second = platform_install_error("linux/arm64", "3.11", [("online", source_only)])
    third = platform_install_error("linux/arm64", "3.11", [("online", unrelated)])

    # Assert
    assert first.message.startswith(
        "foo has no wheel for linux/arm64 (Python 3.11) (its wheels are for "
        "manylinux_2_17_x86_64, win_amd64); "
    )
    assert second.message.startswith(
        "bar has no wheel for linux/arm64 (Python 3.11) (it publishes a source distribution only); "
    )
    assert third.message.startswith("Cannot install the ML repository's dependencies: ")
    assert all(error.code == "dependency_install_failed" for error in (first, second, third))


def test_unknown_platform_is_refused_before_any_work(tmp_path: Path) -> None:
    # Prepare: nothing listens at this registry, nothing is installed
    builder = OciBuilder(tmp_path / "cache", "127.0.0.1:9", "127.0.0.1:9/flops/base:x")

    # Execute
    with pytest.raises(ImageBuildError) as caught:
        builder.build(
            str(tmp_path), None, tmp_path / "work", platforms=["linux/amd64", "linux/s390x"]
        )

    # Assert
    assert caught.value.message == (
        "Building linux/s390x images is not supported; FLOps builds linux/amd64 and "
        "linux/arm64 images, fix supported_platforms."
    )
    assert OciBuilder.platforms(None, ["linux/arm64", "linux/amd64", "linux/arm64"]) == tuple(BOTH)
    with pytest.raises(ImageBuildError):
        OciBuilder.platforms(None, [])
    with pytest.raises(ValueError):
        OciBuilder.platforms("linux/amd64", BOTH)


def test_cross_containerfile_copies_only_and_ends_like_the_native_one() -> None:
    # Execute
    labels = {"org.opencontainers.image.source": "https://h/r"}
    cross = render_cross_containerfile(
        "aggregator", "reg:5000/flops/base@sha256:arm", "cross-arm64", labels
    )
    native = render_containerfile("aggregator", "reg:5000/flops/base@sha256:amd", "python3", labels)
    instructions = [line.split()[0] for line in cross.splitlines() if line[:1].isupper()]

    # Assert
    assert "RUN" not in instructions and set(instructions) >= {"FROM", "COPY", "ENTRYPOINT"}
    assert "COPY cross-arm64/deps/ /opt/flops/venv/" in cross
    assert "COPY cross-arm64/user/ /opt/flops/user-venv/" in cross
    assert "COPY cross-arm64/aggregator-extras/ /opt/flops/venv/" in cross
    tail = native[native.index("COPY aggregator-runtime/") :]
    assert cross.endswith(tail)
    assert "$" not in cross


def test_manifest_entries_and_passwd_helpers() -> None:
    # Prepare
    index = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": "sha256:a", "platform": {"os": "linux", "architecture": "amd64"}},
            {
                "digest": "sha256:b",
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {"digest": "sha256:c", "annotations": {"vnd.docker.reference.type": "attestation"}},
        ],
    }

    # Execute
    entries = manifest_entries(index)
    passwd = add_passwd_user("root:x:0:0:root:/root:/bin/bash", "flops", IMAGE_UID, "/home/flops")

    # Assert
    assert entries == {"linux/amd64": "sha256:a", "linux/arm64": "sha256:b"}
    assert manifest_entries({"mediaType": "application/vnd.oci.image.manifest.v1+json"}) == {}
    assert passwd.splitlines()[-1] == "flops:x:10001:10001::/home/flops:/usr/sbin/nologin"
    with pytest.raises(BaseImageError):
        add_passwd_user(passwd, "flops", IMAGE_UID, "/home/flops")
