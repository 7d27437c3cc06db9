"""Source images (``<image>-src<hash>``): a checkout's code layered on the built image, made
under a machine-wide lock, refused when the image lacks a dependency, and pruned once no
container runs them and nobody asked for them recently.

The pruning test makes its own tiny images (``buildah from scratch``) in a repository of its
own and prunes only that repository: it never touches the images of `make images` or another
helper's cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from shoal.local import podman
from shoal.local.containers import PODMAN_GLOBAL


def test_a_dependency_missing_from_the_image_is_named(tmp_path):
    root, site = tmp_path / "checkout", tmp_path / "site"
    root.mkdir()
    site.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = [\n'
                                         '  "grpcio>=1.60", "google-re2>=1.1", "httptools>=0.9",\n'
                                         '  "PyYAML[extra]>=6 ; python_version > \'3\'",\n]\n')
    for dist in ("grpcio-1.70.0.dist-info", "google_re2-1.1.dist-info", "pyyaml-6.0.2.dist-info"):
        (site / dist).mkdir()
    assert podman.missing_dependencies(root, site) == ["httptools"]
    (site / "httptools-0.9.dist-info").mkdir()
    assert podman.missing_dependencies(root, site) == []


def _need_podman():
    if os.geteuid() != 0:
        pytest.skip("needs root (podman)")
    missing = podman.available()
    if missing:
        pytest.skip(missing)


def _tiny_image(repository: str, digest: str) -> str:
    """An empty image carrying the source-hash label, as ``source_image`` makes them."""
    ctr = subprocess.run([*podman.BUILDAH, "from", "scratch"], check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run([*podman.BUILDAH, "config", "--label", f"{podman.LABEL_SOURCE}={digest}", ctr],
                       check=True, capture_output=True)
        tag = f"{repository}:0.1.0-src{digest}"
        subprocess.run([*podman.BUILDAH, "commit", "-q", ctr, tag], check=True, capture_output=True)
    finally:
        subprocess.run([*podman.BUILDAH, "rm", ctr], capture_output=True)
    return tag


def test_unused_source_images_are_pruned_and_used_or_recent_ones_kept(tmp_path):
    _need_podman()
    repository = f"localhost/shoal-prunetest-{os.getpid()}"
    run = f"{os.getpid()}{time.monotonic_ns() % 10**6}"
    digests = {name: f"{name}{run}"[:12] for name in ("used", "recent", "old", "never")}
    tags = {name: _tiny_image(repository, digest) for name, digest in digests.items()}
    container = f"shoal-prunetest-{run}"
    now = time.time() + 2 * podman.PRUNE_GRACE   # as if made long ago: their creation counts as a use
    try:
        # A container (created, never started) holds "used"; "recent" was asked for a minute ago.
        subprocess.run(["podman", *PODMAN_GLOBAL, "create", "--name", container, tags["used"], "/none"],
                       check=True, capture_output=True)
        (tmp_path / "source-images.json").write_text(json.dumps({
            digests["used"]: now - 10 * podman.PRUNE_GRACE, digests["recent"]: now - 60,
            digests["old"]: now - 2 * podman.PRUNE_GRACE}))
        with podman.build_lock(tmp_path):
            removed = podman.prune_source_images(tmp_path, now=now, repositories=[repository])
        assert sorted(removed) == sorted([tags["old"], tags["never"]])
        # Just made (by a checkout that records no use): kept.
        fresh = _tiny_image(repository, f"fresh{run}"[:12])
        tags["fresh"] = fresh
        assert podman.prune_source_images(tmp_path, now=time.time(), repositories=[repository]) == []
        assert [podman.image_exists(tags[n]) for n in ("used", "recent", "old", "never")] == [True, True, False, False]
        # The record forgets the hashes whose images are gone.
        assert set(json.loads((tmp_path / "source-images.json").read_text())) == {digests["used"], digests["recent"]}
        # Once the container goes and the grace passes, the others go too.
        podman.remove_named([container])
        later = now + 2 * podman.PRUNE_GRACE
        assert sorted(podman.prune_source_images(tmp_path, now=later, repositories=[repository])) == sorted(
            [tags["used"], tags["recent"], tags["fresh"]])
    finally:
        podman.remove_named([container])
        for tag in tags.values():
            subprocess.run(["podman", *PODMAN_GLOBAL, "rmi", "--ignore", tag], capture_output=True)


def test_the_build_lock_is_exclusive_across_processes(tmp_path):
    """Two `shoal up` on one machine never build or prune at the same time."""
    script = ("import sys, time; from pathlib import Path; from shoal.local import podman\n"
              "with podman.build_lock(Path(sys.argv[1])):\n"
              "    print('locked', flush=True); time.sleep(1.5)\n")
    first = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with podman.build_lock(tmp_path):
            waited = time.monotonic() - started
    finally:
        first.wait(timeout=10)
    assert waited > 0.8, f"the lock was taken while another process held it (waited {waited:.2f}s)"


def _checkout(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "setup.py").write_text('FOLDERS = {"shoal.pkg": "pkg"}\n')
    (root / "pkg" / "__init__.py").write_text("VERSION = 1\n")
    (root / "pkg" / "sub" / "mod.py").write_text("X = 1\n")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")


def test_a_source_image_leaves_out_the_extensions_compiled_beside_the_sources(tmp_path):
    """An editable install compiles the hot path beside its sources (mypyc shims into the
    ``shoal__mypyc`` runtime at the top of site-packages). Copied into an image whose runtime
    was built from older code, the waypoint failed to import its new compiled module; and
    its old compiled modules would have run the image's code, not the checkout's. The
    image's own extensions go with its package folder, so the checkout's code runs there,
    interpreted."""
    root, site = tmp_path / "checkout", tmp_path / "site"
    _checkout(root)
    (root / "pkg" / "sub" / "mod.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF host build")
    (site / "shoal" / "pkg" / "sub").mkdir(parents=True)
    (site / "shoal" / "pkg" / "sub" / "mod.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF image build")
    podman.snapshot_sources(root).install(site)
    assert _tree(site) == {"shoal/pkg/__init__.py": b"VERSION = 1\n", "shoal/pkg/sub/mod.py": b"X = 1\n"}


def _tree(site) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def test_the_image_gets_the_bytes_its_tag_was_computed_from_even_if_sources_change_mid_build(tmp_path):
    """The tag was the hash of the files read at one time and the layer copied them again
    later: an edit in between put other code under the tag (and the controller's and the
    waypoint's images, hashed again, could get another tag than the rendered one)."""
    root, site = tmp_path / "checkout", tmp_path / "site"
    _checkout(root)
    sources = podman.snapshot_sources(root)
    (root / "pkg" / "sub" / "mod.py").write_text("X = 2  # edited mid-build\n")
    (root / "pkg" / "new.py").write_text("Y = 1\n")
    (site / "shoal" / "pkg").mkdir(parents=True)
    (site / "shoal" / "pkg" / "stale.py").write_text("old\n")
    sources.install(site)
    installed = _tree(site)
    assert installed == {"shoal/pkg/__init__.py": b"VERSION = 1\n", "shoal/pkg/sub/mod.py": b"X = 1\n"}
    # The tag names what went in; the edited checkout hashes to another tag.
    rehashed = podman.SourceSnapshot(root, sources.folders, tuple(sorted(installed.items())))
    assert rehashed.digest == sources.digest != podman.snapshot_sources(root).digest
