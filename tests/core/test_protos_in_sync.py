"""The committed ``amct_core/proto/*_pb2.py`` modules match their ``.proto`` files.

Regenerating needs grpcio-tools (its protoc); the pinned test environment has it. The
byte-for-byte comparison holds for the grpcio-tools release the modules come from; the schema
comparison (protoc's descriptors against the ones the modules register) holds for any release.
"""
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from amct_core.proto import calibration_config_pb2, retrain_config_pb2, scale_offset_record_pb2

pytest.importorskip("grpc_tools.protoc",
                    reason="grpcio-tools is not installed: it provides protoc, which "
                           "regenerates the modules to compare")

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"amct_core/proto/scale_offset_record.proto": scale_offset_record_pb2,
           "amct_core/proto/calibration_config.proto": calibration_config_pb2,
           "amct_core/proto/retrain_config.proto": retrain_config_pb2}


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate_protos",
                                                  ROOT / "tools" / "generate_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()


def test_committed_modules_equal_a_fresh_generation(tmp_path):
    version = generator.grpcio_tools_version()
    if version != generator.PINNED_GRPCIO_TOOLS:
        pytest.skip(f"grpcio-tools {version} writes other bytes than "
                    f"{generator.PINNED_GRPCIO_TOOLS}, which generated the committed modules; "
                    f"the schema test below still compares the descriptors")
    fresh = generator.generate(tmp_path)
    for committed, new in zip(generator.committed_modules(), fresh, strict=True):
        assert committed.read_bytes() == new.read_bytes(), (
            f"{committed.relative_to(ROOT)} is out of date: run python tools/generate_protos.py")


_REAL = (descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
         descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT)


def _normalized(messages) -> None:
    """Make two descriptors of one schema comparable: protoc's descriptor sets carry
    ``json_name`` (Python gencode leaves it out) and write real defaults in the shortest form
    (gencode with 17 digits)."""
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
            if field.type in _REAL and field.HasField("default_value"):
                field.default_value = repr(float(field.default_value))
        _normalized(message.nested_type)


def test_committed_modules_register_the_schema_of_the_proto_files(tmp_path):
    built = descriptor_pb2.FileDescriptorSet.FromString(
        generator.descriptor_set(tmp_path / "protos.desc"))
    for file in built.file:
        _normalized(file.message_type)
    by_name = {file.name: file for file in built.file}
    assert set(by_name) == set(MODULES)
    for name, module in MODULES.items():
        registered = descriptor_pb2.FileDescriptorProto.FromString(
            module.DESCRIPTOR.serialized_pb)
        _normalized(registered.message_type)
        assert registered == by_name[name], (
            f"{module.__name__} does not match {name}: run python tools/generate_protos.py")


def test_file_names_and_packages_are_our_own():
    assert scale_offset_record_pb2.DESCRIPTOR.name == "amct_core/proto/scale_offset_record.proto"
    assert scale_offset_record_pb2.DESCRIPTOR.package == "amct_core.record"
    assert calibration_config_pb2.DESCRIPTOR.name == "amct_core/proto/calibration_config.proto"
    assert calibration_config_pb2.DESCRIPTOR.package == "amct_core.config"


def test_generated_modules_are_exempt_from_lint():
    for module in generator.committed_modules():
        head = module.read_text(encoding="utf-8").splitlines()[:8]
        assert generator.NOQA_LINE.strip() in head
        assert any(line.startswith("# source: amct_core/proto/") for line in head)


def test_check_mode_reports_up_to_date(capsys):
    if generator.grpcio_tools_version() != generator.PINNED_GRPCIO_TOOLS:
        pytest.skip("byte comparison needs the pinned grpcio-tools "
                    f"{generator.PINNED_GRPCIO_TOOLS}")
    assert generator.main(["--check"]) == 0
    assert "out of date" not in capsys.readouterr().out
