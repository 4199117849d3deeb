"""The repositories' own environments: what they cost to build and what they cost in training.

For each repository of the corpus (``tests/corpus``: an MLflow-2024 scikit-learn repository, a
PyTorch CNN and a Keras model on TensorFlow 2.12, each with the exact pins of its author) and
the example, side by side in one run:

- cold environment build (empty environment cache; uv's download cache is the machine's) and
  warm reuse (the next project of the same commit; goal <= 1 s);
- the environment's size on disk (apparent size of its files, each hard-linked file once);
- the learner image's size (``--images``: built with the ``oci`` builder against the test base
  image and a loopback registry, as ``benchmarks/image_build.py`` does);
- the training phase of a FLOps project (2 learners on disjoint MNIST shards; learners,
  aggregator and model workers start, rounds run, MQTT and MLflow logging) next to the same
  training as a plain Flower script (``plain_flower.py``) run in the environment a plain-Flower
  user of that repository would have: its pins plus ``flwr`` as the resolver allows (e.g.
  flwr 1.13 next to ``pyyaml==6.0.1``; for some pins no Flower release installs at all, and the
  row says so); goal: ratio <= 1.10.

Usage: ``uv run python benchmarks/environments.py [--rounds 5] [--repeats 2] [--images]
[--repos sklearn_mlflow2024,pytorch_mnist,keras_tf212,example]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from overhead import flops_run, plain_run

from data_server.mnist import mnist_table
from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import EXAMPLE_REPO, local_nodes
from flops_manager.suite import ManagerSuite
from image_builder.python_env import find_links, uv_command
from image_builder.venv_builder import BuiltEnvironment, VenvBuilder

ROOT = Path(__file__).resolve().parents[1]
REPOS = {
    "sklearn_mlflow2024": ROOT / "tests" / "corpus" / "sklearn_mlflow2024",
    "pytorch_mnist": ROOT / "tests" / "corpus" / "pytorch_mnist",
    "keras_tf212": ROOT / "tests" / "corpus" / "keras_tf212",
    "example": EXAMPLE_REPO,
}
TAG = "mnist-bench"
SHARD_ROWS = 3000


def apparent_size_mb(path: Path) -> float:
    """MB of the files under ``path``, each inode once (uv hard-links from its cache)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total / 1e6


