"""Dequantizing the two quantized expert formats vibe-serve reads: FP8 with block scales and MXFP4.

Owns the arithmetic only, each the expression transformers dequantizes with (so the weights are
bit-identical to the ones `from_pretrained(..., dequantize=True)` builds): `dequantize_fp8` as its
`Fp8Dequantize`, `dequantize_mxfp4` as its `convert_moe_packed_tensors`. Ignores where the tensors
come from (service.checkpoint reads them) and when they are dequantized (on reading, or by
`service.experts.ExpertFFN` at each call when the workers hold experts quantized).
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The values of an FP4 (e2m1) nibble, as transformers' MXFP4 integration lists them
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def check_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` unless ``weight`` [rows, cols] divides into the grid of ``scale_inv``."""
    rows, cols = weight.shape
    scale_rows, scale_cols = scale_inv.shape if scale_inv.dim() == 2 else (1, 1)
    if rows % scale_rows or cols % scale_cols:
        raise ValueError(f"FP8 weight {name} {tuple(weight.shape)} is not divisible by its scale grid "
                         f"({scale_rows}, {scale_cols})")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An FP8 weight [rows, cols] times its per-block ``scale_inv`` (a [rows / bm, cols / bn] grid, or one
    value), in float32, then cast to ``dtype``: transformers' `Fp8Dequantize` expression."""
    check_fp8_blocks(weight, scale_inv, "weight")
    rows, cols = weight.shape
    scale_rows, scale_cols = scale_inv.shape if scale_inv.dim() == 2 else (1, 1)
    blocks = weight.to(torch.float32, copy=True).reshape(scale_rows, rows // scale_rows, scale_cols, cols // scale_cols)
    scales = scale_inv.to(torch.float32).reshape(scale_rows, 1, scale_cols, 1)
    return blocks.mul_(scales).to(dtype).reshape(rows, cols)  # in place: one float32 copy, not two


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
    flat = blocks.reshape(rows * groups, width)
    out = torch.empty(rows * groups, 2 * width, dtype=dtype, device=blocks.device)
    out[:, 0::2] = lut[(flat & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(flat >> 4).to(torch.int)]
    torch.ldexp(out, scales.reshape(rows * groups, 1).to(torch.int32) - 127, out=out)
    return out.reshape(rows, groups * 2 * width).T.contiguous()
