"""The project's errors: one hierarchy, so ``except dsv2_jax.Dsv2Error`` catches any of them.

Each message names what is wrong where: the file, tensor, key, line or argument, what was
expected and what was found. The programs print the message on one line and exit 2.
"""

from __future__ import annotations


class Dsv2Error(Exception):
    """Base of every error this project raises for bad input."""


class ConfigError(Dsv2Error, ValueError):
    """A configuration that cannot run: a model ``config.json`` or a training YAML. The message
    starts with the offending key (``batch.global_batch = 6: ...``)."""


class CheckpointError(Dsv2Error, ValueError):
    """Weights that do not match the model: names the file and the tensor."""


class HubError(Dsv2Error, OSError):
    """The Hugging Face hub could not give us a repo (offline, unknown repo, no access)."""


class DataError(Dsv2Error, ValueError):
    """Bad training or calibration data: names the file (and line) and what is wrong."""


class CheckpointSaveError(Dsv2Error, OSError):
    """A run checkpoint could not be written (disk full, ...); the earlier ones are intact."""
