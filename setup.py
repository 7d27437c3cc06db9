"""Maps the top-level folders onto one ``shoal.*`` namespace.

Nothing called ``agent`` or ``controller`` lands at the top of site-packages:
``agent/`` installs as ``shoal.agent``, ``controller/`` as ``shoal.controller``...

From an import to its file: ``shoal.agent.X`` is ``agent/X.py`` (``shoal.agent.ztunnel.X``
is ``agent/ztunnel/X.py``), ``shoal.controller.X`` is ``controller/X.py``,
``shoal.waypoint.X`` is ``waypoint/X.py``, ``shoal.perf.X`` is ``perf/X.py``, ``shoal.bpf``
is ``bpf/``; any other ``shoal.X`` is ``shoal/X.py`` or ``shoal/X/``. The README's layout
table says what each holds; tests/test_checks.py reads FOLDERS to lay the package out as
installed for the import contracts.
"""
from setuptools import find_namespace_packages, find_packages, setup

FOLDERS = {
    "shoal": "shoal",
    "shoal.agent": "agent",
    "shoal.controller": "controller",
    "shoal.waypoint": "waypoint",
    "shoal.perf": "perf",
    "shoal.bpf": "bpf",
}


def packages() -> tuple[list[str], dict[str, str]]:
    names, dirs = [], {}
    for package, folder in FOLDERS.items():
        names.append(package)
        dirs[package] = folder
        # bpf/ holds C sources: its lib/ folder is package data, found as a namespace package.
        finder = find_namespace_packages if folder == "bpf" else find_packages
        for sub in finder(folder, exclude=["__pycache__", "*.__pycache__"]):
            names.append(f"{package}.{sub}")
            dirs[f"{package}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return names, dirs


PACKAGES, PACKAGE_DIR = packages()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
