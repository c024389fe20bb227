"""Regenerate the committed protobuf/gRPC Python code and mypy stubs (`make proto`).

Both CRI v1 and the agent API go to guest-agent/criv_agent/api/: the agent runs in the
guest without criv and takes CRI configs verbatim, and one generated copy per process
avoids duplicate descriptors in host mode (criv imports it from there). protoc emits
absolute imports named after the proto path (``from runtime.v1 import ...``); they are
rewritten to the package they live in.
``--out DIR`` writes both trees under DIR instead (the staleness test uses it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [
    # (proto file relative to proto/, output package dir relative to ROOT, import prefix)
    ("runtime/v1/api.proto", "guest-agent/criv_agent/api", "criv_agent.api"),
    ("agent/v1/agent.proto", "guest-agent/criv_agent/api", "criv_agent.api"),
]


def _generate(proto: str, out: Path, prefix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bindir = Path(sys.executable).parent
        args = [
            "protoc",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            str(ROOT / "proto" / proto),
        ]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed for {proto}")
        for f in sorted(Path(tmp).rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(tmp)
            text = f.read_text()
            for pkg in ("runtime", "agent"):
                text = re.sub(rf"^(from|import) {pkg}\.", rf"\1 {prefix}.{pkg}.", text, flags=re.M)
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        # every directory on the way is a package
        d = out / Path(proto).parent
        while True:
            (d / "__init__.py").touch()
            if d == out:
                break
            d = d.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="write under this directory instead of the tree")
    ns = ap.parse_args()
    for proto, pkg_dir, prefix in TARGETS:
        if not (ROOT / "proto" / proto).exists():
            continue
        base = (ns.out / pkg_dir) if ns.out else (ROOT / pkg_dir)
        if ns.out is None:
            gen_top = base / proto.split("/")[0]
            shutil.rmtree(gen_top, ignore_errors=True)
        _generate(proto, base, prefix)


if __name__ == "__main__":
    main()
