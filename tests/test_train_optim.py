"""The optax chain against a hand-written NumPy AdamW with global-norm clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv2_jax import DeepseekV2, DeepseekV2Config
from dsv2_jax.training.optim import decay_mask, make_optimizer
from dsv2_jax.training.schedule import lr_schedule

B1, B2, WD, CLIP, EPS = 0.9, 0.95, 0.1, 1.0, 1e-8


def numpy_adamw(params, grads_per_step, lrs, mask):
    """Reference: clip by the global norm, Adam with bias correction, decoupled decay x lr."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
        scale = 1.0 if norm < CLIP else CLIP / norm
        for k in p:
            g = grads[k] * scale
            m[k] = B1 * m[k] + (1 - B1) * g
            v[k] = B2 * v[k] + (1 - B2) * g * g
            m_hat = m[k] / (1 - B1 ** t)
            v_hat = v[k] / (1 - B2 ** t)
            update = m_hat / (np.sqrt(v_hat) + EPS) + (WD * p[k] if mask[k] else 0.0)
            p[k] = p[k] - lr * update
    return p


def flatten(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def test_one_chain_step_matches_numpy():
    rng = np.random.default_rng(0)
    params = {
        "layer": {"q_proj": {"weight": rng.normal(size=(3, 4))},
                  "input_layernorm": {"weight": 1 + 0.1 * rng.normal(size=(4,))},
                  "bias": rng.normal(size=(4,))},
        "experts": {"weight": rng.normal(size=(2, 4, 3))},
        # norm scales stacked over layers (a scan) are 2-D but must still not decay
        "stacked": {"kv_a_layernorm": {"weight": 1 + 0.1 * rng.normal(size=(2, 4))}},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    mask = flatten(decay_mask(params))
    assert mask == {
        "['experts']['weight']": True,
        "['layer']['bias']": False,
        "['layer']['input_layernorm']['weight']": False,
        "['layer']['q_proj']['weight']": True,
        "['stacked']['kv_a_layernorm']['weight']": False,
    }
    grad_scales = [1.0, 0.01, 0.6]
    grads = [jax.tree.map(lambda x: jnp.asarray(s * rng.normal(size=x.shape), jnp.float32), params)
             for s in grad_scales]
    norms = [float(optax.tree.norm(g)) for g in grads]
    assert norms[0] > CLIP and norms[1] < CLIP and norms[2] > CLIP  # both sides of the clip
    schedule = lr_schedule(1e-2, warmup_steps=2, total_steps=10)  # lr 0, 5e-3, 1e-2
    tx = make_optimizer(schedule, b1=B1, b2=B2, weight_decay=WD, clip_norm=CLIP, eps=EPS)
    state = tx.init(params)
    p = params
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads:
        updates, state = step(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    want = numpy_adamw({k: np.asarray(x) for k, x in flatten(params).items()},
                       [{k: np.asarray(x) for k, x in flatten(g).items()} for g in grads],
                       [0.0, 5e-3, 1e-2], mask)
    got = flatten(p)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=0, atol=1e-6, err_msg=k)
    # the step actually moved every parameter (lr 0 at step 0 only)
    for k in want:
        assert np.abs(np.asarray(got[k]) - np.asarray(flatten(params)[k])).max() > 1e-4, k


def test_decay_mask_and_update_on_the_nnx_model():
    cfg = DeepseekV2Config.v2_lite(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8)
    model = DeepseekV2(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = flatten(decay_mask(params))
    no_decay = sorted(k for k, v in mask.items() if not v)
    assert no_decay == sorted(k for k in mask if "norm" in k)  # exactly the RMSNorm scales
    assert len(no_decay) == 2 * 3 + 1  # input, post_attention, kv_a per layer; the final norm
    assert mask["['layers'][1]['mlp']['gate']['weight'].value"]  # the router decays
    assert mask["['embed_tokens']['embedding'].value"]

    # With zero gradients Adam's step is 0, so only decoupled decay moves parameters:
    # decayed ones shrink by lr * wd, norm scales stay exactly 1.
    before = {k: np.asarray(x) for k, x in flatten(params).items()}
    optimizer = nnx.Optimizer(model, make_optimizer(1e-2), wrt=nnx.Param)
    nnx.jit(lambda o, m, g: o.update(m, g))(optimizer, model, jax.tree.map(jnp.zeros_like, params))
    after = flatten(nnx.state(model, nnx.Param))
    for k, x in before.items():
        want = x * (1 - 1e-2 * WD) if mask[k] else x
        np.testing.assert_allclose(np.asarray(after[k]), want, rtol=1e-6, atol=1e-9, err_msg=k)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(b2=1.0), "b2"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        make_optimizer(1e-3, **kwargs)
