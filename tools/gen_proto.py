"""Regenerate skyshift/v1 from proto/skyshift/v1/*.proto.

    python -m tools.gen_proto          # write the generated code
    python -m tools.gen_proto --check  # exit 1 if the committed code is stale (CI)
"""
import argparse
import filecmp
import pathlib
import sys
import tempfile

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = pathlib.Path("skyshift") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: pathlib.Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / OUT_PACKAGE).glob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: pathlib.Path) -> dict:
    folder = root / OUT_PACKAGE
    return {p.name: p for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES)} if folder.exists() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    options = parser.parse_args()
    if not options.check:
        for stale in generated_files(ROOT).values():
            stale.unlink()
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = pathlib.Path(tmp)
        generate(fresh_root)
        fresh, committed = generated_files(fresh_root), generated_files(ROOT)
        stale = sorted(set(fresh) ^ set(committed)) + sorted(
            name for name in set(fresh) & set(committed)
            if not filecmp.cmp(fresh[name], committed[name], shallow=False)
        )
        if stale:
            print("generated code is stale, run `python -m tools.gen_proto`: " + ", ".join(stale))
            return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
