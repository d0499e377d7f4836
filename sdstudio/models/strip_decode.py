"""The VAE decoder's up path in strips of rows: the same arithmetic as diffusers' forward, in less memory.

diffusers' ResnetBlock2D holds GroupNorm → SiLU → convolution as full-size tensors next to the block's input, and
Upsample2D the 4× larger nearest-upsampled input before its convolution; at full resolution those are the peak of a
whole txt2img run. Here each GroupNorm's statistics come from its whole input first (exact but for the order of a
sum), then normalisation, activation and upsampling run on a strip of rows (plus the convolution's halo) just before
the convolution that consumes it, writing into one preallocated output; in bf16 on the CPU, convolutions wide
enough run by Winograd (models/winograd.py: 512² decode 6.5 → 5.2 s). Modules of another shape (a time embedding,
other convolutions) run their own forward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from sdstudio.models.half_weights import weight_for
from sdstudio.models.memory import return_freed_heap
from sdstudio.models.native import release_kernel_buffers
from sdstudio.models.winograd import winograd_applies, winograd_conv2d

STRIP_ELEMENTS = 1 << 21   # values per strip (channels × rows × width): 4 MiB temporaries in bf16 (measured: 8 MiB
                           # strips peaked 63 MiB higher at 512², 1 MiB ones 6 MiB lower)

Rows = Callable[[int, int], torch.Tensor]   # rows [a, b) of a convolution's input, made on demand


def up_path_in_strips(decoder: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """diffusers' Decoder.forward after its mid block (up blocks, output norm, activation, convolution) in strips."""
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            features = _resnet(resnet, features) if _plain_resnet(resnet) else resnet(features, None)
        for upsampler in block.upsamplers or []:
            features = _upsample(upsampler, features) if _plain_upsampler(upsampler) else upsampler(features)
        release_kernel_buffers()   # neither they nor the level's freed activations go on into the next, larger
        return_freed_heap()          # level, where the decode's memory peaks (512²: −0.05 GiB with Winograd)
    norm, act, conv = decoder.conv_norm_out, decoder.conv_act, decoder.conv_out
    if isinstance(norm, torch.nn.GroupNorm) and _plain_conv(conv):
        return _convolve(_normalised(features, norm, act), features.shape[2], _row_elements(features), conv)
    return conv(act(norm(features)))


