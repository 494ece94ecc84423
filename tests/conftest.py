import os

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A CPU suite: with the gpu-compile extra installed (CUDA PJRT plugin, no GPU) JAX would try to
# start the CUDA backend and print its failure in every process, CLI subprocesses included.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare float32 results to 1e-4: keep XLA's CPU matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")
