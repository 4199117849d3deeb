"""Translating dependency files to pip requirements (conda.yaml, requirements.txt, pyproject)."""

from pathlib import Path

import pytest
from builder_testing import EXAMPLE

from image_builder.dependencies import (
    conda_spec_to_requirement,
    conda_to_requirements,
    dependency_hash,
    find_dependency_file,
    read_requirements,
    requirement_name,
    resolve_local_paths,
)
from image_builder.errors import DependencyFileError

# A `conda env export` of an MLflow sklearn model environment (build strings, channel prefix,
# system libraries, a pip section with an mlflow pin), as conda 24 writes it on linux-64.
CONDA_EXPORT = """\
name: mnist-sklearn
channels:
  - conda-forge
  - defaults
dependencies:
  - _libgcc_mutex=0.1=conda_forge
  - _openmp_mutex=4.5=2_gnu
  - bzip2=1.0.8=hd590300_5
  - ca-certificates=2024.2.2=hbcca054_0
  - joblib=1.4.2=pyhd8ed1ab_0
  - ld_impl_linux-64=2.40=h41732ed_0
  - libblas=3.9.0=22_linux64_openblas
  - libexpat=2.6.2=h59595ed_0
  - libffi=3.4.2=h7f98852_5
  - libgcc-ng=13.2.0=h77fa898_7
  - libgfortran-ng=13.2.0=h69a702a_7
  - libnsl=2.0.1=hd590300_0
  - libopenblas=0.3.27=pthreads_h413a1c8_0
  - libsqlite=3.45.3=h2797004_0
  - libstdcxx-ng=13.2.0=hc0a3c3a_7
  - libuuid=2.38.1=h0b41bf4_0
  - libxcrypt=4.4.36=hd590300_1
  - libzlib=1.2.13=h4ab18f5_6
  - ncurses=6.5=h59595ed_0
  - conda-forge::numpy=1.26.4=py311h64a7726_0
  - openssl=3.3.0=h4ab18f5_3
  - pip=24.0=pyhd8ed1ab_0
  - python=3.11.9=hb806964_0_cpython
  - python_abi=3.11=4_cp311
  - readline=8.2=h8228510_1
  - scikit-learn=1.4.2=py311he08f58d_0
  - scipy=1.13.1=py311h517d4fd_0
  - setuptools=70.0.0=pyhd8ed1ab_0
  - threadpoolctl=3.5.0=pyhc1e730c_0
  - tk=8.6.13=noxft_h4845f30_101
  - tzdata=2024a=h0c530f3_0
  - wheel=0.43.0=pyhd8ed1ab_1
  - xz=5.2.6=h166bdaf_0
  - pytorch=2.3.0=py3.11_cpu_0
  - pip:
      - cloudpickle==3.0.0
      - mlflow==2.13.1
      - flwr[simulation]>=1.8
prefix: /home/user/miniconda3/envs/mnist-sklearn
"""


def test_example_conda_yaml_translates_to_pip_lines() -> None:
    # Execute
    requirements = read_requirements(EXAMPLE / "conda.yaml")

    # Assert: python and pip dropped, mlflow left to FLOps
    assert requirements == ["numpy>=2", "scikit-learn>=1.5"]


def test_conda_env_export_keeps_python_packages_only() -> None:
    # Execute
    requirements = conda_to_requirements(CONDA_EXPORT)

    # Assert
    assert requirements == [
        "joblib==1.4.2",
        "numpy==1.26.4",
        "scikit-learn==1.4.2",
        "scipy==1.13.1",
        "threadpoolctl==3.5.0",
        "torch==2.3.0",
        "cloudpickle==3.0.0",
        "mlflow==2.13.1",
        "flwr[simulation]>=1.8",
    ]


