"""The Dockerfiles, checked by reading (fast; `make images` builds them: tests/shoal/local/test_containers.py)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.shoal.cli.deploy.deploybed import REPO

IMAGES = REPO / "images"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfiles() -> list[Path]:
    found = sorted(IMAGES.glob("*.Dockerfile"))
    assert {p.name for p in found} >= {"base.Dockerfile", "agent.Dockerfile", "controller.Dockerfile",
                                       "waypoint.Dockerfile"}
    return found


def test_every_file_a_dockerfile_copies_exists():
    for path in dockerfiles():
        for word, args in instructions(path):
            if word not in ("COPY", "ADD"):
                continue
            parts = shlex.split(args)
            if any(p.startswith("--from=") for p in parts):
                continue
            sources = [p for p in parts if not p.startswith("--")][:-1]
            assert sources, f"{path.name}: {word} {args}"
            for source in sources:
                assert (REPO / source).exists(), f"{path.name} copies {source}, which does not exist"


def test_every_package_folder_of_setup_py_is_copied():
    """pip install of the project needs every folder setup.py maps (see FOLDERS there)."""
    folders = set(re.findall(r'"shoal(?:\.\w+)?": "(\w+)"', (REPO / "setup.py").read_text()))
    assert folders
    for path in dockerfiles():
        if path.name == "base.Dockerfile":
            continue
        copied = {shlex.split(a)[0].rstrip("/") for w, a in instructions(path) if w == "COPY" and "--from" not in a}
        assert folders <= copied, f"{path.name} misses {folders - copied}"


def test_stages_are_multi_stage_and_reference_existing_stages():
    for path in dockerfiles():
        steps = instructions(path)
        stages = [a.split()[-1] for w, a in steps if w == "FROM" and " AS " in a.upper()]
        for _word, args in steps:
            for ref in re.findall(r"--from=(\S+)", args):
                assert ref in stages, f"{path.name}: --from={ref} names no stage"
        if path.name != "base.Dockerfile":
            assert sum(1 for w, _ in steps if w == "FROM") >= 2, f"{path.name} is not multi-stage"
            runtime = [a for w, a in steps if w == "CMD"]
            assert runtime and '"python", "-m", "shoal.' in runtime[-1], path.name


def test_agent_image_is_built_on_the_bcc_base():
    steps = dict((a.split("=")[0], a) for w, a in instructions(IMAGES / "agent.Dockerfile") if w == "ARG")
    assert "shoal-bcc-base" in steps["BCC_BASE"]
    assert [a for w, a in instructions(IMAGES / "agent.Dockerfile") if w == "FROM"][-1] == "${BCC_BASE}"
    base = (IMAGES / "base.Dockerfile").read_text()
    assert "python3-bpfcc" in base and "libbpfcc" in base
    for name in ("controller", "waypoint"):
        assert "bpfcc" not in (IMAGES / f"{name}.Dockerfile").read_text(), f"{name} needs no bcc"


def test_build_script_builds_every_dockerfile():
    script = (IMAGES / "build.sh").read_text()
    local = (IMAGES / "build-local.sh").read_text()
    for path in dockerfiles():
        assert f"images/{path.name}" in script, path.name
        assert f"images/{path.name}" in local, path.name
    assert '"BCC_BASE=' in script
