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
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from shoal.local.containers import PODMAN_GLOBAL
from shoal.local.linux import Cgroup

LABEL_CLUSTER = "shoal.io/cluster"
LABEL_SOURCE = "shoal.io/source-hash"
LABEL_BASE = "shoal.io/base-image"     # the image ID a source image was layered on
# A source image asked for this recently is kept even if no container runs it yet.
PRUNE_GRACE = 900.0
log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class SourceSnapshot:
    """The checkout's packaged files, read once. The tag is the hash of exactly these bytes
    and these bytes go into the image: reading the files again to copy them would let an
    edit made mid-build (an editor, ``git checkout``) put other code under the same tag."""

    root: Path                                   # the checkout (its pyproject.toml: dependencies)
    folders: dict[str, str]                      # setup.py's FOLDERS (package -> folder)
    files: tuple[tuple[str, bytes], ...]         # (path below site-packages, content), sorted

    @property
    def digest(self) -> str:
        digest = hashlib.sha256()
        for target, content in self.files:
            digest.update(target.encode() + b"\0" + content + b"\0")
        return digest.hexdigest()[:12]

    def install(self, site: Path) -> None:
        """Replaces the packages' folders in ``site`` with the snapshot's files."""
        for folder in {p.split(".")[0] for p in self.folders}:
            shutil.rmtree(site / folder, ignore_errors=True)
        for target, content in self.files:
            (site / target).parent.mkdir(parents=True, exist_ok=True)
            (site / target).write_bytes(content)


def snapshot_sources(root: Path) -> SourceSnapshot:
    """Every packaged file of the checkout at ``root`` (no caches), read now. Not the
    extensions an editable install compiled beside the sources (mypyc, pyproject's
    [tool.shoal] compiled): they are built for this host's Python, which need not be the
    image's, and each is a shim into the ``shoal__mypyc`` runtime outside the packages,
    which stays the image's own. Beside that older runtime they failed to import (or would
    run the image's compiled code, not the checkout's). In a source image the hot path
    runs interpreted, the checkout's code; ``make images`` builds it compiled."""
    folders = package_folders(root)
    found = []
    for package, folder in folders.items():
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
                found.append((f"{package.replace('.', '/')}/{path.relative_to(root / folder)}", path.read_bytes()))
    return SourceSnapshot(root, folders, tuple(sorted(found)))


def missing_dependencies(root: Path, site: Path) -> list[str]:
    """The checkout's ``[project] dependencies`` that no distribution in ``site`` provides."""
    import tomllib
    wanted = tomllib.loads((root / "pyproject.toml").read_text())["project"].get("dependencies", [])
    installed = {_normal(path.name.split("-", 1)[0]) for path in site.glob("*.dist-info")}
    names = [re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0] for spec in wanted]
    return [name for name in names if _normal(name) not in installed]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def image_state_dir() -> Path:
    """Where ``make images`` caches its base, and where source images are locked and tracked."""
    return Path(os.environ.get("SHOAL_IMAGE_STATE", "/var/lib/shoal/images"))


