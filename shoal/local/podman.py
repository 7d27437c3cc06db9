"""The podman side of ``shoal up --containers``: images, and the containers of one cluster.

``containers.py`` turns the rendered manifests into ``podman run`` flags; this module runs
them. Every container carries the label ``shoal.io/cluster=<name>``, so ``shoal down``
removes exactly the containers its cluster started (by ID), whoever started them.

The images ``make images`` built carry the code of the day they were built. A source
checkout runs its own code: ``source_image`` lays the checkout's packages over the built
image's venv in one new layer (seconds, no pip, no network), tagged by their content hash,
so a cluster never runs stale code and the dependencies stay the image's own.
"""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from shoal.local.containers import PODMAN_GLOBAL

LABEL_CLUSTER = "shoal.io/cluster"
LABEL_SOURCE = "shoal.io/source-hash"
BUILDAH = ("buildah", "--cgroup-manager", "cgroupfs")


class PodmanError(RuntimeError):
    """podman or buildah failed, or is missing; the message says which and why."""


def available() -> str | None:
    """None when podman and buildah can run containers here, else why not."""
    for tool in ("podman", "buildah", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh --images installs it)"
    return None


def image_exists(image: str) -> bool:
    return subprocess.run(["podman", *PODMAN_GLOBAL, "image", "exists", image],
                          capture_output=True).returncode == 0


def _run(argv: list[str], what: str, timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise PodmanError(f"{what}: {' '.join(argv[:4])}... exit {done.returncode}: {done.stderr.strip()[-800:]}")
    return done.stdout


# -- images ----------------------------------------------------------------------------


def source_root() -> Path | None:
    """The checkout this Shoal runs from (setup.py beside the packages), or None if installed."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() and (root / "agent").is_dir() else None


def package_folders(root: Path) -> dict[str, str]:
    """setup.py's FOLDERS (package -> folder), read without running setup()."""
    tree = ast.parse((root / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FOLDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise PodmanError(f"{root / 'setup.py'} has no FOLDERS mapping")


def _files(root: Path, folders: dict[str, str]) -> list[tuple[Path, str]]:
    """(file, path below site-packages) of every packaged file, sorted."""
    found = []
    for package, folder in folders.items():
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found.append((path, f"{package.replace('.', '/')}/{path.relative_to(root / folder)}"))
    return found


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path, target in _files(root, package_folders(root)):
        digest.update(target.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def source_image(image: str, root: Path) -> str:
    """``image`` with ``root``'s packages in place of the venv's: ``<image>-src<hash>``, made once."""
    digest = source_hash(root)
    tagged = f"{image}-src{digest}"
    if image_exists(tagged):
        return tagged
    if not image_exists(image):
        raise PodmanError(f"image {image} is not built: run `make images`")
    container = _run([*BUILDAH, "from", "--pull=never", image], f"buildah from {image}").strip()
    try:
        mount = Path(_run([*BUILDAH, "mount", container], "buildah mount").strip())
        site = sorted(mount.glob("opt/shoal/lib/python3*/site-packages"))
        if not site:
            raise PodmanError(f"{image} has no /opt/shoal venv")
        for folder in {p.split(".")[0] for p in package_folders(root)}:
            shutil.rmtree(site[0] / folder, ignore_errors=True)
        for path, target in _files(root, package_folders(root)):
            (site[0] / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, site[0] / target)
        _run([*BUILDAH, "umount", container], "buildah umount")
        _run([*BUILDAH, "config", "--label", f"{LABEL_SOURCE}={digest}", container], "buildah config")
        _run([*BUILDAH, "commit", "-q", container, tagged], f"buildah commit {tagged}")
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)
    return tagged


# -- containers ------------------------------------------------------------------------


def run(argv: list[str]) -> str:
    """Starts a container (``ContainerRun.argv``); returns its ID."""
    return _run(argv, "podman run").strip()


def exists(container: str) -> bool:
    return subprocess.run(["podman", *PODMAN_GLOBAL, "container", "exists", container],
                          capture_output=True).returncode == 0


def cluster_containers(cluster: str) -> list[str]:
    """IDs of every container, running or not, labelled with ``cluster``."""
    out = _run(["podman", *PODMAN_GLOBAL, "ps", "--all", "--quiet", "--no-trunc",
                "--filter", f"label={LABEL_CLUSTER}={cluster}"], "podman ps")
    return out.split()


def remove(container_ids: list[str], grace: int = 5) -> None:
    if container_ids:
        # --depend: a pod's containers go with the sandbox whose PID namespace they share.
        _run(["podman", *PODMAN_GLOBAL, "rm", "--force", "--depend", "--time", str(grace), *container_ids],
             "podman rm", timeout=60 + grace)


def inspect(container: str) -> dict[str, Any]:
    return json.loads(_run(["podman", *PODMAN_GLOBAL, "inspect", container], "podman inspect"))[0]


def logs(container: str) -> str:
    done = subprocess.run(["podman", *PODMAN_GLOBAL, "logs", container], capture_output=True, text=True)
    return done.stdout + done.stderr
