"""Tensor decomposition: spatial-separable SVD of conv kernels (reference §2).

One conv with kernel (Cout, Cin, KH, KW) becomes a KH×1 (or 1×KW) conv followed by a 1×KW
(or KH×1) conv through a rank-r SVD of the kernel's unfolding; the applicability rule decides
which convs are split and the EVBMF rank rule chooses r.
"""
from amct_core.decompose.applicability import DecomposeMode, select_mode
from amct_core.decompose.evbmf import evbmf_noise_variance, evbmf_rank
from amct_core.decompose.info_file import (
    ConvLayerInfo,
    DecomposeRecord,
    read_decompose_info,
    write_decompose_info,
)
from amct_core.decompose.rank import make_divisible, select_rank
from amct_core.decompose.spatial_svd import (
    SpatialSvdFactors,
    decompose_conv_weight,
    factor_shapes,
    factorize_kernel,
    split_conv_attributes,
    unfold_weight,
)

__all__ = [
    "ConvLayerInfo",
    "DecomposeMode",
    "DecomposeRecord",
    "SpatialSvdFactors",
    "decompose_conv_weight",
    "evbmf_noise_variance",
    "evbmf_rank",
    "factor_shapes",
    "factorize_kernel",
    "make_divisible",
    "read_decompose_info",
    "select_mode",
    "select_rank",
    "split_conv_attributes",
    "unfold_weight",
    "write_decompose_info",
]
