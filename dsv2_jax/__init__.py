"""dsv2-jax: DeepSeek-V2(-Lite) in JAX / Flax NNX.

Example::

    import dsv2_jax, jax.numpy as jnp
    model = dsv2_jax.load("path/to/DeepSeek-V2-Lite", dtype="bfloat16")
    logits = model(jnp.array([[100000, 2054, 318]]))   # float32 [1, 3, 102400]
"""

from .config import ConfigError, DeepseekV2Config, QuantConfig, RopeScaling
from .generation import GenerationResult, generate, stream
from .hub import HubError
from .hub_format import CheckpointError, load, save
from .model import DeepseekV2, ModelOutput
from .quant.quantizer import quantize

__all__ = [
    "CheckpointError", "ConfigError", "DeepseekV2", "DeepseekV2Config", "HubError",
    "GenerationResult", "ModelOutput", "QuantConfig", "RopeScaling", "generate", "load",
    "load_tokenizer", "quantize", "save", "stream",
]


def load_tokenizer(folder):
    """Load ``tokenizer.json`` + ``tokenizer_config.json`` from a model folder."""
    from .tokenizer import load_tokenizer as _load

    return _load(folder)
