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
import os
import shutil
import tomllib
from pathlib import Path

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


def installed_path(source: str) -> str:
    """``waypoint/h1.py`` -> ``shoal/waypoint/h1.py``: where a source file sits as installed."""
    folder, _, rest = source.partition("/")
    package = next(name for name, path in FOLDERS.items() if path == folder)
    return f"{package.replace('.', '/')}/{rest}"


def compiled_extensions() -> list:
    """The hot-path modules of pyproject's [tool.shoal] compiled, as mypyc C extensions.

    mypyc names a module after its path, so it reads them from a copy of the tree laid out as
    installed (build/mypyc-src: ``waypoint/h1.py`` there is ``shoal/waypoint/h1.py``);
    build_ext puts each extension back beside its source (package_dir). SHOAL_COMPILE=0
    installs without them: the same modules then run interpreted. Their shared runtime is
    the top-level extension ``shoal__mypyc``."""
    sources = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["shoal"]["compiled"]
    # An editable install built them beside their sources, where they shadow them. Removed
    # first, every time: interpreted (SHOAL_COMPILE=0) they must not shadow the sources, and
    # a build that fails (a type error) must leave none, never an old one over newer source.
    for built in Path(".").glob("shoal__mypyc.*.so"):
        built.unlink()
    for source in map(Path, sources):
        for built in source.parent.glob(f"{source.stem}.cpython-*.so"):
            built.unlink()
    if os.environ.get("SHOAL_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    stage = Path("build/mypyc-src")
    shutil.rmtree(stage, ignore_errors=True)
    for folder in FOLDERS.values():
        for source in [*Path(folder).rglob("*.py"), *Path(folder).rglob("*.pyi")]:   # .pyi: the protobuf stubs
            target = stage / installed_path(source.as_posix())
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return mypycify([str(stage / installed_path(source)) for source in sources], opt_level="3",
                    target_dir="build/mypyc", group_name="shoal")


PACKAGES, PACKAGE_DIR = packages()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=compiled_extensions())
