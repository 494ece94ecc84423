"""AWQ's scale and clip searches against NumPy implementations written here from AutoAWQ's
definitions (hub layout [out, in], its reshapes), and the scale folding against transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from dsv2_jax.quant import calibrate, search
from dsv2_jax.quant.awq import dequantize_np, quantize_rtn
from hf_ref import hf_forward, load_hf
from tiny import FULL, LITE, write_checkpoint

G = 16


# ---- NumPy references, in AutoAWQ's layout: W [out, in], groups = consecutive inputs of a row


def np_pseudo_quantize(w, group_size, bits=4):
    """W [out, in] -> dequantized; per row and group of inputs: asymmetric, the range widened
    to 0, the scale rounded up to float16 (what our packed format stores)."""
    shape = w.shape
    g = w.reshape(-1, group_size).astype(np.float32)
    qmax = 2 ** bits - 1
    lo = np.minimum(g.min(1, keepdims=True), 0)
    hi = np.maximum(g.max(1, keepdims=True), 0)
    s32 = np.maximum((hi - lo) / qmax, 1e-5).astype(np.float32)
    s = s32.astype(np.float16)
    s = np.where(s.astype(np.float32) < s32, np.nextafter(s, np.float16(np.inf)), s).astype(np.float32)
    z = np.clip(np.round(-lo / s), 0, qmax)
    return ((np.clip(np.round(g / s) + z, 0, qmax) - z) * s).reshape(shape)


def np_search_scale(x, weights, block, group_size):
    """AutoAWQ's _search_best_scale / _compute_best_scale (duo scaling, 20-point grid)."""
    w = np.concatenate(weights, axis=0)  # [sum out, in]
    ws = np.abs(w).reshape(-1, group_size)
    ws = (ws / (ws.max(1, keepdims=True) + 1e-6)).reshape(w.shape)
    w_mean = ws.mean(0)
    x_mean = np.abs(x).reshape(-1, x.shape[-1]).mean(0)
    ref = block(weights)
    best = (np.inf, None, None)
    losses = []
    for i in range(20):
        r = i / 20
        s = np.maximum(x_mean ** r / (w_mean ** (1 - r) + 1e-4), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        q = [np_pseudo_quantize(wi * s[None, :], group_size) / s[None, :] for wi in weights]
        loss = float(((block(q) - ref) ** 2).mean())
        losses.append(loss)
        if loss < best[0]:
            best = (loss, r, s)
    return best[1], best[2], losses


def np_search_clip(w, x, group_size, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """AutoAWQ's _compute_best_clip: max_val [out, n_group]."""
    co, ci = w.shape
    x = x.reshape(-1, ci)
    x = x[:: max(1, x.shape[0] // n_sample_token)]
    xf = x.reshape(1, x.shape[0], -1, group_size)
    wf = w.reshape(co, 1, -1, group_size)
    org_max = np.abs(wf).max(-1, keepdims=True)
    best = org_max.copy()
    min_err = np.full(org_max.shape, 1e9)
    org_out = (xf * wf).sum(-1)
    for i in range(int(max_shrink * n_grid)):
        m = org_max * (1 - i / n_grid)
        cur = np.clip(wf, -m, m)
        q = np_pseudo_quantize(cur.reshape(co, ci), group_size).reshape(wf.shape)
        err = ((xf * q).sum(-1) - org_out) ** 2
        err = err.mean(1).reshape(min_err.shape)
        better = err < min_err
        min_err[better] = err[better]
        best[better] = m[better]
    return best[:, 0, :, 0]


def outlier_input(rng, n, d, channels=(3, 17), factor=30.0):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, list(channels)] *= factor
    return x


# ---- tests


@pytest.mark.parametrize("bits", [4, 3])
def test_fake_quantize_is_the_stored_rtn(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 24)).astype(np.float32) * 0.1
    got = np.asarray(search.fake_quantize(w, G, bits))
    np.testing.assert_array_equal(got, np_pseudo_quantize(w.T, G, bits).T)
    if bits == 4:  # and exactly what the packed checkpoint dequantizes to
        np.testing.assert_array_equal(got, dequantize_np(*quantize_rtn(w, G), G))


def test_scale_search_matches_numpy():
    rng = np.random.default_rng(1)
    d_in, d_h = 64, 48
    x = outlier_input(rng, 200, d_in)
    w1 = rng.standard_normal((d_h, d_in)).astype(np.float32) * 0.2  # hub layout [out, in]
    w2 = rng.standard_normal((d_h, d_in)).astype(np.float32) * 0.2

    def block(ws):  # a SwiGLU-like block of two linears sharing the input x
        a, b = x @ ws[0].T, x @ ws[1].T
        return a / (1 + np.exp(-a)) * b

    alpha, scales, losses = np_search_scale(x, [w1, w2], block, G)

    import jax.numpy as jnp

    def loss(s):
        q = [search.scaled_fake_quantize(jnp.asarray(w.T), s, G) for w in (w1, w2)]
        a, b = jnp.asarray(x) @ q[0], jnp.asarray(x) @ q[1]
        return jnp.mean((a * jax_sigmoid(a) * b - block([w1, w2])) ** 2)

    got = search.search_scale(search.activation_mean(x), search.weight_mean([w1.T, w2.T], G), loss)
    print(f"\nα: numpy {alpha}, ours {got.alpha}; loss at α=0 {losses[0]:.3e}, best {min(losses):.3e}")
    assert got.alpha == alpha
    np.testing.assert_allclose(got.scales, scales, rtol=1e-5)
    np.testing.assert_allclose(got.losses, losses, rtol=1e-3)
    assert alpha > 0 and min(losses) < 0.7 * losses[0]  # the outliers make scaling pay
    # llm-compressor's duo_scaling="both" adds the activations-only grid, whose first point is
    # s = 1: plain rounding, so the search can never end worse than RTN on its own loss.
    both = search.search_scale(search.activation_mean(x), search.weight_mean([w1.T, w2.T], G),
                               loss, duo_scaling="both")
    ones = jnp.ones(d_in, jnp.float32)
    assert len(both.losses) == 40 and both.losses[:20] == pytest.approx(got.losses)
    assert both.losses[20] == pytest.approx(float(loss(ones)))
    assert min(both.losses) == pytest.approx(min(both.losses[20:] + (min(losses),)), rel=1e-3)


def jax_sigmoid(a):
    import jax

    return jax.nn.sigmoid(a)


def test_clip_search_matches_numpy():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 64)).astype(np.float32) * 0.1  # [out, in]
    w[:, 5] *= 8  # a few large weights make clipping pay in their groups
    x = rng.standard_normal((1500, 64)).astype(np.float32)
    want = np_search_clip(w, x, G)  # [out, n_group]
    got = search.search_clip(w.T, x, G)  # [n_group, out]
    np.testing.assert_allclose(got.T, want, rtol=1e-6)
    assert (got.T < np.abs(w).reshape(40, -1, G).max(-1)).any()  # some group was clipped
    clipped = search.apply_clip(w.T, got, G)
    assert np.all(np.abs(clipped) <= np.repeat(got, G, axis=0) + 1e-7)


