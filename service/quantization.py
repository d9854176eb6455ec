"""Dequantizing the quantized expert formats vibe-serve reads: FP8 with block scales, MXFP4 and packed integers.

Owns the arithmetic only, each the expression of the library that loads such checkpoints (so the weights are
bit-identical to the ones it builds): `dequantize_fp8` as transformers' `Fp8Dequantize`, `dequantize_mxfp4` as
its `convert_moe_packed_tensors`, `dequantize_int_packed` as compressed-tensors' `pack-quantized` decompression
(symmetric INT4 or INT8 weights, 32 / bits a little-endian int32 word, times a scale per group of columns or
per row, computed in the scale's dtype: Kimi-K2-Thinking's experts, W4A16 releases), `dequantize_nvfp4` as its
`nvfp4-pack-quantized` decompression (FP4 values two a byte, times an FP8 scale per 16 columns divided by a
float32 global scale). Ignores where the tensors
come from (service.checkpoint reads them) and when they are dequantized (on reading, or by
`service.experts.ExpertFFN` at each call when the workers hold experts quantized).
"""

from __future__ import annotations

import sys

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INT_PACKED_BITS = (4, 8)  # the widths of compressed-tensors' pack-quantized integers read here
# The values of an FP4 (e2m1) nibble, as transformers' MXFP4 integration lists them
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp8_grid(weight: torch.Tensor, scale_inv: torch.Tensor, name: str,
             block: tuple[int, int] | None = None) -> tuple[int, int]:
    """The block [bm, bn] of the scale grid ``scale_inv`` of the FP8 weight ``weight`` [rows, cols] (one scale: the
    whole weight); ValueError naming ``name`` unless they fit. With the checkpoint's ``block`` (its config's
    `weight_block_size`) the grid must be ``ceil(rows / bm) x ceil(cols / bn)``, the last blocks partial (DeepSeek-V3's
    `kv_a_proj_with_mqa` is [576, 7168] with a [5, 56] grid), as DeepSeek's quantizer and vLLM have it; without one,
    the grid must divide the weight."""
    rows, cols = weight.shape
    if scale_inv.dim() not in (0, 2) and scale_inv.numel() != 1:
        raise ValueError(f"FP8 weight {name} {tuple(weight.shape)}: its scale must be one value or a 2-D grid, got "
                         f"{tuple(scale_inv.shape)}")
    scale_rows, scale_cols = scale_inv.shape if scale_inv.dim() == 2 else (1, 1)
    if scale_rows == scale_cols == 1:
        return rows, cols
    if block is not None:
        bm, bn = block
        if (scale_rows, scale_cols) != (-(-rows // bm), -(-cols // bn)):
            raise ValueError(f"FP8 weight {name} {tuple(weight.shape)} does not match its scale grid ({scale_rows}, "
                             f"{scale_cols}) for blocks of {bm} x {bn} (weight_block_size): expected "
                             f"({-(-rows // bm)}, {-(-cols // bn)})")
        return bm, bn
    if rows % scale_rows or cols % scale_cols:
        raise ValueError(f"FP8 weight {name} {tuple(weight.shape)} is not divisible by its scale grid "
                         f"({scale_rows}, {scale_cols}) and the checkpoint's config gives no weight_block_size")
    return rows // scale_rows, cols // scale_cols


def check_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, name: str,
                     block: tuple[int, int] | None = None) -> None:
    """ValueError naming ``name`` unless ``scale_inv`` is a scale grid of ``weight`` (see `fp8_grid`)."""
    fp8_grid(weight, scale_inv, name, block)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                   block: tuple[int, int] | None = None) -> torch.Tensor:
    """An FP8 weight [rows, cols] times its per-block ``scale_inv`` (a grid of blocks of ``block``, the last ones
    partial, or of the blocks that divide the weight without one; or one value), in float32, then cast to
    ``dtype``: transformers' `Fp8Dequantize` expression, extended to partial blocks."""
    bm, bn = fp8_grid(weight, scale_inv, "weight", block)
    rows, cols = weight.shape
    scales = scale_inv.to(torch.float32).reshape(-(-rows // bm), -(-cols // bn))
    if rows % bm == 0 and cols % bn == 0:  # whole blocks: a view of the weight's blocks (the common case)
        blocks = weight.to(torch.float32, copy=True).reshape(rows // bm, bm, cols // bn, bn)
        return blocks.mul_(scales.reshape(rows // bm, 1, cols // bn, 1)).to(dtype).reshape(rows, cols)
    full = scales.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]
    return weight.to(torch.float32, copy=True).mul_(full).to(dtype)  # in place: one float32 copy, not two


def _nibbles(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n]`` -> ``[..., 2n]``: each byte's low nibble, then its high one (the order every 4-bit format
    read here packs them in)."""
    return torch.stack((data & 0x0F, data >> 4), dim=-1).flatten(start_dim=-2)


def check_mxfp4_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """ValueError unless ``blocks`` is uint8 [N, K/32, 16] and ``scales`` [N, K/32]."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not match scales {tuple(scales.shape)}")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert's MXFP4 weight: ``blocks`` uint8 [N, K/32, 16] (two FP4 values a byte, the low nibble
    first) and ``scales`` uint8 [N, K/32] (a power of two per 32 values, biased by 127) -> [K, N] in
    ``dtype`` on their device, the expression of transformers' `convert_moe_packed_tensors` (bit-identical)."""
    check_mxfp4_blocks(blocks, scales)
    rows, groups, width = blocks.shape
    lut = torch.tensor(_FP4_VALUES, dtype=dtype, device=blocks.device)
    out = lut[_nibbles(blocks.reshape(rows * groups, width)).to(torch.int)]  # [rows * groups, 2 * width]
    torch.ldexp(out, scales.reshape(rows * groups, 1).to(torch.int32) - 127, out=out)
    return out.reshape(rows, groups * 2 * width).T.contiguous()


def int_packed_bits(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], name: str) -> int:
    """The width (4 or 8) of the integers ``packed`` (int32 [rows, ceil(cols * bits / 32)]) holds for a weight of
    ``shape`` [rows, cols] with ``scale`` [rows, groups]; ValueError naming ``name`` if they do not fit."""
    rows, cols = shape
    bits = next((b for b in INT_PACKED_BITS if packed.shape[-1] == -(-cols * b // 32)), None)
    if (packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != rows or bits is None
            or scale.dim() != 2 or scale.shape[0] != rows or cols % scale.shape[1] or not scale.is_floating_point()):
        raise ValueError(f"packed integer weight {name}: {tuple(packed.shape)} {packed.dtype} with scale "
                         f"{tuple(scale.shape)} {scale.dtype} is not a pack-quantized {INT_PACKED_BITS}-bit weight "
                         f"of shape {tuple(shape)}")
    return bits


def dequantize_int_packed(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                          dtype: torch.dtype) -> torch.Tensor:
    """A symmetric pack-quantized weight [rows, cols] (``packed`` int32, element i of a row at bits i * b of
    its words, stored plus 2^(b-1); ``scale`` [rows, groups], one per cols / groups columns) -> ``dtype``:
    compressed-tensors' `unpack_from_int32` and `dequantize` (the integers in the scale's dtype times their
    group's scale, in that dtype), then cast to ``dtype`` as transformers casts what it loads."""
    rows, cols = shape
    bits = int_packed_bits(packed, scale, shape, "weight")
    data = packed.contiguous().view(torch.uint8)  # little-endian words: element i's bits lie in byte i * b / 8
    if sys.byteorder == "big":
        data = data.view(rows, -1, 4).flip(-1)
    if bits == 4:
        values = _nibbles(data.reshape(rows, -1))[:, :cols].to(torch.int8) - 8
    else:
        values = (data.reshape(rows, -1)[:, :cols].to(torch.int16) - 128).to(torch.int8)
    groups = scale.shape[1]
    weight = values.to(scale.dtype).unflatten(-1, (groups, cols // groups)) * scale.unsqueeze(-1)
    return weight.flatten(start_dim=-2).to(dtype)


def check_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` unless ``packed`` is uint8 [rows, cols / 2], ``scale`` FP8 [rows, cols / 16] and
    ``global_scale`` float32 [1] (compressed-tensors' per-weight scale) or [rows] (gate's and up's, stacked)."""
    rows = packed.shape[0] if packed.dim() == 2 else -1
    if (packed.dtype != torch.uint8 or packed.dim() != 2 or scale.dtype not in FP8_DTYPES or scale.dim() != 2
            or scale.shape != (rows, packed.shape[1] * 2 // 16) or packed.shape[1] % 8
            or global_scale.dtype != torch.float32 or global_scale.shape not in ((1,), (rows,))):
        raise ValueError(f"NVFP4 weight {name}: packed {tuple(packed.shape)} {packed.dtype}, scale {tuple(scale.shape)} "
                         f"{scale.dtype}, global scale {tuple(global_scale.shape)} {global_scale.dtype} are not "
                         f"uint8 [rows, cols/2], FP8 [rows, cols/16] and float32 [1]")


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """An NVFP4 weight [rows, cols]: FP4 (e2m1) values two a byte, the low nibble first, times their FP8 scale
    per 16 columns divided by the weight's float32 global scale -> ``dtype``. compressed-tensors' expression
    (`unpack_fp4_from_uint8` to bf16, the scale cast to bf16 and divided by the global scale in float32, the
    product in float32 rounded to bf16), then cast to ``dtype``; bit for bit. A [rows] global scale gives each
    row its own (a stacked gate and up)."""
    check_nvfp4(packed, scale, global_scale, "weight")
    rows, cols = packed.shape[0], packed.shape[1] * 2
    nibbles = _nibbles(packed)
    magnitudes = torch.tensor(_FP4_VALUES[:8], dtype=torch.float32, device=packed.device)[(nibbles & 0x07).long()]
    values = (magnitudes * torch.where((nibbles & 0x08).bool(), -1.0, 1.0)).to(torch.bfloat16)
    divisor = global_scale.reshape(-1, 1, 1) if global_scale.shape[0] == rows and rows > 1 else global_scale
    scales = scale.to(torch.bfloat16).unsqueeze(-1) / divisor  # [rows, cols / 16, 1], float32 as the library's
    weight = values.unflatten(-1, (cols // 16, 16)).to(scales.dtype) * scales
    return weight.flatten(start_dim=-2).to(torch.bfloat16).to(dtype)