def test_read_requirements_drops_mlflow_from_conda_export(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "conda.yml"
    path.write_text(CONDA_EXPORT, encoding="utf-8")

    # Execute
    requirements = read_requirements(path)

    # Assert
    assert "mlflow==2.13.1" not in requirements
    assert requirements[-2:] == ["cloudpickle==3.0.0", "flwr[simulation]>=1.8"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("numpy", "numpy"),
        ("numpy=1.26.4", "numpy==1.26.4"),
        ("numpy=1.26.4=py311h64a7726_0", "numpy==1.26.4"),
        ("conda-forge::pandas>=2.1", "pandas>=2.1"),
        ("defaults::pandas", "pandas"),
        ("scikit-learn>=1.3,<2", "scikit-learn>=1.3,<2"),
        ("scipy 1.13.1 py311h517d4fd_0", "scipy==1.13.1"),
        ("scipy >=1.10", "scipy>=1.10"),
        ("torchvision=0.18.*", "torchvision==0.18.*"),
        ("matplotlib-base=3.8*", "matplotlib==3.8.*"),
        ("py-xgboost=2.0.3", "xgboost==2.0.3"),
        ("python=3.11", None),
        ("python>=3.10", None),
        ("pip", None),
        ("__glibc>=2.17", None),
        ("openssl=3.3.0=h4ab18f5_3", None),
        ("jpeg=9e=h166bdaf_2", None),
        ("libjpeg-custom=9e", None),
    ],
)
def test_conda_spec_translation(spec: str, expected: str | None) -> None:
    # Execute
    translated = conda_spec_to_requirement(spec)

    # Assert
    assert translated == expected


@pytest.mark.parametrize("spec", ["numpy[version='>=1.20']", "numpy 1.2|1.3"])
def test_conda_syntax_pip_cannot_express_is_a_clean_error(spec: str) -> None:
    # Execute
    with pytest.raises(DependencyFileError) as caught:
        conda_spec_to_requirement(spec)

    # Assert
    assert caught.value.code == "dependency_file_invalid"
    assert spec in caught.value.message


def test_invalid_conda_yaml_is_a_clean_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "conda.yaml"
    path.write_text("dependencies: [numpy\n  - : :\n", encoding="utf-8")

    # Execute
    with pytest.raises(DependencyFileError) as caught:
        read_requirements(path)

    # Assert
    assert caught.value.message.startswith("conda.yaml is not valid YAML")
    assert "\n" not in caught.value.message


def test_requirements_txt_is_read_as_is(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "requirements.txt"
    path.write_text(
        "# training\n-r base.txt\nscikit-learn>=1.5  # model\n\nMLflow==2.9.0\n"
        "pandas>=2 ; python_version >= '3.10'\ntorch @ https://example.org/torch.whl#sha=1\n"
        "scipy>=1.10,\\\n<2\n",
        encoding="utf-8",
    )

    # Execute
    requirements = read_requirements(path)

    # Assert: comments, blank lines and mlflow gone; paths as written (hash independent of clone)
    assert requirements == [
        "-r base.txt",
        "scikit-learn>=1.5",
        "pandas>=2 ; python_version >= '3.10'",
        "torch @ https://example.org/torch.whl#sha=1",
        "scipy>=1.10,<2",
    ]


def test_resolve_local_paths_for_install(tmp_path: Path) -> None:
    # Prepare
    lines = ["-r base.txt", "--constraint=c.txt", "-e .", "./libs/helper", "-r /abs/x.txt", "numpy"]

    # Execute
    resolved = resolve_local_paths(lines, tmp_path)

    # Assert: editable paths are installed as regular packages from the temporary copy
    assert resolved == [
        f"-r {tmp_path / 'base.txt'}",
        f"--constraint {tmp_path / 'c.txt'}",
        str(tmp_path / "."),
        str(tmp_path / "libs/helper"),
        "-r /abs/x.txt",
        "numpy",
    ]


def test_pyproject_dependencies(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[project]\nname = "m"\nversion = "1"\ndependencies = ["scikit-learn>=1.5", "mlflow"]\n',
        encoding="utf-8",
    )

    # Execute
    requirements = read_requirements(path)

    # Assert
    assert requirements == ["scikit-learn>=1.5"]
    assert find_dependency_file(tmp_path) == path


def test_dependency_hash_normalizes_order_case_and_spacing() -> None:
    # Prepare
    base = ["numpy>=2", "scikit-learn>=1.5"]

    # Execute
    same = dependency_hash(["Scikit_Learn >= 1.5", "  numpy>=2", "numpy>=2"])
    other = dependency_hash(["numpy>=2", "scikit-learn>=1.6"])

    # Assert
    assert dependency_hash(base) == same != other
    assert len(same) == 64


def test_requirement_name() -> None:
    # Assert
    assert requirement_name("Paho_MQTT[x]>=2") == "paho-mqtt"
    assert requirement_name("-r other.txt") is None
    assert requirement_name("./local/pkg") is None
