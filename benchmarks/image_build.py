"""OCI image builds of the example repository and of its trained model: how long they take and
how big the learner and the trained-model image are, side by side.

Prints, for ``examples/mnist_sklearn`` (a scikit-learn learner) built with the ``oci`` builder
against the test base image (Debian 12 minbase + python3, made with debootstrap; see
``tests/oci_testing.py``) and a loopback registry:

- cold build + push of the learner and aggregator images (empty buildah layer cache in a
  storage of its own; uv's download cache is the machine's, so no package is downloaded twice);
- the rebuild after a code-only change of the repository (``model_manager.py``);
- the no-op "build" when nothing changed (the registry already has the tag);
- the learner image's uncompressed size (sum of its layers, per layer too) next to the original
  FLOps' approach, whose miniconda-based base image alone is 611 MB (FLOps paper and repository,
  ``flops_learner`` base images), with the ratio (goal ≤ 1/3);
- in the same run, from the same base image, registry and layer cache: the trained-model image
  (:mod:`image_builder.model_image`) of a scikit-learn LogisticRegression trained on 600 rows of
  the bundled MNIST and registered on an MLflow server of the run's own, as the aggregator
  registers the project's model: its build + push time (the first build: its dependency layer
  is new), the reuse when nothing changed, and its uncompressed size (per layer too) next to
  the learner's.

With ``--platforms linux/amd64,linux/arm64`` the same for a multi-platform build (one manifest
list per role; the arm64 image is assembled from arm64 wheels without running arm64 code).

Usage: ``uv run python benchmarks/image_build.py [--platforms ...]``. Needs root, buildah,
skopeo, docker-registry and debootstrap (``scripts/bootstrap``); the first run also makes the
base image (1-2 minutes, cached under ``~/.cache/flops``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from oci_testing import (
    LocalRegistry,
    base_image_archive,
    layer_sizes,
    missing_requirements,
    push_archive,
    push_manifest_list,
)

from flops_manager.demo import EXAMPLE_REPO
from image_builder.cross_platform import host_platform
from image_builder.model_image import ModelImage, ModelImageBuilder
from image_builder.oci_builder import BuiltImages, OciBuilder
from observatory.mlflow_server import MlflowServer

MODEL_TRAIN_ROWS = 600
"""MNIST rows the benchmark's trained model is fitted on (the model's size hardly matters)."""

ORIGINAL_BASE_MB = 611.0
"""The original FLOps learner's miniconda-based base image alone, MB (uncompressed)."""


