"""Expert parallelism on 8 fake CPU devices: logits equal the single-device model.

For expert-axis sizes 1, 2, 4 and 8 (the data axis takes the other devices) a tiny model with
8 routed experts is loaded straight into its shardings and run through a prefill into the
latent cache, an absorbed decode step and a short forward whose 5 tokens no mesh axis
divides (replicated tokens + psum). The reference is the same checkpoint on one device.
"""

import pytest

from ep_cases import run
from tiny import LITE, write_checkpoint

CFG = dict(LITE, num_hidden_layers=2, first_k_dense_replace=0)  # two MoE layers, 8 experts, top-3
EPS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("ep") / "model", CFG, seed=3)
    return run("logits", folder, ",".join(map(str, EPS)))


@pytest.mark.parametrize("ep", EPS)
@pytest.mark.parametrize("phase", ["prefill", "decode", "odd"])
def test_logits_equal_single_device(result, ep, phase):
    assert result["scale"] > 1.0  # logits of a useful size: the bound below is tight
    err = result[f"ep{ep}/{phase}"]
    assert err <= 1e-5, f"expert axis {ep}, {phase}: logits differ by {err}"


@pytest.mark.parametrize("ep", EPS)
def test_experts_are_split_and_dispatched_with_shard_map(result, ep):
    assert result[f"ep{ep}/expert_spec/weight"] == ("P()" if ep == 1 else "P('expert',)")
    assert result[f"ep{ep}/uses_shard_map"] == (ep > 1)
