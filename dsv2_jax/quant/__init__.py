"""AWQ 4-bit weights: the format (``awq``) and the matmul seam the model calls (``dispatch``)."""

from dsv2_jax.quant.awq import (
    AWQ_ORDER,
    AWQWeight,
    awq_grouped_matmul_reference,
    awq_matmul_reference,
    dequantize,
    dequantize_np,
    empty_awq_arrays,
    pack_int4,
    quantize_rtn,
    unpack_int4,
)
from dsv2_jax.quant.dispatch import FUSED_MAX_ROWS, awq_grouped_linear, awq_linear

__all__ = [
    "AWQ_ORDER", "AWQWeight", "FUSED_MAX_ROWS", "awq_grouped_linear", "awq_grouped_matmul_reference",
    "awq_linear", "awq_matmul_reference", "dequantize", "dequantize_np", "empty_awq_arrays",
    "pack_int4", "quantize_rtn", "unpack_int4",
]
