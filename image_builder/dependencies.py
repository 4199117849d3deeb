"""Turn an ML repository's dependency file into pip requirement lines.

Supported files, first present wins (:data:`DEPENDENCY_FILES`): ``conda.yaml`` / ``conda.yml``
(a conda environment file, e.g. ``conda env export`` or the one MLflow writes), ``requirements.txt``
and ``pyproject.toml`` (its ``[project].dependencies``).

conda translation (:func:`conda_to_requirements`):

- the ``pip:`` section is taken verbatim;
- plain ``dependencies`` are translated: channel prefixes are dropped (``conda-forge::numpy``),
  ``pkg=1.2`` and ``pkg=1.2=build`` become ``pkg==1.2`` (conda's fuzzy ``=1.2`` is narrowed to
  pip's exact ``==1.2``), ``pkg 1.2 build`` likewise, ``pkg=1.2.*`` becomes ``pkg==1.2.*``,
  specifiers pip understands (``pkg>=1.2``, ``pkg>=1,<2``) are kept, and the few conda names
  that differ on PyPI are renamed (:data:`CONDA_TO_PIP_NAMES`, e.g. ``pytorch`` → ``torch``);
- ``python``, the installer tooling (``pip``, ``setuptools``, ``wheel``), conda virtual packages
  (``__glibc``) and the conda-only system packages of :data:`CONDA_ONLY_PACKAGES` (C libraries
  and the like) are dropped, as is any plain entry whose version is not a PEP 440 version
  (a conda-only package FLOps does not know, logged).

``mlflow`` requirements (:data:`FLOPS_MANAGED_PACKAGES`) are the repository's own in the
``venv`` builder's environment of the repository (the model worker saves the model with that
MLflow); the ``oci`` builder's one-environment images and the trained-model image drop them
(``read_requirements(..., keep_mlflow=False)``, the default): they run the manager's MLflow.

:func:`requested_python` reads the Python version a dependency file asks for (conda
``python=3.10.14``, pyproject ``requires-python``), for the note a builder records when its
interpreter differs.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name

from flops_utils.logging import logger
from image_builder.errors import DependencyFileError

DEPENDENCY_FILES = ("conda.yaml", "conda.yml", "requirements.txt", "pyproject.toml")
"""Dependency files FLOps reads at a repository root, in order of preference."""

FLOPS_MANAGED_PACKAGES = frozenset({"mlflow", "mlflow-skinny", "mlflow-tracing"})
"""Distributions FLOps pins itself; a repository's requirements on them are dropped."""

CONDA_ONLY_PACKAGES = frozenset(
    canonicalize_name(name)
    for name in (
        # interpreter and installer tooling (FLOps uses its own Python and uv)
        "python", "python_abi", "pip", "setuptools", "wheel",
        # compiler runtimes and C/C++/Fortran libraries conda ships for its Python packages
        "_libgcc_mutex", "_openmp_mutex", "libgcc", "libgcc-ng", "libgomp", "libstdcxx",
        "libstdcxx-ng", "libgfortran", "libgfortran-ng", "libgfortran5", "llvm-openmp",
        "intel-openmp", "mkl", "mkl-service", "mkl_fft", "mkl_random", "tbb",
        "libblas", "libcblas", "liblapack", "liblapacke", "libopenblas", "openblas", "blas",
        "ld_impl_linux-64", "ld_impl_linux-aarch64", "sysroot_linux-64", "kernel-headers_linux-64",
        "libzlib", "zlib", "bzip2", "xz", "liblzma", "lz4-c", "zstd", "libzstd", "snappy",
        "openssl", "ca-certificates", "certifi-conda", "libffi", "libexpat", "expat",
        "libnsl", "libuuid", "libxcrypt", "libsqlite", "sqlite", "libmpdec", "ncurses",
        "readline", "libedit", "tk", "tzdata", "libiconv", "icu", "libxml2", "c-ares",
        "libcurl", "krb5", "libssh2", "libev", "libnghttp2", "keyutils", "gettext",
        "libjpeg-turbo", "jpeg", "libpng", "libtiff", "libwebp", "libwebp-base", "freetype",
        "lcms2", "openjpeg", "giflib", "libdeflate", "lerc", "libabseil", "libprotobuf",
        "libgrpc", "re2", "libre2-11", "libarrow", "libparquet", "arrow-cpp", "libthrift",
        "libutf8proc", "glog", "gflags", "libevent", "libbrotlicommon", "libbrotlidec",
        "libbrotlienc", "brotli-bin", "libhwloc", "libxcb", "xorg-libxau", "xorg-libxdmcp",
        "pthread-stubs", "libsodium", "zeromq", "yaml", "libyaml", "cudatoolkit", "cudnn",
        "nccl", "vc", "vs2015_runtime", "ucrt", "vc14_runtime",
    )
)  # fmt: skip
"""Conda packages with no PyPI counterpart FLOps should install (PEP 503 normalized names)."""