@contextlib.contextmanager
def build_lock(state: Path) -> Iterator[None]:
    """One source-image build or prune at a time on this machine (every cluster, every checkout)."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "source-images.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def image_id(image: str) -> str | None:
    done = subprocess.run(["podman", *PODMAN_GLOBAL, "image", "inspect", "--format", "{{.Id}}", image],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def source_image(image: str, sources: SourceSnapshot, state: Path | None = None) -> str:
    """``image`` with the ``sources``' packages in place of the venv's: ``<image>-src<hash>``,
    made once per base image (a rebuilt ``image`` gets a new layer), then unused old ones are
    pruned. One snapshot for every image of a cluster gives them one tag."""
    state = state or image_state_dir()
    digest = sources.digest
    tagged = f"{image}-src{digest}"
    with build_lock(state):
        base = image_id(image)
        if base is None:
            raise PodmanError(f"image {image} is not built: run `make images`")
        labels = images(f"reference={tagged}")
        if not labels or (labels[0].get("Labels") or {}).get(LABEL_BASE) != base:
            _build_source_image(image, base, sources, tagged)
        _record_use(state, digest)
        pruned = prune_source_images(state)
        if pruned:
            log.info("pruned %d unused source image(s): %s", len(pruned), ", ".join(pruned))
    return tagged


def _build_source_image(image: str, base: str, sources: SourceSnapshot, tagged: str) -> None:
    container = _run([*BUILDAH, "from", "--pull=never", image], f"buildah from {image}").strip()
    try:
        mount = Path(_run([*BUILDAH, "mount", container], "buildah mount").strip())
        site = sorted(mount.glob("opt/shoal/lib/python3*/site-packages"))
        if not site:
            raise PodmanError(f"{image} has no /opt/shoal venv")
        missing = missing_dependencies(sources.root, site[0])
        if missing:
            raise PodmanError(f"{image} was built before this checkout needed {', '.join(missing)}: "
                              "run `make images` (the source layer adds code, never dependencies)")
        sources.install(site[0])
        _run([*BUILDAH, "umount", container], "buildah umount")
        _run([*BUILDAH, "config", "--label", f"{LABEL_SOURCE}={sources.digest}", "--label", f"{LABEL_BASE}={base}",
              container], "buildah config")
        _run([*BUILDAH, "commit", "-q", container, tagged], f"buildah commit {tagged}")
    finally:
        subprocess.run([*BUILDAH, "rm", container], capture_output=True)


def images(*filters: str) -> list[dict[str, Any]]:
    """``podman images`` as JSON (Id, Names, Labels, Created...), with ``--filter``s."""
    argv = ["podman", *PODMAN_GLOBAL, "images", "--format", "json"]
    for value in filters:
        argv += ["--filter", value]
    return json.loads(_run(argv, "podman images") or "[]")


def _uses_path(state: Path) -> Path:
    return state / "source-images.json"


def _record_use(state: Path, digest: str, now: float | None = None) -> None:
    """When each source hash was last asked for (under the build lock)."""
    _write_uses(state, {**_read_uses(state), digest: time.time() if now is None else now})


def _write_uses(state: Path, uses: dict[str, float]) -> None:
    staged = _uses_path(state).with_suffix(".tmp")
    staged.write_text(json.dumps(uses))
    os.replace(staged, _uses_path(state))


def _read_uses(state: Path) -> dict[str, float]:
    try:
        raw = json.loads(_uses_path(state).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        log.warning("%s is unreadable (%s): every source image counts as unused", _uses_path(state), err)
        return {}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float))} if isinstance(raw, dict) else {}


def prune_source_images(state: Path, grace: float = PRUNE_GRACE, now: float | None = None,
                        repositories: Iterable[str] | None = None) -> list[str]:
    """Removes source images (label ``shoal.io/source-hash``) that no container uses, running
    or not, and whose hash nobody asked for within ``grace`` seconds; returns what went.

    Call it under ``build_lock``. A hash stays while any container runs an image of it: one
    cluster's controller, agents and waypoints share one hash, so a live cluster's waypoint
    image, started only when a Gateway comes, stays too. The grace covers a cluster that got
    its image and has not started a container yet. ``repositories`` narrows it (tests)."""
    now = time.time() if now is None else now
    uses = _read_uses(state)
    used_ids = set(_run(["podman", *PODMAN_GLOBAL, "ps", "--all", "--no-trunc", "--format", "{{.ImageID}}"],
                        "podman ps").split())
    found = images(f"label={LABEL_SOURCE}")
    in_use = {(i.get("Labels") or {}).get(LABEL_SOURCE) for i in found if i["Id"] in used_ids}
    wanted = set(repositories) if repositories is not None else None
    removed = []
    for image in found:
        digest = (image.get("Labels") or {}).get(LABEL_SOURCE)
        names = image.get("Names") or []
        if wanted is not None and not any(name.rsplit(":", 1)[0] in wanted for name in names):
            continue
        # Recently asked for, or made (a checkout without this record made it), counts as in use.
        if digest in in_use or now - max(uses.get(digest, 0.0), float(image.get("Created") or 0)) < grace:
            continue
        # By name: removing a name never takes a container with it (rmi --force would).
        for target in names or [image["Id"]]:
            done = subprocess.run(["podman", *PODMAN_GLOBAL, "rmi", target], capture_output=True, text=True)
            if done.returncode == 0:
                removed.append(target)
            else:
                log.warning("source image %s not pruned: %s", target, done.stderr.strip()[-300:])
    if removed:   # forget hashes that have no image left
        left = {(i.get("Labels") or {}).get(LABEL_SOURCE) for i in images(f"label={LABEL_SOURCE}")}
        _write_uses(state, {d: t for d, t in uses.items() if d in left or now - t < grace})
    return removed


# -- containers ------------------------------------------------------------------------


def run(argv: list[str]) -> str:
    """Starts a container (``ContainerRun.argv``); returns its ID."""
    return _run(argv, "podman run").strip()


def exists(container: str) -> bool:
    return subprocess.run(["podman", *PODMAN_GLOBAL, "container", "exists", container],
                          capture_output=True).returncode == 0


def cluster_containers(cluster: str, labels: dict[str, str] | None = None, running: bool = False) -> list[str]:
    """IDs of every container (``running``: of the running ones) labelled with ``cluster``
    (and ``labels``)."""
    filters = [flag for key, value in {LABEL_CLUSTER: cluster, **(labels or {})}.items()
               for flag in ("--filter", f"label={key}={value}")]
    out = _run(["podman", *PODMAN_GLOBAL, "ps", *(() if running else ("--all",)), "--quiet", "--no-trunc",
                *filters], "podman ps")
    return out.split()


def remove(container_ids: list[str], grace: int = 5) -> None:
    if container_ids:
        # --depend: a pod's containers go with the sandbox whose PID namespace they share.
        _run(["podman", *PODMAN_GLOBAL, "rm", "--force", "--depend", "--time", str(grace), *container_ids],
             "podman rm", timeout=60 + grace)


def remove_named(names: list[str], grace: int = 5) -> None:
    """Removes the containers of these names that exist (the others are no error)."""
    if names:
        _run(["podman", *PODMAN_GLOBAL, "rm", "--force", "--ignore", "--time", str(grace), *names], "podman rm",
             timeout=60 + grace)


def remove_v1_mirrors(unified_root: Path, pattern: str) -> None:
    """runc with cgroupfs on a hybrid host makes a ``--cgroup-parent`` folder in every cgroup v1
    hierarchy as well as in the unified one, and leaves it when the container goes: removes
    those matching ``pattern`` (a glob relative to the unified root), deepest first."""
    if unified_root.name != "unified":   # a pure cgroup v2 host has no v1 hierarchies
        return
    for hierarchy in unified_root.parent.iterdir():
        if hierarchy != unified_root and hierarchy.is_dir() and not hierarchy.is_symlink():
            for mirror in hierarchy.glob(pattern):
                Cgroup(mirror).remove()


def wait_stopped(container: str, timeout: float) -> bool:
    """True once ``container`` has exited (within ``timeout`` seconds)."""
    try:
        subprocess.run(["podman", *PODMAN_GLOBAL, "wait", "--condition", "stopped", container],
                       capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return inspect(container)["State"]["Status"] in ("exited", "stopped")


def kill(container: str) -> None:
    """SIGKILL, as the kubelet does once the termination grace has passed."""
    subprocess.run(["podman", *PODMAN_GLOBAL, "kill", "--signal", "KILL", container], capture_output=True)


def start(container: str) -> None:
    """Starts an exited container again, as it was created (the kubelet's restart)."""
    _run(["podman", *PODMAN_GLOBAL, "start", container], "podman start")


def rename(container: str, new_name: str) -> None:
    _run(["podman", *PODMAN_GLOBAL, "rename", container, new_name], "podman rename")


def inspect(container: str) -> dict[str, Any]:
    return json.loads(_run(["podman", *PODMAN_GLOBAL, "inspect", container], "podman inspect"))[0]


# A line of the CRI log format that podman's k8s-file driver writes (what `shoal logs` reads
# for containers): "<RFC 3339 time> <stdout|stderr> <P|F> <message>"; P: the message goes on
# in the next line (a long line split), F: it ends here.
_CRI_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d) (?:stdout|stderr) ([PF]) (.*)$")


def log_messages(lines: Iterable[str]) -> Iterator[str]:
    """A container log's messages as ``kubectl logs`` shows them: without the CRI prefix, the
    parts of a split line joined. Other lines (a host process's own log) pass unchanged."""
    partial: list[str] = []
    for line in lines:
        cri = _CRI_LINE.match(line.rstrip("\n"))
        if cri is None:
            if partial:
                yield "".join(partial)
                partial = []
            yield line.rstrip("\n")
            continue
        partial.append(cri.group(2))
        if cri.group(1) == "F":
            yield "".join(partial)
            partial = []
    if partial:
        yield "".join(partial)


def logs(container: str) -> str:
    done = subprocess.run(["podman", *PODMAN_GLOBAL, "logs", container], capture_output=True, text=True)
    return done.stdout + done.stderr
