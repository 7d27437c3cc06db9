"""Maps the top-level folders onto one ``shoal.*`` namespace.

Nothing called ``agent`` or ``controller`` lands at the top of site-packages:
``agent/`` installs as ``shoal.agent``, ``controller/`` as ``shoal.controller``...
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