def plain_flower_env(env: BuiltEnvironment, scratch: Path) -> str | None:
    """A virtualenv with the environment's requirements plus ``flwr``, bytecode compiled (as
    the FLOps side's is by its warm-up project); returns its python, or
    ``None`` when no Flower release installs next to the repository's pins (printed)."""
    metadata = json.loads((env.env_dir / "flops-env.json").read_text())
    lines = [
        *metadata["requirements"],
        *metadata["support_requirements"],
        *metadata["corrections"],
        "flwr",
    ]
    venv = scratch / "plain-venv"
    uv = uv_command()
    subprocess.run([*uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    (scratch / "plain-requirements.txt").write_text("\n".join(lines) + "\n")
    links = [arg for link in find_links() for arg in ("--find-links", link)]
    installed = subprocess.run(
        [*uv, "pip", "install", "-q", "--compile-bytecode", "--python",
         str(venv / "bin" / "python"), "-r", str(scratch / "plain-requirements.txt"), *links],
        cwd=env.repo_dir, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if installed.returncode != 0:
        reason = [line.strip() for line in installed.stderr.splitlines() if line.strip()][-1]
        print(f"no plain Flower baseline for {env.repo_dir.name}: {reason}", flush=True)
        return None
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "_flops_utils.pth").write_text(str(ROOT / "utils_pkg") + "\n")
    return str(venv / "bin" / "python")


def learner_image_mb(repo: Path, scratch: Path) -> float:
    """The learner image's uncompressed size (MB) from the ``oci`` builder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from image_build import pulled_layers
    from oci_testing import LocalRegistry, base_image_archive, push_archive

    from image_builder.oci_builder import OciBuilder

    with LocalRegistry(scratch / "registry") as registry:
        base = push_archive(base_image_archive(), registry.address)
        builder = OciBuilder(scratch / "oci", registry.address, base, tls_verify=False)
        images = builder.build(str(repo), None, scratch / "oci-work")
        layers = pulled_layers(images.learner.pinned_ref, "amd64")
        return sum(size for _, size in layers) / 1e6


def sla_for(repo: Path, rounds: int) -> dict[str, Any]:
    sla: dict[str, Any] = json.loads((repo / "sla.json").read_text())
    sla["ml_repo_url"] = str(repo)
    sla["training_configuration"].update(
        data_tags=[TAG],
        training_rounds=rounds,
        min_available_clients=2,
        min_fit_clients=2,
        min_evaluate_clients=2,
    )
    return sla


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", action="store_true", help="also build the learner images")
    parser.add_argument("--repos", default=",".join(REPOS))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flops-env-bench-") as tmp:
        scratch = Path(tmp)
        home = scratch / "home"
        with ManagerSuite(ManagerConfig(home=home, port=0)) as suite:
            token = read_api_token(home)
            client = ManagerClient(suite.url, token=token)
            with local_nodes(2, scratch / "nodes", suite.url, token) as nodes:
                table = mnist_table()
                for index, node in enumerate(nodes):
                    with node.client() as data:
                        data.put_table(TAG, table.slice(index * SHARD_ROWS, SHARD_ROWS))
                client.wait_for_nodes(2, timeout_s=60, tag=TAG)
                for name in args.repos.split(","):
                    repo = REPOS[name]
                    work = scratch / name
                    builder = VenvBuilder(work / "envs")
                    started = time.monotonic()
                    cold = builder.build(str(repo), None, work / "w1")
                    cold_s = time.monotonic() - started
                    started = time.monotonic()
                    warm = builder.build(str(repo), None, work / "w2")
                    warm_s = time.monotonic() - started
                    assert warm.cache_hit and not cold.cache_hit
                    size_mb = apparent_size_mb(cold.env_dir / "venv")
                    plain_python = plain_flower_env(cold, work)
                    sla = sla_for(repo, args.rounds)
                    flops_run(client, sla)  # the manager's own environment cache: warm it
                    flops_s, plain_s = [], []
                    for _ in range(args.repeats):
                        flops_s.append(flops_run(client, sla)[1])
                        if plain_python is not None:
                            plain_s.append(plain_run(plain_python, nodes, args.rounds, repo, TAG))
                    image_mb = learner_image_mb(repo, work) if args.images else None
                    rows.append(
                        {
                            "repo": name,
                            "cold_s": cold_s,
                            "warm_s": warm_s,
                            "size_mb": size_mb,
                            "image_mb": image_mb,
                            "flops_s": statistics.median(flops_s),
                            "plain_s": statistics.median(plain_s) if plain_s else None,
                            "versions": cold.versions,
                        }
                    )
                    shutil.rmtree(work / "envs", ignore_errors=True)
    print(f"{args.rounds} rounds, 2 learners x {SHARD_ROWS} MNIST rows, {args.repeats} repeats")
    header = f"{'repository':20}{'cold s':>8}{'warm s':>8}{'env MB':>8}{'image MB':>10}"
    print(header + f"{'FLOps s':>9}{'Flower s':>10}{'ratio':>7}")
    for row in rows:
        image = f"{row['image_mb']:.0f}" if row["image_mb"] is not None else "-"
        plain, ratio = "-", "-"
        if row["plain_s"] is not None:
            plain = f"{row['plain_s']:.2f}"
            ratio = f"{row['flops_s'] / row['plain_s']:.2f}"
        print(
            f"{row['repo']:20}{row['cold_s']:>8.1f}{row['warm_s']:>8.2f}{row['size_mb']:>8.0f}"
            f"{image:>10}{row['flops_s']:>9.2f}{plain:>10}{ratio:>7}"
        )
    for row in rows:
        pins = ", ".join(f"{k} {v}" for k, v in sorted(row["versions"].items()))
        print(f"  {row['repo']}: {pins}")


if __name__ == "__main__":
    sys.exit(main())
