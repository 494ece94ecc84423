#!/usr/bin/env bash
# The prepared GPU suite: one command on a lent H200, about 8 minutes, installs nothing.
#
#     bash bench/gpu_suite.sh            # writes runs/gpu-suite/suite.json (+ one log per part)
#
# 1. bench/gpu_kernels.py: every Pallas kernel timed at V2-Lite shapes against a bf16 dense
#    matmul (and ragged_dot for the routed experts): GB/s of the 4.8 TB/s.
# 2. bench/gpu_e2e.py: the kernels checked on the device against their XLA references; random-
#    weight V2-Lite decode (bf16 and AWQ, batch 1 / 8 / 64: tok/s and % of the bandwidth bound)
#    and a 4,096-token prefill.
# 3. bench/train_step.py: training step tokens/s and MFU of V2-Lite cut to 4 layers (the full
#    model's training state does not fit one GPU), 4,096 tokens.
# Each part has its own time limit; a part that fails is recorded and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/gpu-suite}
mkdir -p "$OUT"
python - <<'PY' || { echo "gpu_suite: the project does not import here (see above)"; exit 2; }
import jax, flax, optax, dsv2_jax  # noqa: F401
print("jax", jax.__version__, "flax", flax.__version__, "backend", jax.default_backend(), jax.devices()[0].device_kind)
PY
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/status.txt"
}
: > "$OUT/status.txt"
run kernels 150 python bench/gpu_kernels.py
run e2e 270 python bench/gpu_e2e.py --json "$OUT/e2e.json" --budget-s 200
run train 90 python bench/train_step.py --config configs/deepseek-v2-lite-pretrain.yaml \
    model.overrides.num_hidden_layers=4 data.seq_len=4096 batch.global_batch=1 --steps 3 --warmup 1 --json
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
suite = {"status": out.joinpath("status.txt").read_text().splitlines(),
         "kernels_log": out.joinpath("kernels.log").read_text()[-20000:]}
e2e = out / "e2e.json"
suite["e2e"] = json.loads(e2e.read_text()) if e2e.exists() else None
lines = [l for l in out.joinpath("train.log").read_text().splitlines() if l.startswith("{")]
suite["train"] = json.loads(lines[-1]) if lines else None
(out / "suite.json").write_text(json.dumps(suite, indent=1))
print("wrote", out / "suite.json")
PY
