"""Parameter counts and the model-FLOPs estimate used for throughput and MFU.

Training FLOPs per token ≈ 6 · N_active (forward 2N, backward 4N), where N_active counts the
weights one token multiplies: everything except the embedding table (a lookup, not a matmul),
with the routed experts scaled by K/E. Attention's T-dependent score/value FLOPs are left out,
the usual "6N" convention; at 4K context they add roughly 10% for V2-Lite.

Example::

    counts = param_counts(DeepseekV2Config.v2_lite())
    counts["active"]    # ≈ 2.45e9 (docs/figures.md: attention, dense layer 0, shared + 6 routed experts, lm_head)
"""

from __future__ import annotations

import math

from flax import nnx

from ..model import DeepseekV2


def param_counts(cfg) -> dict[str, int]:
    """{"total", "embedding", "routed_experts", "active"} for a DeepseekV2Config."""

    abstract = nnx.eval_shape(lambda: DeepseekV2(cfg, rngs=nnx.Rngs(0)))
    total = embedding = routed = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        n = math.prod(var.get_value().shape)
        total += n
        names = [str(p) for p in path]
        if names[0] == "embed_tokens":
            embedding += n
        elif any(p.startswith("experts_") for p in names):
            routed += n
    k, e = cfg.num_experts_per_tok, max(cfg.n_routed_experts, 1)
    active = total - embedding - routed + routed * k // e
    return {"total": total, "embedding": embedding, "routed_experts": routed, "active": active}


def train_flops_per_token(cfg) -> int:
    """6 · N_active (see the module docstring)."""
    return 6 * param_counts(cfg)["active"]
