"""Training programs on top of ``dsv2_jax.training``.

    python -m train.run --config configs/tiny-cpu.yaml [section.key=value ...] [--resume]
    python -m train.plot RUN_DIR
    python -m train.export RUN_DIR --out FOLDER [--awq] [--group-size 64]

config.py (the YAML schema and its checks), build.py (model config, tokenizer, initial
weights), run.py (the loop), checkpoints.py (Orbax), metrics.py (metrics.jsonl, TensorBoard,
progress), plot.py, export.py, testing.py (a tiny run for tests). The jitted step, the data
pipeline and the mesh live in the library: dsv2_jax/training/{step,data,parallel}.py.
"""
