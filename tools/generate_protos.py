"""Regenerate the committed ``*_pb2.py`` modules of ``amct_core/proto`` from their ``.proto`` files.

Run from anywhere, with grpcio-tools installed (1.62.3, which bundles protoc 25; its modules
also load under protobuf 5, 6 and 7)::

    python tools/generate_protos.py            # rewrite the modules in the source tree
    python tools/generate_protos.py --check    # exit 1 if a committed module is out of date

protoc runs with ``-I packages/amct_core/src`` on ``amct_core/proto/<name>.proto``, so each file
registers in the descriptor pool under a name of its own (``amct_core/proto/<name>.proto``) and
cannot clash with another package's ``scale_offset_record.proto``. The modules get one line after
protoc's header, ``# ruff: noqa``: generated code is not held to the project's lint rules.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOT = ROOT / "packages" / "amct_core" / "src"
PROTO_PACKAGE = "amct_core/proto"
PROTO_NAMES = ("scale_offset_record", "calibration_config", "retrain_config")
#: The grpcio-tools release the committed modules come from (protoc 25.1).
PINNED_GRPCIO_TOOLS = "1.62.3"
NOQA_LINE = "# ruff: noqa\n"


def proto_files() -> list[str]:
    """The ``.proto`` files, as protoc sees them (relative to :data:`SOURCE_ROOT`)."""
    return [f"{PROTO_PACKAGE}/{name}.proto" for name in PROTO_NAMES]


def committed_modules() -> list[Path]:
    """The committed generated modules, in the order of :func:`proto_files`."""
    return [SOURCE_ROOT / PROTO_PACKAGE / f"{name}_pb2.py" for name in PROTO_NAMES]


def grpcio_tools_version() -> str | None:
    """The installed grpcio-tools version, or None when it is not installed."""
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_protoc(arguments: list[str]) -> None:
    from grpc_tools import protoc  # imported here: only this tool and its test need it

    status = protoc.main(["grpc_tools.protoc", f"-I{SOURCE_ROOT}", *arguments])
    if status != 0:
        raise RuntimeError(f"protoc failed (exit status {status}) on {', '.join(proto_files())}")


def _add_noqa(module: Path) -> None:
    """Put ``# ruff: noqa`` after the leading comment block that protoc writes."""
    lines = module.read_text(encoding="utf-8").splitlines(keepends=True)
    position = 0
    while position < len(lines) and lines[position].startswith("#"):
        position += 1
    lines.insert(position, NOQA_LINE)
    module.write_text("".join(lines), encoding="utf-8")


def generate(out_root: Path) -> list[Path]:
    """Generate the modules under ``out_root`` (as ``out_root/amct_core/proto/<name>_pb2.py``).

    Returns the generated files, in the order of :func:`proto_files`.
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    _run_protoc([f"--python_out={out_root}", *proto_files()])
    modules = [out_root / PROTO_PACKAGE / f"{name}_pb2.py" for name in PROTO_NAMES]
    for module in modules:
        _add_noqa(module)
    return modules


def descriptor_set(out_file: Path) -> bytes:
    """The serialized ``FileDescriptorSet`` protoc builds from the ``.proto`` files."""
    _run_protoc([f"--descriptor_set_out={out_file}", *proto_files()])
    return Path(out_file).read_bytes()


def stale_modules() -> list[Path]:
    """The committed modules that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as folder:
        fresh = generate(Path(folder))
        return [committed for committed, new in zip(committed_modules(), fresh, strict=True)
                if not committed.exists() or committed.read_bytes() != new.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only report modules that are out of date (exit status 1)")
    arguments = parser.parse_args(argv)
    version = grpcio_tools_version()
    if version is None:
        print("grpcio-tools is not installed: pip install grpcio-tools==" + PINNED_GRPCIO_TOOLS,
              file=sys.stderr)
        return 2
    if version != PINNED_GRPCIO_TOOLS:
        print(f"warning: grpcio-tools {version}; the committed modules come from "
              f"{PINNED_GRPCIO_TOOLS}", file=sys.stderr)
    if arguments.check:
        stale = stale_modules()
        for module in stale:
            print(f"out of date: {module.relative_to(ROOT)}")
        return 1 if stale else 0
    for module in generate(SOURCE_ROOT):
        print(f"wrote {module.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
