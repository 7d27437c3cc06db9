"""The house rules, run by `make test`: ruff, mypy on the shared libraries, the import contracts.

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
import os
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
    bad.write_text("import sys\nimport os\n\n\ndef f(items=[]):\n    return items\n")
    result = run("ruff", "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), str(bad))
    assert result.returncode == 1
    for rule in ("F401", "I001", "B006"):   # unused import, import order, mutable default
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
