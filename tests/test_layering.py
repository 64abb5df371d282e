"""The package's floors: no module imports from a floor above its own (README, "Where things are").

Imports are read from the source (ast), including imports inside functions; `if TYPE_CHECKING:` blocks (type
hints only, never run) are left out.
"""

import ast
import pathlib

from tests.conftest import ROOT

# Lowest first. A module may import its own floor and the floors below it.
FLOORS = (
    ("config_lib", "progress", "files", "nn", "sharding", "checkpointing"),  # infrastructure
    ("data",),  # image sources, transforms, the input pipelines, the codes format
    ("quantizers", "losses", "losses_gpt"),  # pure math and the quantizer modules
    ("models",),  # VQ-GAN, GPT, LPIPS, Inception; loading them
    ("conversion", "evaluation", "sampling"),  # what uses models: torch interop, metrics, the sampler
    ("train", "extraction", "serving"),  # the jobs' machinery
    ("tasks", "main", "tools", "benchmarks"),  # entry points
)
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
PACKAGE = ROOT / "fvq_jax"


def _part(module: str) -> str:
    """fvq_jax.<part>[.rest] -> part."""
    return module.split(".")[1]


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fvq_jax"):
            found += [f"{node.module}.{alias.name}" if node.module == "fvq_jax" else node.module for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("fvq_jax.")]
    return found


def test_every_part_of_the_package_has_a_floor():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert parts == set(FLOOR), (sorted(parts - set(FLOOR)), sorted(set(FLOOR) - parts))


def test_no_module_imports_from_a_floor_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for target in _imports(path):
            part = _part(target) if target.count(".") else ""
            if part and FLOOR[part] > FLOOR[own]:
                upward.append(f"{path.relative_to(ROOT)} imports {target} (floor {FLOOR[part]} > {FLOOR[own]})")
    assert not upward, "\n".join(upward)
