"""The protobuf schemas of the toolkit's text-format files (reference §3.2, §3.3).

* ``scale_offset_record.proto`` (:mod:`amct_core.proto.scale_offset_record_pb2`): the
  quantization record file, ``ScaleOffsetRecord``.
* ``calibration_config.proto`` (:mod:`amct_core.proto.calibration_config_pb2`): the simple PTQ
  config (``.cfg``), ``AMCTConfig``.
* ``retrain_config.proto`` (:mod:`amct_core.proto.retrain_config_pb2`): the simple
  quantization-aware-training config (``.cfg``), ``AMCTRetrainConfig``.

The ``*_pb2.py`` modules are generated and committed; ``tools/generate_protos.py`` regenerates
them and ``tests/core/test_protos_in_sync.py`` checks that they match the ``.proto`` files.
"""
from amct_core.proto import calibration_config_pb2, retrain_config_pb2, scale_offset_record_pb2

__all__ = ["calibration_config_pb2", "retrain_config_pb2", "scale_offset_record_pb2"]