def pulled_layers(pinned_ref: str, arch: str) -> list[tuple[str, int]]:
    """``[(created_by, bytes)]`` of the ``arch`` image of ``pinned_ref`` (a manifest list or
    an image in the registry): pulled into the local storage, sizes uncompressed."""
    image_id = subprocess.run(
        ["buildah", "pull", "--quiet", "--arch", arch, "--tls-verify=false",
         f"docker://{pinned_ref}"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    inspected = subprocess.run(
        ["buildah", "inspect", "--type", "image", image_id],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if inspected.returncode != 0:
        raise SystemExit(f"buildah inspect {image_id}: {inspected.stderr}")
    history = json.loads(inspected.stdout)["OCIv1"].get("history", [])
    sizes = layer_sizes(image_id)
    steps = [h.get("created_by", "") for h in history if not h.get("empty_layer")]
    if len(steps) != len(sizes):
        steps = [f"layer {n}" for n in range(len(sizes))]
    return list(zip(steps, sizes, strict=True))


def empty_storage(root: Path) -> None:
    """Point buildah and skopeo (this process and its children) at a new, empty storage."""
    root.mkdir(parents=True)
    conf = root / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\n'
        f'runroot = "{root / "run"}"\n',
        encoding="utf-8",
    )
    os.environ["CONTAINERS_STORAGE_CONF"] = str(conf)


def timed_build(builder: OciBuilder, repo: Path, platforms: list[str], work: Path) -> BuiltImages:
    return builder.build(str(repo), None, work, flavor="sklearn", platforms=platforms or None)


def registered_model(tracking_url: str) -> str:
    """A scikit-learn LogisticRegression on :data:`MODEL_TRAIN_ROWS` bundled MNIST rows, logged
    and registered on ``tracking_url`` with the flavor's pip requirements (as the aggregator
    logs the project's model); its ``models:/<name>/1`` URI."""
    import mlflow
    import mlflow.sklearn
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from data_server.mnist import load_mnist_arrays

    images, labels = load_mnist_arrays()
    features = images[:MODEL_TRAIN_ROWS].reshape(-1, 784).astype("float64") / 255.0
    model = LogisticRegression(max_iter=200).fit(features, labels[:MODEL_TRAIN_ROWS])
    mlflow.set_tracking_uri(tracking_url)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=pd.DataFrame(features[:3]),
            pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
            registered_model_name="benchmark-mnist",
        )
    return f"models:/benchmark-mnist/{info.registered_model_version}"


def build_model_image(builder: OciBuilder, scratch: Path) -> tuple[ModelImage, float]:
    """The trained-model image of :func:`registered_model` built with ``builder`` (its
    registry, base image and layer cache), and the seconds the reuse (a second build of the
    same model) takes."""
    with MlflowServer(scratch / "mlflow") as tracking:
        uri = registered_model(tracking.url)
        model_builder = ModelImageBuilder(builder)
        built = model_builder.build(uri, tracking.url, scratch / "model-work")
        started = time.monotonic()
        again = model_builder.build(uri, tracking.url, scratch / "model-work")
        assert again.reused, "the second model image build was not a reuse"
        return built, time.monotonic() - started


def print_layers(title: str, layers: list[tuple[str, int]]) -> float:
    """Print ``title`` with the image's total and per-layer sizes; the total in MB."""
    total_mb = sum(size for _, size in layers) / 1e6
    print(f"  {title} {total_mb:.0f} MB uncompressed:")
    for step, size in layers:
        print(f"    {size / 1e6:8.1f} MB  {' '.join(step.split())[:80]}")
    return total_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platforms", default="", help="comma-separated, default: this machine")
    args = parser.parse_args()
    platforms = [p for p in args.platforms.split(",") if p]
    if problems := missing_requirements():
        raise SystemExit(f"needs {', '.join(problems)}; run scripts/bootstrap")
    scratch = Path(tempfile.mkdtemp(prefix="flops-image-bench-"))
    try:
        arches = [p.split("/", 1)[1] for p in platforms] or [host_platform().split("/", 1)[1]]
        archives = {arch: base_image_archive(arch=arch) for arch in arches}  # cached
        empty_storage(scratch / "containers")  # an empty layer cache for the cold build
        with LocalRegistry(scratch / "registry") as registry:
            refs = [push_archive(a, registry.address, arch=arch) for arch, a in archives.items()]
            base = refs[0]
            if len(refs) > 1:
                base = push_manifest_list(refs, f"{registry.address}/flops/base:multi")
            builder = OciBuilder(scratch / "cache", registry.address, base, tls_verify=False)
            repo = scratch / "repo"
            shutil.copytree(EXAMPLE_REPO, repo)

            cold = timed_build(builder, repo, platforms, scratch / "work")
            with (repo / "model_manager.py").open("a") as source:
                source.write("\n# a code-only change\n")
            code_only = timed_build(builder, repo, platforms, scratch / "work")
            started = time.monotonic()
            noop = timed_build(builder, repo, platforms, scratch / "work")
            noop_s = time.monotonic() - started
            assert noop.cache_hit and not code_only.cache_hit
            model, model_reuse_s = build_model_image(builder, scratch)

            what = ", ".join(platforms) or "this machine's platform"
            print(f"example repository (scikit-learn learner), {what}")
            print(f"  cold build + push (both images)      {cold.seconds:7.1f} s")
            print(f"  rebuild after a code-only change     {code_only.seconds:7.1f} s")
            print(f"  no-op (nothing changed)              {noop_s:7.2f} s")
            learner_mb: dict[str, float] = {}
            for image in (code_only.learner, code_only.aggregator):
                for arch in arches:
                    layers = pulled_layers(image.pinned_ref, arch)
                    total_mb = print_layers(f"{image.role} image ({arch})", layers)
                    if image.role == "learner":
                        learner_mb[arch] = total_mb
                        ratio = total_mb / ORIGINAL_BASE_MB
                        print(
                            f"  learner {total_mb:.0f} MB vs the original FLOps' base image "
                            f"alone {ORIGINAL_BASE_MB:.0f} MB: ratio {ratio:.2f} (goal <= 0.33)"
                        )
            host_arch = host_platform().split("/", 1)[1]
            print(f"trained-model image (scikit-learn MNIST model), {host_platform()}")
            print(f"  first build + push                   {model.image.seconds:7.1f} s")
            print(f"  with the download of the model       {model.seconds:7.1f} s")
            print(f"  reuse (nothing changed)              {model_reuse_s:7.2f} s")
            model_mb = print_layers(
                f"model image ({host_arch})", pulled_layers(model.image.pinned_ref, host_arch)
            )
            print("side by side")
            print(f"  {'image':<14}{'build + push':>14}{'uncompressed':>15}")
            learner_s = cold.seconds  # both roles: the learner's own share is not separated
            if host_arch in learner_mb:
                print(
                    f"  {'learner':<14}{learner_s:>12.1f} s{learner_mb[host_arch]:>12.0f} MB"
                    "   (cold, learner + aggregator)"
                )
            print(f"  {'trained model':<14}{model.image.seconds:>12.1f} s{model_mb:>12.0f} MB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
