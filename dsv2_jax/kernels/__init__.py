"""Pallas GPU kernels (Triton backend), each beside a pure-jnp reference.

==========================  ===================================================
kernel                      reference
==========================  ===================================================
``awq_dequant``             ``dsv2_jax.quant.awq.dequantize``
``awq_matmul``              ``dsv2_jax.quant.awq.awq_matmul_reference``
``awq_grouped_matmul``      ``dsv2_jax.quant.awq.awq_grouped_matmul_reference``
``grouped_matmul``          ``jax.lax.ragged_dot`` (dense experts; forward, dx and dW)
``grouped_matmul_transposed`` ``ragged_dot`` with ``w[e]^T`` (dx alone)
``mla_attention``           ``dsv2_jax.attention.blockwise_attention`` (forward and backward)
``mla_attention_partial``   NumPy softmax over a key slice (prefill chunks; forward only)
==========================  ===================================================

Every entry point takes ``implementation`` ('auto' | 'triton' | 'xla') and ``interpret``.
"""

from dsv2_jax.kernels.awq_dequant import awq_dequant
from dsv2_jax.kernels.awq_grouped_matmul import awq_grouped_matmul
from dsv2_jax.kernels.awq_matmul import awq_matmul
from dsv2_jax.kernels.grouped_matmul import grouped_matmul, grouped_matmul_transposed
from dsv2_jax.kernels.mla_attention import merge_partials, mla_attention, mla_attention_partial

__all__ = ["awq_dequant", "awq_grouped_matmul", "awq_matmul", "grouped_matmul", "grouped_matmul_transposed",
           "merge_partials", "mla_attention", "mla_attention_partial"]
