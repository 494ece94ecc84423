"""The compiled expert-parallel training step never all-gathers full expert weights.

One AdamW step of CE + balance loss is compiled for 8 fake devices and the all-gather
instructions of the optimized HLO are listed. With expert parallelism no all-gather yields a
full [E, in, out] expert stack: on (data 2, expert 4) expert weights are not gathered at all;
on (fsdp 2, expert 4) only the device's own E/4 experts are gathered over fsdp. The control,
the same sharded weights with the MoE forced onto the single-device path and its loop over
expert tiles, gathers all of them.
"""

import pytest

from ep_cases import run
from tiny import LITE, write_checkpoint

CFG = dict(LITE, num_hidden_layers=2, first_k_dense_replace=0)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("ep") / "model", CFG, seed=3)
    return run("hlo", folder)


def test_no_full_expert_all_gather_with_data_and_expert_axes(result):
    assert result["ep4_data2/full_expert_gathers"] == 0, result["ep4_data2/all_gathers"]
    assert result["ep4_data2/local_expert_gathers"] == 0, result["ep4_data2/all_gathers"]
    # the tokens come back by reduce-scatter (forward) and go out the same way (backward)
    assert result["ep4_data2/reduce_scatters"] > 0


def test_fsdp_gathers_only_the_local_experts(result):
    assert result["ep4_fsdp2/full_expert_gathers"] == 0, result["ep4_fsdp2/all_gathers"]
    # gate, up, down of 2 layers, forward and once more for the backward pass
    assert result["ep4_fsdp2/local_expert_gathers"] > 0


def test_optimizer_state_follows_expert_sharding(result):
    assert result["ep4_data2/opt_state_specs"] == ["P('expert',)"]
    assert result["ep4_fsdp2/opt_state_specs"] == ["P('expert', None, 'fsdp')"]


def test_control_single_device_path_gathers_full_experts(result):
    """Shows the check can fail: without shard_map the sharded weights are gathered whole."""
    assert result["control/full_expert_gathers"] >= 6
