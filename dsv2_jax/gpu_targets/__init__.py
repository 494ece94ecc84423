"""GPU target descriptions (XLA GpuTargetConfigProto text) for dsv2_jax.gpu_aot."""