CONDA_TO_PIP_NAMES = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "py-xgboost": "xgboost",
    "py-opencv": "opencv-python",
    "tensorflow-base": "tensorflow",
    "pyarrow-core": "pyarrow",
    "matplotlib-base": "matplotlib",
    "brotli-python": "brotli",
    "pytables": "tables",
}
"""conda package name → PyPI distribution name, for the common names that differ."""

_CONDA_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_][A-Za-z0-9_.+-]*)\s*(?P<rest>.*)$")
_PATH_OPTION = re.compile(
    r"^(?P<opt>-r|--requirement|-c|--constraint|-e|--editable)(?:\s+|=)(?P<arg>\S+)$"
)
_PIP_OPERATORS = ("==", ">=", "<=", "!=", "~=", ">", "<")


def find_dependency_file(repo_dir: Path) -> Path | None:
    """Return the first of :data:`DEPENDENCY_FILES` present in ``repo_dir``, else ``None``."""
    return next((repo_dir / name for name in DEPENDENCY_FILES if (repo_dir / name).is_file()), None)


def read_requirements(path: Path, keep_mlflow: bool = False) -> list[str]:
    """Return the pip requirement lines ``path`` (one of :data:`DEPENDENCY_FILES`) asks for.

    Comments and blank lines are dropped; mlflow requirements are dropped
    (:data:`FLOPS_MANAGED_PACKAGES`) unless ``keep_mlflow``. Relative paths stay as written
    (so the dependency hash does not depend on where the repository was cloned);
    :func:`resolve_local_paths` makes them absolute for an install. Raises
    :class:`DependencyFileError` if the file cannot be read or parsed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DependencyFileError(f"{path.name} is not UTF-8 text; fix the file.") from None
    except OSError as exc:  # the message names no host path: only the file's own name
        reason = exc.strerror or type(exc).__name__
        raise DependencyFileError(f"Cannot read {path.name}: {reason}; fix the file.") from None
    if path.name in ("conda.yaml", "conda.yml"):
        lines = conda_to_requirements(text, file_name=path.name)
    elif path.name == "pyproject.toml":
        lines = pyproject_requirements(text)
    else:
        lines = requirements_txt_lines(text)
    return lines if keep_mlflow else drop_managed(lines)


def requested_python(path: Path) -> str | None:
    """The Python version spec a dependency file asks for, or ``None`` if it names none.

    conda: the ``python`` entry of plain ``dependencies`` as written after the name
    (``python=3.10.14`` → ``"=3.10.14"``, ``python>=3.9`` → ``">=3.9"``); ``pyproject.toml``:
    ``[project].requires-python``; ``requirements.txt`` has no such field. Never raises: an
    unreadable file gives ``None`` (:func:`read_requirements` reports it).
    """
    try:
        text = path.read_text(encoding="utf-8")
        if path.name in ("conda.yaml", "conda.yml"):
            env = _load_conda(text, path.name)
            for entry in env.get("dependencies") or []:
                if not isinstance(entry, str):
                    continue
                spec = entry.split("::", 1)[-1].strip()
                match = _CONDA_SPEC.match(spec)
                if match and match.group("name").lower() == "python":
                    return match.group("rest").strip() or None
            return None
        if path.name == "pyproject.toml":
            value = tomllib.loads(text).get("project", {}).get("requires-python")
            return str(value) if value else None
    except (OSError, UnicodeDecodeError, DependencyFileError, tomllib.TOMLDecodeError):
        return None
    except AttributeError:  # a malformed [project] table
        return None
    return None


def python_mismatch_note(spec: str | None, version: str) -> str | None:
    """A one-sentence note when the Python ``spec`` (:func:`requested_python`) excludes
    ``version`` (``"3.11.7"``), else ``None``.

    conda's ``=3.10.14`` / ``=3.10`` means that release or series (fuzzy match, conda's
    match-spec semantics); a PEP 440 spec (``>=3.9,<3.11``) is checked with ``packaging``.
    """
    if not spec:
        return None
    text = spec.strip()
    if text.startswith("=") and not text.startswith("=="):
        wanted = text[1:].split("=", 1)[0].strip().rstrip(".*")
        if version == wanted or version.startswith(wanted + "."):
            return None
    else:
        try:
            if SpecifierSet(text.replace(" ", "")).contains(version, prereleases=True):
                return None
        except InvalidSpecifier:
            return None
    shown = text.lstrip("=")
    return (
        f"The repository asks for Python {shown}; FLOps runs it with Python {version}, the "
        "interpreter of its runtime (its pins are installed for that version)."
    )


def conda_to_requirements(
    environment: str | Mapping[str, Any], file_name: str = "conda.yaml"
) -> list[str]:
    """Translate a conda environment (YAML text or parsed mapping) to pip requirement lines.

    Returns the translated plain ``dependencies`` in file order, then the ``pip:`` entries
    verbatim (mlflow is not dropped here; :func:`read_requirements` does that). See the module
    docstring for the rules. Raises :class:`DependencyFileError` naming ``file_name`` if the
    YAML is invalid, has no ``dependencies`` list, or a spec uses conda syntax pip cannot express
    (``|``, ``[version=...]``).
    """
    env = _load_conda(environment, file_name)
    dependencies = env.get("dependencies") or []
    if not isinstance(dependencies, list):
        raise DependencyFileError(
            f"{file_name}: 'dependencies' must be a list of package specs; fix the file."
        )
    translated: list[str] = []
    pip_lines: list[str] = []
    for entry in dependencies:
        if isinstance(entry, Mapping):
            pip_section = entry.get("pip")
            if not isinstance(pip_section, list):
                raise DependencyFileError(
                    f"{file_name}: the 'pip' entry must be a list of requirement lines; fix it."
                )
            pip_lines.extend(str(line).strip() for line in pip_section if str(line).strip())
            continue
        line = conda_spec_to_requirement(str(entry), file_name=file_name)
        if line is not None:
            translated.append(line)
    return translated + pip_lines


def conda_spec_to_requirement(spec: str, file_name: str = "conda.yaml") -> str | None:
    """Translate one conda match spec to a pip requirement line, or ``None`` if it is dropped.

    Examples: ``numpy=1.26.4=py311h64a7726_0`` → ``numpy==1.26.4``; ``conda-forge::numpy>=2`` →
    ``numpy>=2``; ``pytorch 2.3.*`` → ``torch==2.3.*``; ``openssl=3.2.1`` → ``None``.
    Raises :class:`DependencyFileError` for syntax pip cannot express.
    """
    text = spec.strip()
    if "::" in text:
        text = text.split("::", 1)[1].strip()
    match = _CONDA_SPEC.match(text)
    if match is None:
        raise DependencyFileError(
            f"{file_name}: cannot read the dependency {spec!r}; write it as name, name=1.2 "
            "or name>=1.2."
        )
    name, rest = match.group("name"), match.group("rest").strip()
    if name.startswith("__") or canonicalize_name(name) in CONDA_ONLY_PACKAGES:
        return None
    if "|" in rest or "[" in rest:
        raise DependencyFileError(
            f"{file_name}: the dependency {spec!r} uses conda syntax pip cannot express; write "
            "it as name=1.2 or name>=1.2."
        )
    pip_name = CONDA_TO_PIP_NAMES.get(name.lower(), name)
    version = _conda_version_to_pip(rest)
    line = pip_name + version
    try:
        Requirement(line)
    except InvalidRequirement:
        logger.warning("%s: dropping %r, which is not a PyPI-style requirement", file_name, spec)
        return None
    return line


def requirements_txt_lines(text: str) -> list[str]:
    """Return the non-comment, non-blank lines of a ``requirements.txt`` (continuations joined)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = pending + raw
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    if pending.strip():
        lines.append(pending.strip())
    return lines


