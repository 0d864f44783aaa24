"""The architecture a contributor can see: imports point one way, the wheel holds only
``onnxflow*``, and the layout table of docs/development.md matches the tree
(docs/architecture.md)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The layers, top to bottom; a module may import its own layer and the ones below, never
#: one above. A module belongs to the longest prefix that names it; ``onnxflow`` (the
#: steps) takes every module no other entry names. Declared here once; docs/architecture.md
#: draws it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry points", ("onnxflow.cli", "onnxflow.stack")),
    ("flows", ("onnxflow.flows",)),
    ("tasks", ("onnxflow.tasks",)),
    ("steps", ("onnxflow",)),
    ("serving", ("onnxflow.serving",)),
    (
        "shared",
        ("onnxflow.errors", "onnxflow.onnxfiles", "onnxflow.interface", "onnxflow.processes"),
    ),
)


def package_dirs() -> dict[str, Path]:
    """Each installed package and the folder it comes from (pyproject's package-dir)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    return {
        name: ROOT / mapped.get(name, name.replace(".", "/")) for name in setuptools["packages"]
    }


def modules() -> dict[str, Path]:
    """Every module of the installed packages by its dotted name."""
    found = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no layer"
    return index


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The onnxflow modules ``path`` imports, at the top or inside functions."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:  # ``from pkg import module`` imports the module
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Call) and _imports_by_name(node):
            names.add(node.args[0].value)
    return {n for n in names if n == "onnxflow" or n.startswith("onnxflow.")}


def _imports_by_name(call: ast.Call) -> bool:
    """``importlib.import_module("onnxflow.x")``, ``import_module(...)``, ``__import__(...)``
    with the module named by a string."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return (
        name in ("import_module", "__import__")
        and bool(call.args)
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    )


def test_every_module_is_in_a_layer_and_the_layers_name_real_modules():
    found = modules()
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(m == prefix or m.startswith(prefix + ".") for m in found), prefix
    for module in found:
        layer_of(module)


def test_imports_point_down_the_layers():
    found = modules()
    upward = []
    for module, path in found.items():
        mine = layer_of(module)
        for target in sorted(imported_modules(path, module, set(found))):
            if target in found and layer_of(target) < mine:
                upward.append(
                    f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    """A steps module importing a flow must be found (the test above can fail)."""
    path = tmp_path / "validate.py"
    path.write_text("def f():\n    from onnxflow.flows.pipeline import run\n")
    targets = imported_modules(path, "onnxflow.validate", {"onnxflow.flows.pipeline"})
    assert targets == {"onnxflow.flows.pipeline"}
    path.write_text(
        "import importlib\n"
        "def f():\n    return importlib.import_module('onnxflow.flows.sweep')\n"
        "def g():\n    return __import__('onnxflow.cli')\n"
    )
    found = imported_modules(path, "onnxflow.validate", set())
    assert found == {"onnxflow.flows.sweep", "onnxflow.cli"}
    assert layer_of("onnxflow.flows.pipeline") < layer_of("onnxflow.validate")
    assert layer_of("onnxflow.serving.app") > layer_of("onnxflow.validate")
    assert layer_of("onnxflow.errors") == len(LAYERS) - 1


# -- the wheel ------------------------------------------------------------------------------


def tracked_files(untracked: bool = False) -> list[str]:
    """The files git tracks (that still exist): what a clone has, whatever a used tree
    holds beside them (``build/`` from ``pip wheel .``, artifacts, caches). ``untracked``:
    also the files git does not track yet and does not ignore (a change not yet added)."""
    extra = ["--others", "--exclude-standard"] if untracked else []
    listed = subprocess.run(
        ["git", "ls-files", "--cached", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if (ROOT / name).exists()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel ``pip install .`` would install, built from a copy of the checkout's files
    (setuptools writes ``build/`` beside the sources)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in tracked_files(untracked=True):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(out),
        ],
        check=True,
        timeout=600,
    )
    (path,) = out.glob("onnxflow-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_onnxflow_at_the_top_of_site_packages(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert top and all(t == "onnxflow" or t.startswith("onnxflow-") for t in top), sorted(top)


def test_every_package_folder_is_in_the_wheel(wheel):
    """A folder with an ``__init__.py`` that pyproject's package list forgets would import
    in a checkout but not once installed."""
    in_wheel = set(wheel.namelist())
    missing = []
    for package, folder in package_dirs().items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).as_posix()
            dotted = package if relative == "." else f"{package}.{relative.replace('/', '.')}"
            for source in init.parent.glob("*.py"):
                if f"{dotted.replace('.', '/')}/{source.name}" not in in_wheel:
                    missing.append(f"{dotted}: {source.name}")
    assert not missing, missing


# -- the layout table (docs/development.md) --------------------------------------------------


def layout_table() -> list[str]:
    """The paths in the first column of the "Layout" table of docs/development.md."""
    page = (ROOT / "docs" / "development.md").read_text()
    section = page.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def test_the_readme_layout_names_every_folder_and_package_and_nothing_else():
    named = set(layout_table())
    folders = {f"{p.split('/')[0]}/" for p in tracked_files() if "/" in p and not p.startswith(".")}
    packages = {f"{folder.relative_to(ROOT).as_posix()}/" for folder in package_dirs().values()}
    missing = sorted((folders | packages) - named)
    assert not missing, f"in the tree, not in the README's layout table: {missing}"
    gone = sorted(p for p in named if not (ROOT / p).exists())
    assert not gone, f"in the README's layout table, not in the tree: {gone}"


def test_the_layout_reads_the_tracked_tree_not_what_a_build_left(tmp_path):
    """A used clone holds folders git does not track (``pip wheel .`` leaves ``build/``
    unless ignored): the tree the layout test reads is the tracked one."""
    leftover = Path(tempfile.mkdtemp(prefix="untracked-", dir=ROOT))
    try:
        (leftover / "lib.py").write_text("x = 1\n")
        names = leftover.relative_to(ROOT).as_posix()
        assert not any(p.startswith(names) for p in tracked_files())
        assert any(p.startswith(names) for p in tracked_files(untracked=True))
    finally:
        shutil.rmtree(leftover)


def test_the_readme_lists_every_framework_choice():
    from onnxflow.cli import FrameworkChoice

    docs = "\n".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    listed = re.findall(r"onnxflow (run|trigger) \[--framework ([a-z|]+)\]", docs)
    assert {command for command, _ in listed} == {"run", "trigger"}
    for command, choices in listed:
        assert choices.split("|") == [c.value for c in FrameworkChoice], command
