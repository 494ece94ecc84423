"""Run transformers' DeepseekV2ForCausalLM (torch, CPU) as the reference."""

from __future__ import annotations

import numpy as np
import torch


def load_hf(folder, dtype=torch.float32):
    from transformers import DeepseekV2ForCausalLM

    # The eager experts loop runs any dtype (the grouped_mm default has no float64).
    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    return DeepseekV2ForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation="eager", **extra).eval()


def hf_forward(model, ids: np.ndarray, positions: np.ndarray | None = None):
    """Logits, hidden states (embeddings, then each layer's output before the final norm)
    and the selected experts of each MoE layer ([N, K] int, unsorted)."""
    picked = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: picked.append(out[2].numpy()))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    try:
        with torch.no_grad():
            out = model(torch.tensor(np.asarray(ids)),
                        position_ids=None if positions is None else torch.tensor(np.array(positions)),
                        output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    logits = out.logits.float().numpy()
    # transformers replaces the last hidden state by the final-normed one; drop it.
    hidden = [h.float().numpy() for h in out.hidden_states[:-1]]
    return logits, hidden, picked
