"""The house rules, run by `make test`: ruff, mypy on the shared libraries, the import contracts,
an acyclic import graph, the README's layout table, tests that mirror the tree, and no
module-level mutable state.

Each check runs once on the tree as it is (and must pass) and once on a planted violation
(and must fail, naming it), so a check that passes everything cannot go unnoticed. The
rule sets live in pyproject.toml ([tool.ruff], [tool.mypy], [tool.importlinter]).

Imports name ``shoal.agent.*`` but the folder is ``agent/`` (setup.py's package-dir
mapping), so import-linter cannot read the source tree as it stands: ``installed_layout``
lays the package out as pip installs it, one folder per import path, and the contracts
are checked there.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(tool: str, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def package_folders() -> dict[str, str]:
    """setup.py's FOLDERS (import path -> folder), read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FOLDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no FOLDERS mapping")


def installed_layout(root: Path) -> Path:
    """The ``shoal`` package as installed (shoal/agent/ from agent/...), under ``root``."""
    ignore = shutil.ignore_patterns("__pycache__", "results", "*.c", "*.h")
    for package, folder in sorted(package_folders().items()):
        target = root.joinpath(*package.split("."))
        shutil.copytree(REPO / folder, target, ignore=ignore, dirs_exist_ok=True)
    return root


def lint_imports(layout: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(layout)}
    return run("lint-imports", "--no-cache", str(REPO / "pyproject.toml"), cwd=layout, env=env)


def plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def importlinter_contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


# -- ruff ------------------------------------------------------------------------------------


def test_ruff_passes():
    result = run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, f"ruff (rules in pyproject.toml [tool.ruff]):\n{result.stdout}{result.stderr}"


