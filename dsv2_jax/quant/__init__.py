"""AWQ 4-bit weights.

- ``awq``: the AutoAWQ GEMM format (``AWQWeight``, packing, dequantization, pure-jnp matmuls);
- ``ops``: the matmuls ``layers.Linear`` and ``expert_weights`` call (Pallas kernels on GPU);
- ``quantizer``: quantize a checkpoint folder (``python -m dsv2_jax.quant``, ``dsv2_jax.quantize``).

This package's ``__init__`` exports the format alone, so that the kernels (which read the
format) can import it without pulling in ``ops`` (which calls the kernels).
"""

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

__all__ = [
    "AWQ_ORDER", "AWQWeight", "awq_grouped_matmul_reference", "awq_matmul_reference",
    "dequantize", "dequantize_np", "empty_awq_arrays", "pack_int4", "quantize_rtn", "unpack_int4",
]
