"""The layering of FLOps' packages, checked from the imports of every module.

Run ``uv run python -m scripts.layers`` (``scripts/check`` does): it prints each violation as
``file:line: X imports Y (rule)`` and exits 1 if there is one, else 0.

Layers, bottom to top:

- ``flops_utils``: shared by every process; imports no other first-party package.
- runtime roles ``learner``, ``aggregator``, ``data_server``, ``image_builder``,
  ``observatory``: they run in images and virtualenvs that hold only ``flops_utils``, so they
  import ``flops_utils`` and nothing else first-party: not each other, never ``flops_manager``.
- ``flops_manager``: the top; imports any package. Inside it, modules form tiers too (see
  :data:`MANAGER_TIERS`): records, the store and errors never import the lifecycle or the API.

Every import counts, also those inside functions and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

UTILS = "flops_utils"
MANAGER = "flops_manager"
ROLES = ("learner", "aggregator", "data_server", "image_builder", "observatory")

PACKAGE_DIRS: dict[str, str] = {
    UTILS: "utils_pkg/flops_utils",
    **{role: role for role in ROLES},
    MANAGER: MANAGER,
}
"""Each first-party package and its directory, relative to the repository root."""

ALLOWED: dict[str, frozenset[str]] = {
    UTILS: frozenset(),
    **{role: frozenset({UTILS}) for role in ROLES},
    MANAGER: frozenset({UTILS, *ROLES}),
}
"""The other first-party packages each package may import."""

MANAGER_TIERS: dict[str, int] = {
    # 0, data and base: what everything else builds on
    "flops_manager": 0,
    "flops_manager.records": 0,
    "flops_manager.store": 0,
    "flops_manager.sla": 0,
    "flops_manager.errors": 0,
    "flops_manager.auth": 0,
    "flops_manager.broker": 0,
    "flops_manager.mqtt_access": 0,
    "flops_manager.client": 0,
    "flops_manager.process_identity": 0,
    # 1, services the lifecycle drives (orchestrators, builds, config, ...): the default
    # 2, the project lifecycle
    "flops_manager.projects": 2,
    "flops_manager.lifecycle": 2,
    # 3, the REST API
    "flops_manager.api_models": 3,
    "flops_manager.app": 3,
    "flops_manager.service_logs": 3,
    # 4, entry points that assemble everything
    "flops_manager.suite": 4,
    "flops_manager.main": 4,
    "flops_manager.cli": 4,
    "flops_manager.demo": 4,
}
"""Tiers of the manager's modules (a submodule has its parent's tier unless listed); a module
may import modules of its own tier or below."""

DEFAULT_MANAGER_TIER = 1
TIER_NAMES = ("data/base", "services", "lifecycle", "API", "entry point")


@dataclass(frozen=True)
class Violation:
    """One import that breaks a rule: ``path`` (relative to the root), ``line``, the
    importing and the imported module, and the ``rule`` broken."""

    path: str
    line: int
    importer: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported} ({self.rule})"


def module_name(package: str, package_dir: Path, file: Path) -> str:
    """The dotted module name of ``file`` inside ``package`` (``__init__`` is the package)."""
    parts = [package, *file.relative_to(package_dir).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str, str]]:
    """``(line, module, name)`` for every import in ``tree``, relative ones resolved.

    ``import a.b`` yields ``(line, "a.b", "")``; ``from a import b`` yields ``(line, "a", "b")``
    (``b`` may be a submodule or a name defined in ``a``).
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, module, is_package)
            for alias in node.names:
                yield node.lineno, base, "" if alias.name == "*" else alias.name


def _absolute(name: str | None, level: int, module: str, is_package: bool) -> str:
    if level == 0:
        return name or ""
    package = module.split(".")
    if not is_package:
        package.pop()
    package = package[: len(package) - (level - 1)]
    return ".".join([*package, *([name] if name else [])])


def manager_tier(module: str) -> int:
    """The tier of a ``flops_manager`` module: its own, its nearest listed parent's, or 1."""
    parts = module.split(".")
    while parts:
        tier = MANAGER_TIERS.get(".".join(parts))
        if tier is not None and (len(parts) > 1 or module == MANAGER):
            return tier
        parts.pop()
    return DEFAULT_MANAGER_TIER


def rule_broken(importer: str, imported: str) -> str | None:
    """Which rule ``importer`` importing ``imported`` breaks, or ``None`` when it is allowed."""
    source, target = importer.split(".")[0], imported.split(".")[0]
    if target not in ALLOWED:
        return None  # a third-party or standard-library module
    if source != target:
        if target in ALLOWED[source]:
            return None
        if source == UTILS:
            return "flops_utils is the bottom layer and imports no other FLOps package"
        if target == MANAGER:
            return "a runtime role never imports flops_manager; move the shared code to flops_utils"
        return f"a runtime role imports only flops_utils, not another role ({target})"
    if source == MANAGER:
        importer_tier, imported_tier = manager_tier(importer), manager_tier(imported)
        if imported_tier > importer_tier:
            return (
                f"inside flops_manager, the {TIER_NAMES[importer_tier]} tier does not import "
                f"the {TIER_NAMES[imported_tier]} tier above it"
            )
    return None


def check(root: Path) -> list[Violation]:
    """Every violation in the first-party packages under ``root`` (packages that are missing
    are skipped), in path and line order. Raises ``SyntaxError`` for a module that does not
    parse."""
    violations: list[Violation] = []
    for package, directory in PACKAGE_DIRS.items():
        package_dir = root / directory
        for file in sorted(package_dir.rglob("*.py")):
            if "templates" in file.relative_to(package_dir).parts:
                continue  # files copied into images and user repositories, not modules of ours
            violations.extend(_check_file(root, package, package_dir, file))
    return violations


def _check_file(root: Path, package: str, package_dir: Path, file: Path) -> list[Violation]:
    module = module_name(package, package_dir, file)
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    found: dict[tuple[int, str], Violation] = {}
    for line, base, name in imports_of(tree, module, file.name == "__init__.py"):
        imported = f"{base}.{name}" if name and _is_module(root, f"{base}.{name}") else base
        rule = rule_broken(module, imported)
        if rule is not None:
            path = file.relative_to(root).as_posix()
            found.setdefault((line, imported), Violation(path, line, module, imported, rule))
    return sorted(found.values(), key=lambda violation: violation.line)


def _is_module(root: Path, dotted: str) -> bool:
    """Whether ``dotted`` names a first-party module or package under ``root``."""
    package, *rest = dotted.split(".")
    if package not in PACKAGE_DIRS:
        return False
    path = root / PACKAGE_DIRS[package] / Path(*rest) if rest else root / PACKAGE_DIRS[package]
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def main(argv: list[str] | None = None) -> int:
    """Print the violations under ``--root`` (default: the repository); 1 if any, else 0."""
    parser = argparse.ArgumentParser(prog="python -m scripts.layers", description=__doc__)
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parent.parent,
        help="the repository root (default: this script's repository)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    violations = check(args.root)
    for violation in violations:
        print(violation)
    if violations:
        print(f"{len(violations)} import(s) break the layering.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