@pytest.mark.parametrize("cfg", [LITE, FULL], ids=["lite", "full"])
def test_folded_scales_leave_transformers_logits_unchanged(tmp_path, cfg):
    """Every scale group of every layer folded with random scales (norms, up_proj rows, the
    router compensated): transformers gives the same logits from the folded checkpoint."""
    src = write_checkpoint(tmp_path / "src", cfg, seed=3)
    # float64 tensors and transformers (whose RMSNorm still rounds to float32): what is
    # measured is the folding, not float32 rounding of the folded weights
    tensors = {k: v.astype(np.float64) for k, v in load_file(str(src / "model.safetensors")).items()}
    from dsv2_jax.config import DeepseekV2Config

    c = DeepseekV2Config.from_json(src / "config.json")
    rng = np.random.default_rng(4)
    n_groups = 0
    for layer in range(c.num_hidden_layers):
        for g in calibrate.scale_groups(c, layer):
            d_in = tensors[f"model.layers.{layer}.{g.linears[0]}.weight"].shape[1]
            calibrate.fold_scale(tensors, layer, g, np.exp(rng.uniform(-1.0, 1.0, d_in)).astype(np.float32))
            n_groups += 1
    # dense layer 0: attention, (q_b), kv_b, MLP, down; MoE layers: the same + one down per expert + shared
    assert n_groups == (4 + 2 * 12 if cfg is LITE else 5 + 2 * 21)
    dst = tmp_path / "folded"
    shutil.copytree(src, dst)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 17))
    want = hf_forward(load_hf(src, torch.float64), ids)
    got = hf_forward(load_hf(dst, torch.float64), ids)
    err = np.abs(got[0] - want[0]).max()
    print(f"\nfolded vs original (transformers): max |Δ logit| {err:.2e}, max |logit| {np.abs(want[0]).max():.2f}")
    assert err <= 1e-5
    for a, b in zip(got[2], want[2]):  # the router picks the same experts
        np.testing.assert_array_equal(np.sort(a, -1), np.sort(b, -1))
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == cfg["hidden_size"]