def group_normalise(values: torch.Tensor, norm: torch.nn.GroupNorm,
                    statistics: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """norm(values) with the given group statistics (mean, variance, each (B, groups)) instead of values' own: an
    inference batch norm per image (one pass; fp32 parameters, values' dtype and layout out)."""
    repeat = values.shape[1] // norm.num_groups
    mean, variance = (s.float().repeat_interleave(repeat, dim=1) for s in statistics)
    weight, bias = (norm.weight.float(), norm.bias.float()) if norm.affine else (None, None)
    images = [F.batch_norm(values[i:i + 1], mean[i], variance[i], weight, bias, False, 0.0, norm.eps)
              for i in range(values.shape[0])]
    return images[0] if len(images) == 1 else torch.cat(images)


def group_statistics(values: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of each channel group of `values` (B,C,H,…), in fp32, from strips of rows (so no
    full-size copy is made): each strip's own group statistics, combined as a mixture of equal-width parts."""
    channels = values.shape[1]
    ones = torch.ones(channels, device=values.device)   # fp32 parameters: fp32 statistics out
    zeros = torch.zeros(channels, device=values.device)
    # the kernel wants a dense strip: in either layout on the CPU, in the default one on CUDA
    channels_last = (values.device.type == "cpu" and values.ndim == 4
                     and values.is_contiguous(memory_format=torch.channels_last))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    means, variances, rows = [], [], []
    for top, bottom in _strips(values):
        strip = values[:, :, top:bottom].contiguous(memory_format=layout)
        if strip.stride(0) < strip[0].numel():   # a size-1 batch with an odd stride: the kernel refuses it
            strip = strip.clone(memory_format=layout)
        if strip.device.type != "cpu":   # only the CPU kernel takes half-precision values with fp32 parameters
            strip = strip.float()
        _, mean, rstd = torch.ops.aten.native_group_norm(strip, ones, zeros, strip.shape[0], channels,
                                                         strip[0, 0].numel(), groups, 0.0)
        means.append(mean.float())
        variances.append(rstd.double().pow(-2).float())   # eps 0: rstd = variance^-½ (inf → 0 for a flat group)
        rows.append(bottom - top)
    weights = torch.tensor(rows, dtype=torch.float32, device=values.device) / values.shape[2]
    means, variances = torch.stack(means, -1), torch.stack(variances, -1)
    mean = (means * weights).sum(-1)
    return mean, ((variances + (means - mean[..., None]).square()) * weights).sum(-1)


def _strips(values: torch.Tensor) -> list[tuple[int, int]]:
    return _row_spans(values.shape[2], _row_elements(values))


def _row_elements(values: torch.Tensor) -> int:
    return values[:, :, :1].numel()


def _row_spans(height: int, row_elements: int) -> list[tuple[int, int]]:
    """[top, bottom) of strips of at most STRIP_ELEMENTS values covering `height` rows."""
    rows = max(1, STRIP_ELEMENTS // max(row_elements, 1))
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def _normalised(x: torch.Tensor, norm: torch.nn.GroupNorm, act: Callable) -> Rows:
    """Rows of act(norm(x)), normalised with x's whole statistics, or the whole image's where the decode runs in
    tiles that share them (the norm's `shared_statistics`: models/vae.py)."""
    shared = getattr(norm, "shared_statistics", None)
    statistics = group_statistics(x, norm.num_groups) if shared is None else shared(x)
    return lambda a, b: act(group_normalise(x[:, :, a:b], norm, statistics))


def _convolve(rows_of: Rows, height: int, row_elements: int, conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv (k×k, stride 1, 'same' zero padding) of the `height`-row image that `rows_of` yields, one strip of output
    rows at a time, each from its input rows plus the kernel's halo."""
    halo = conv.kernel_size[0] // 2
    out = None
    for top, bottom in _row_spans(height, row_elements):
        first, last = max(top - halo, 0), min(bottom + halo, height)
        piece = rows_of(first, last)
        edges = (halo - (top - first), halo - (last - bottom))   # zero rows beyond the image's top and bottom
        if any(edges):
            piece = F.pad(piece, (0, 0, *edges))
        if winograd_applies(conv, piece):
            result = winograd_conv2d(piece, conv.weight, conv.bias, row_padding=0)
        else:
            result = F.conv2d(piece, weight_for(conv, piece), conv.bias, padding=(0, halo))
        if out is None:
            out = torch.empty(result.shape[0], result.shape[1], height, result.shape[3], dtype=result.dtype,
                              device=result.device, memory_format=torch.channels_last)
        out[:, :, top:bottom] = result
    return out


def _resnet(resnet: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
    hidden = _convolve(_normalised(x, resnet.norm1, resnet.nonlinearity), x.shape[2], _row_elements(x), resnet.conv1)
    out = _convolve(_normalised(hidden, resnet.norm2, resnet.nonlinearity), hidden.shape[2], _row_elements(hidden),
                    resnet.conv2)
    del hidden
    for top, bottom in _strips(x):
        shortcut = x[:, :, top:bottom]
        if resnet.conv_shortcut is not None:
            shortcut = resnet.conv_shortcut(shortcut)
        out[:, :, top:bottom].add_(shortcut).div_(resnet.output_scale_factor)
    return out


def _upsample(upsampler: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    """Nearest 2× then the convolution: upsampled row y is x's row y // 2."""
    def rows_of(a: int, b: int) -> torch.Tensor:
        source = F.interpolate(x[:, :, a // 2:(b - 1) // 2 + 1], scale_factor=2.0, mode="nearest")
        return source[:, :, a % 2:a % 2 + b - a]
    return _convolve(rows_of, 2 * x.shape[2], 2 * _row_elements(x), upsampler.conv)


def _plain_conv(conv: torch.nn.Module) -> bool:
    """A 2-D convolution with a square odd kernel, stride 1, no dilation or groups and 'same' zero padding."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.kernel_size[0] % 2 == 1 and conv.padding == (conv.kernel_size[0] // 2,) * 2)


def _plain_resnet(resnet: torch.nn.Module) -> bool:
    return (isinstance(resnet, ResnetBlock2D) and not resnet.training and resnet.time_emb_proj is None
            and resnet.upsample is None and resnet.downsample is None
            and isinstance(resnet.norm1, torch.nn.GroupNorm) and isinstance(resnet.norm2, torch.nn.GroupNorm)
            and _plain_conv(resnet.conv1) and _plain_conv(resnet.conv2)
            and (resnet.conv_shortcut is None or (_plain_conv(resnet.conv_shortcut)
                                                  and resnet.conv_shortcut.kernel_size == (1, 1))))


def _plain_upsampler(upsampler: torch.nn.Module) -> bool:
    return (isinstance(upsampler, Upsample2D) and upsampler.use_conv and not upsampler.use_conv_transpose
            and upsampler.norm is None and upsampler.interpolate and upsampler.name == "conv"
            and _plain_conv(upsampler.conv))