def resolve_local_paths(lines: Iterable[str], base_dir: Path) -> list[str]:
    """Return ``lines`` with relative local paths made absolute against ``base_dir``.

    Covers ``-r``/``--requirement`` and ``-c``/``--constraint`` files, ``-e``/``--editable``
    paths (installed as regular, non-editable packages, because the directory they name is a
    temporary copy) and bare ``./path`` / ``../path`` requirements. Other lines are unchanged.
    """
    resolved: list[str] = []
    for line in lines:
        match = _PATH_OPTION.match(line)
        if match is not None:
            option, arg = match.group("opt"), match.group("arg")
            local = "://" not in arg
            path = str(base_dir / arg) if local and not Path(arg).is_absolute() else arg
            if option in ("-e", "--editable"):
                resolved.append(path if local else line)
            else:
                resolved.append(f"{option} {path}")
        elif line.startswith(("./", "../")):
            resolved.append(str(base_dir / line))
        else:
            resolved.append(line)
    return resolved


def pyproject_requirements(text: str) -> list[str]:
    """Return ``[project].dependencies`` of a ``pyproject.toml`` text (``[]`` if absent).

    Raises :class:`DependencyFileError` if the TOML is invalid or the field is not a list of
    strings.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DependencyFileError(f"pyproject.toml is not valid TOML ({exc}); fix it.") from exc
    project = data.get("project", {})
    dependencies = project.get("dependencies", []) if isinstance(project, dict) else []
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise DependencyFileError(
            "pyproject.toml: [project].dependencies must be a list of requirement strings; fix it."
        )
    return [d.strip() for d in dependencies if d.strip()]


def requirement_name(line: str) -> str | None:
    """Return the PEP 503 normalized distribution name of a requirement line, else ``None``.

    ``None`` for option lines (``-r x``, ``--index-url``), URLs and local paths.
    """
    if line.startswith("-"):
        return None
    try:
        return canonicalize_name(Requirement(line).name)
    except InvalidRequirement:
        return None


def drop_managed(
    lines: Iterable[str], managed: Iterable[str] = FLOPS_MANAGED_PACKAGES
) -> list[str]:
    """Return ``lines`` without the requirements whose name is in ``managed`` (normalized)."""
    names = {canonicalize_name(name) for name in managed}
    return [line for line in lines if requirement_name(line) not in names]


def dependency_hash(requirements: Sequence[str]) -> str:
    """Return the 64-hex SHA-256 of the normalized requirement list.

    Normalization: each line stripped, inner whitespace collapsed, a valid requirement
    re-rendered by ``packaging`` (so ``NumPy >= 2`` equals ``numpy>=2``), duplicates removed,
    lines sorted; order in the file therefore does not matter.
    """
    normalized = sorted({_normalize_line(line) for line in requirements if line.strip()})
    return hashlib.sha256("\n".join(normalized).encode()).hexdigest()


def _normalize_line(line: str) -> str:
    line = " ".join(line.split())
    if line.startswith("-"):
        return line
    try:
        requirement = Requirement(line)
    except InvalidRequirement:
        return line
    requirement.name = canonicalize_name(requirement.name)
    return str(requirement)


def _load_conda(environment: str | Mapping[str, Any], file_name: str) -> Mapping[str, Any]:
    if isinstance(environment, Mapping):
        return environment
    try:
        loaded = yaml.safe_load(environment)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or "invalid YAML")
        raise DependencyFileError(f"{file_name} is not valid YAML ({problem}); fix it.") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise DependencyFileError(
            f"{file_name} must be a conda environment (a mapping with 'dependencies'); fix it."
        )
    return loaded


def _conda_version_to_pip(rest: str) -> str:
    """``=1.2=build`` / ``1.2 build`` / ``>=1.2`` / ``=1.2.*`` → a pip version specifier."""
    if not rest:
        return ""
    if rest.startswith(_PIP_OPERATORS):
        return rest.replace(" ", "")
    if rest.startswith("="):  # conda's single '=' (exact-or-prefix) with an optional build
        version = rest[1:].split("=", 1)[0].strip()
    else:  # space-separated match spec: "1.2 build"
        version = rest.split()[0]
        if version.startswith(_PIP_OPERATORS):
            return version
    if version.endswith("*") and not version.endswith(".*"):
        version = version[:-1].rstrip(".") + ".*"
    return "==" + version
