"""dsv2-jax: DeepSeek-V2(-Lite) in JAX / Flax NNX.

Example::

    import dsv2_jax, jax.numpy as jnp
    model = dsv2_jax.load("path/to/DeepSeek-V2-Lite", dtype="bfloat16")
    logits = model(jnp.array([[100000, 2054, 318]]))   # float32 [1, 3, 102400]
"""

from .config import DeepseekV2Config, QuantConfig, RopeScaling
from .errors import CheckpointError, ConfigError, DataError, Dsv2Error, HubError
from .generation import GenerationResult, generate, stream
from .hub_format import load, save
from .model import DeepseekV2, ModelOutput
from .quant.quantizer import quantize
from .tokenizer import load_tokenizer

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "DeepseekV2", "DeepseekV2Config", "Dsv2Error", "HubError",
    "GenerationResult", "ModelOutput", "QuantConfig", "RopeScaling", "generate", "load",
    "load_tokenizer", "quantize", "save", "stream",
]

