"""Conv + BatchNorm folding on a torch model (the reference's BN fusion before quantization).

With ``s = γ / sqrt(σ² + ε)`` per output channel, a BatchNorm after a conv folds into it:

    W' = W · s   (on the output-channel axis)        b' = (b − μ) · s + β

so the conv alone computes what conv + BN computed (in eval mode), and quantization sees the
weights the deployed model will use. The BN module is replaced by ``nn.Identity``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from amct_core.logger import get_logger
from amct_pytorch.module_tree import replace_submodule

LOGGER = get_logger("amct_pytorch")


@torch.no_grad()
def fold_batch_norm(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``conv`` (Conv1/2/3d or ConvTranspose2/3d) in place."""
    weight = conv.weight
    dtype = weight.dtype
    var = bn.running_var.to(torch.float64)
    mean = bn.running_mean.to(torch.float64)
    gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(mean)
    new_bias = (bias - mean) * scale + beta
    w64 = weight.to(torch.float64)
    spatial = (1,) * (w64.dim() - 2)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        # weight (Cin, Cout/g, k...): output channel of [i, j] is group(i)·Cout/g + j
        groups = conv.groups
        cin, cout_g = w64.shape[:2]
        grouped = w64.reshape(groups, cin // groups, cout_g, *w64.shape[2:])
        grouped = grouped * scale.reshape(groups, 1, cout_g, *spatial)
        w64 = grouped.reshape(w64.shape)
    else:
        w64 = w64 * scale.reshape(-1, 1, *spatial)
    conv.weight.copy_(w64.to(dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(dtype=dtype, device=weight.device))
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def fuse_conv_bn(model: nn.Module, pairs: Iterable[tuple[str, str]],
                 skip_fusion_layers: Iterable[str] = ()) -> list[str]:
    """Fold each (conv, bn) pair of ``model`` except convs in ``skip_fusion_layers``;
    return the names of the convs folded."""
    skip = set(skip_fusion_layers)
    fused = []
    for conv_name, bn_name in pairs:
        if conv_name in skip:
            LOGGER.info("Layer %s is in skip_fusion_layers, %s is not fused.", conv_name, bn_name)
            continue
        fold_batch_norm(model.get_submodule(conv_name), model.get_submodule(bn_name))
        replace_submodule(model, bn_name, nn.Identity())
        LOGGER.info("Fuse %s and %s.", conv_name, bn_name)
        fused.append(conv_name)
    return fused
