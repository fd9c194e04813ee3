"""Regenerate netforge/proto/netforge_pb2.py from proto/netforge.proto.

Needs grpcio-tools (the test extra installs it). The generated module is committed so that a
plain `pip install` works without a protobuf compiler; tests/test_schema.py fails when the
committed module no longer matches the .proto file.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "netforge.proto"
TARGET = ROOT / "netforge" / "proto" / "netforge_pb2.py"


def generate(out_dir: Path) -> Path:
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out_dir}", str(PROTO)])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return out_dir / "netforge_pb2.py"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        TARGET.write_bytes(generate(Path(tmp)).read_bytes())
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