def test_ruff_fails_on_a_planted_violation(tmp_path):
    bad = tmp_path / "planted.py"
    bad.write_text("import sys\nimport os\n\n\ndef f(items=[]):\n    try:\n        return items\n"
                   "    except Exception:\n        return None\n")
    result = run("ruff", "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), str(bad))
    assert result.returncode == 1
    for rule in ("F401", "I001", "B006", "BLE001"):   # unused import, import order, mutable default, blind except
        assert rule in result.stdout, result.stdout


# -- mypy ------------------------------------------------------------------------------------


def test_mypy_passes_on_the_shared_libraries():
    result = run("mypy", "--no-incremental")
    assert result.returncode == 0, (f"mypy (files in pyproject.toml [tool.mypy]; 'Library stubs not installed': "
                                    f"run scripts/install.sh):\n{result.stdout}{result.stderr}")


def test_mypy_fails_on_a_planted_violation(tmp_path):
    shutil.copytree(REPO / "shoal", tmp_path / "shoal", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    plant(tmp_path / "shoal" / "policy" / "match.py", 'def planted() -> int:\n    return "not an int"')
    result = run("mypy", "--no-incremental", cwd=tmp_path)
    assert result.returncode == 1
    assert "shoal/policy/match.py" in result.stdout and "return-value" in result.stdout, result.stdout


# -- import contracts ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return installed_layout(tmp_path_factory.mktemp("installed"))


def test_import_contracts_hold(layout):
    result = lint_imports(layout)
    assert result.returncode == 0, f"import contracts (pyproject.toml [tool.importlinter]):\n{result.stdout}"


@pytest.mark.parametrize("importer, line, broken, named", [
    ("controller/app.py", "from shoal.waypoint import config", "The daemons never import each other",
     "shoal.controller.app -> shoal.waypoint.config"),
    ("agent/ztunnel/app.py", "from shoal.agent import netns", "The node proxy imports nothing of the agent",
     "shoal.agent.ztunnel.app -> shoal.agent.netns"),
    ("agent/debug.py", "from shoal.agent.ztunnel import config", "The agent imports nothing of the node proxy",
     "shoal.agent.debug -> shoal.agent.ztunnel.config"),
    ("shoal/flows/records.py", "from shoal.agent import metrics", "Shared libraries import no daemon",
     "shoal.flows.records -> shoal.agent.metrics"),
    ("waypoint/app.py", "from shoal.local import topology", "Nothing imports the local cluster but the CLI",
     "shoal.waypoint.app -> shoal.local.topology"),
    ("shoal/config.py", "import shoal.kubernetes", "No import cycles", ".kubernetes -> .config"),
], ids=["daemon-imports-daemon", "proxy-imports-agent", "agent-imports-proxy", "shared-imports-daemon",
        "daemon-imports-local", "cycle"])
def test_import_contracts_name_a_planted_import(tmp_path, importer, line, broken, named):
    layout = installed_layout(tmp_path)
    package, _, rest = importer.partition("/")
    folders = {folder: name for name, folder in package_folders().items()}
    plant(layout.joinpath(*folders[package].split("."), rest), line)
    result = lint_imports(layout)
    assert result.returncode == 1, result.stdout
    assert f"{broken}" in result.stdout.split("Broken contracts")[-1], result.stdout
    assert named in result.stdout, result.stdout


def test_every_agent_module_is_in_the_proxy_contracts():
    """The proxy/agent contracts list the agent's modules one by one (import-linter cannot say
    "shoal.agent but ztunnel"): a module added to agent/ must be added there too."""
    own = {f"shoal.agent.{p.stem}" for p in (REPO / "agent").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()} - {"shoal.agent.ztunnel"}
    contracts = importlinter_contracts()
    assert set(contracts["proxy"]["forbidden_modules"]) == own
    assert set(contracts["agent"]["source_modules"]) == own


def test_every_top_level_module_of_shoal_is_shared_or_an_assembler():
    """A new shoal/x.py is either a shared library (then the contracts and mypy check it) or
    one of the two assemblers; nothing falls between."""
    assemblers = {"shoal.cli", "shoal.local", "shoal.__main__"}
    top = {f"shoal.{p.stem}" for p in (REPO / "shoal").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    shared = set(importlinter_contracts()["shared"]["source_modules"])
    assert top - assemblers == shared


# -- the import graph: no cycles ------------------------------------------------------------

CYCLES = """
import json, sys
import grimp

graph = grimp.build_graph("shoal", exclude_type_checking_imports=True, cache_dir=None)
index, low, on_stack, stack, cycles = {}, {}, set(), [], []
for root in sorted(graph.modules):   # Tarjan's strongly connected components, iteratively
    if root in index:
        continue
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
    while work:
        node, targets = work[-1]
        for target in targets:
            if target not in index:
                index[target] = low[target] = len(index)
                stack.append(target)
                on_stack.add(target)
                work.append((target, iter(sorted(graph.find_modules_directly_imported_by(target)))))
                break
            if target in on_stack:
                low[node] = min(low[node], index[target])
        else:
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
json.dump({"modules": len(graph.modules), "cycles": cycles}, sys.stdout)
"""


def import_cycles(layout: Path) -> dict:
    """The installed package's module import graph (grimp, as import-linter builds it; imports
    under TYPE_CHECKING left out): its size and every cycle, as the modules that form it."""
    env = {**os.environ, "PYTHONPATH": str(layout)}
    result = subprocess.run([sys.executable, "-c", CYCLES], cwd=layout, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_installed_import_graph_has_no_cycles(layout):
    graph = import_cycles(layout)
    assert graph["modules"] > 150, graph   # the whole package was read
    assert graph["cycles"] == [], f"import cycles (each: the modules that import each other): {graph['cycles']}"


def test_a_planted_import_cycle_is_named(tmp_path):
    layout = installed_layout(tmp_path)
    plant(layout / "shoal" / "config.py", "import shoal.kubernetes")   # kubernetes imports config
    assert ["shoal.config", "shoal.kubernetes"] in import_cycles(layout)["cycles"]


# -- the README's layout table ---------------------------------------------------------------


def layout_table_gaps(readme: str) -> list[str]:
    """What the README's layout table fails to map: a top-level ``shoal.X`` without its own row,
    a package folder of setup.py without a ``shoal.<package>.X`` row, a file a row names that
    does not exist."""
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [[re.findall(r"`([^`]+)`", cell) for cell in line.split("|")[1:3]]
            for line in section.splitlines() if line.startswith("| `shoal.")]
    named = {name for imports, _ in rows for name in imports}
    gaps = []
    for path in sorted((REPO / "shoal").iterdir()):
        if path.name.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").exists()):
            continue
        if f"shoal.{path.stem}" not in named:
            gaps.append(f"shoal.{path.stem} ({path.relative_to(REPO)}) has no row")
    for package, folder in package_folders().items():
        if package != "shoal" and f"{package}.X" not in named and package not in named:
            gaps.append(f"{package} ({folder}/) has no row")
    for _, files in rows:
        for file in files:
            target = REPO / file.replace("X.py", "").replace("X/", "")
            if not target.exists():
                gaps.append(f"{file} does not exist")
    return gaps


def test_the_readme_layout_table_maps_every_import_to_its_file():
    assert layout_table_gaps((REPO / "README.md").read_text()) == []


def test_a_module_missing_from_the_layout_table_is_named():
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `shoal.podspec`"))
    gaps = layout_table_gaps(readme.replace(row + "\n", "").replace("`shoal/zds.py`", "`shoal/zdz.py`"))
    assert "shoal.podspec (shoal/podspec.py) has no row" in gaps and "shoal/zdz.py does not exist" in gaps


# -- tests mirror the source tree -------------------------------------------------------------


def unmirrored_tests(tests: Path) -> list[str]:
    """Test files not named after a module of the folder they mirror: ``tests/<folder>/test_<module>.py``
    or ``test_<module>_<aspect>.py`` for ``<folder>/<module>.py`` (or a package, or a data folder
    such as ``daemonset/``); tests/test_checks.py checks the whole tree."""
    wrong = []
    for test in sorted(tests.rglob("test_*.py")):
        relative = test.relative_to(tests)
        if relative == Path("test_checks.py"):
            continue
        folder = REPO / relative.parent
        words = test.stem.removeprefix("test_").split("_")
        candidates = ["_".join(words[:n]) for n in range(1, len(words) + 1)]
        if not any((folder / f"{name}.py").exists() or (folder / name).is_dir() for name in candidates):
            wrong.append(f"tests/{relative}: no {relative.parent}/{words[0]}[_...].py to mirror")
    return wrong


def test_tests_mirror_the_source_tree():
    assert unmirrored_tests(REPO / "tests") == []


def test_a_test_file_named_after_no_module_is_named(tmp_path):
    shutil.copytree(REPO / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tests" / "shoal" / "hbone" / "test_framing.py").rename(tmp_path / "tests" / "shoal" / "hbone" / "test_frames.py")
    planted = "tests/shoal/hbone/test_frames.py: no shoal/hbone/frames[_...].py to mirror"
    assert planted in unmirrored_tests(tmp_path / "tests")


# -- no module-level mutable state ------------------------------------------------------------

MUTATORS = frozenset({"append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault",
                      "add", "discard", "appendleft", "extendleft", "sort", "reverse", "difference_update",
                      "intersection_update", "symmetric_difference_update"})
SOURCE_FOLDERS = ("shoal", "agent", "controller", "waypoint", "perf")


def module_state_writes(source: str) -> list[str]:
    """Where a function writes module-level state: a ``global`` statement, an item stored into
    or deleted from a module-level container, or a mutating method called on one. (Constant
    tables at module level are fine; changing them at run time is not.)"""
    tree = ast.parse(source)
    module_names = {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(target, ast.Name)}
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        own = {arg.arg for arg in function.args.args + function.args.kwonlyargs + function.args.posonlyargs}
        shared = module_names - own
        for node in ast.walk(function):
            if isinstance(node, ast.Global):
                found.append(f"line {node.lineno}: global {', '.join(node.names)}")
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and target.value.id in shared:
                    found.append(f"line {node.lineno}: {target.value.id}[...] written")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in shared):
                found.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}()")
    return found


def test_no_module_level_mutable_state():
    found = [f"{path.relative_to(REPO)} {where}" for folder in SOURCE_FOLDERS
             for path in sorted((REPO / folder).rglob("*.py")) for where in module_state_writes(path.read_text())]
    assert found == []


def test_planted_module_level_state_is_named():
    planted = "SEEN = {}\nCOUNT = 0\n\n\ndef remember(key):\n    SEEN[key] = True\n\n\ndef bump():\n" \
              "    global COUNT\n    COUNT += 1\n\n\ndef forget(key, SEEN=None):\n    SEEN.pop(key)\n"
    assert module_state_writes(planted) == ["line 6: SEEN[...] written", "line 10: global COUNT"]


# -- compiled hot path ---------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("SHOAL_COMPILE") == "0", reason="installed with SHOAL_COMPILE=0: interpreted")
def test_the_hot_path_modules_run_compiled():
    """The install compiled every module of [tool.shoal] compiled, and an import loads the
    extension, not the source beside it (setup.py; a failed build must not go unnoticed)."""
    import importlib

    from tests.conftest import compiled_modules
    for compiled in compiled_modules():
        module = importlib.import_module(compiled.name)
        assert module.__file__ and module.__file__.endswith(".so"), f"{compiled.name} runs interpreted: {module.__file__}"
