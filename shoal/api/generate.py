"""Regenerates every ``*_pb2.py`` / ``*_pb2_grpc.py`` from the ``.proto`` files under shoal/api.

Import paths are rooted at ``shoal/api``'s parent's parent (the repository), so a proto at
``shoal/api/flow/flow.proto`` generates ``shoal.api.flow.flow_pb2`` and imports of other protos
are written ``import "shoal/api/flow/flow.proto";``. Run: ``python -m shoal.api.generate``.
"""
from __future__ import annotations

import sys
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
ROOT = API_DIR.parent.parent


def proto_files() -> list[Path]:
    return sorted(API_DIR.rglob("*.proto"))


def generate() -> list[Path]:
    """Runs grpc_tools.protoc over every proto; returns the protos compiled."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    protos = proto_files()
    for proto in protos:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        # Every generated folder must be an importable package.
        folder = proto.parent
        while folder != API_DIR.parent:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated protobuf modules."""\n')
            folder = folder.parent
    return protos


def main() -> int:
    for proto in generate():
        print(f"generated {proto.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
