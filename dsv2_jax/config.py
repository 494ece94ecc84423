"""Model configuration: a frozen dataclass read from a hub ``config.json``.

Example::

    from dsv2_jax.config import DeepseekV2Config
    cfg = DeepseekV2Config.from_json("path/to/config.json")
    lite = DeepseekV2Config.v2_lite()
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError


# dtypes a hub config may give for its stored weights (AWQ checkpoints say float16).
_STORED_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rope scaling (the only kind DeepSeek-V2 uses)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """AutoAWQ GEMM quantization settings (``quantization_config`` in config.json)."""

    bits: int = 4
    group_size: int = 64
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: tuple[str, ...] = ()

    def applies_to(self, module_name: str) -> bool:
        """AutoAWQ skips a linear when any modules_to_not_convert entry is a substring of its name."""
        return not any(skip and skip in module_name for skip in self.modules_to_not_convert)


@dataclasses.dataclass(frozen=True)
class DeepseekV2Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    moe_intermediate_size: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 0
    q_lora_rank: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    quantization: QuantConfig | None = None

    # ---- derived sizes -------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """192^-0.5 times YaRN's mscale(factor, mscale_all_dim)^2 (docs/model.md#rope-and-yarn)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: latent c_kv plus the shared k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ---- constructors --------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "DeepseekV2Config":
        """Build from a hub config dict; errors name ``source`` and the key."""
        model_type = d.get("model_type")
        if model_type not in ("deepseek_v2", None):
            raise ConfigError(
                f"{source}: model_type is {model_type!r}; expected 'deepseek_v2'"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        for key in required:
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: required key {key!r} is missing")
        for key, value in d.items():
            if key in fields and key not in ("rope_scaling", "quantization"):
                kwargs[key] = value
        # eos may be a list in some configs; the first is the model's own.
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs["rope_scaling"], theta = _read_rope(d, source)
        if theta is not None:
            kwargs["rope_theta"] = theta
        kwargs["quantization"] = _read_quant(d.get("quantization_config"), source)
        for key in ("torch_dtype", "dtype"):  # the stored weights' dtype (transformers 5: "dtype")
            if key in d and d[key] is not None and d[key] not in _STORED_DTYPES:
                raise ConfigError(f"{source}: {key} = {d[key]!r}: expected one of "
                                  f"{', '.join(_STORED_DTYPES)}")
        for key in ("n_group", "topk_group"):
            if kwargs.get(key) is None:
                kwargs[key] = 1
        if kwargs.get("n_shared_experts") is None:
            kwargs["n_shared_experts"] = 0
        if kwargs.get("first_k_dense_replace") is None:
            kwargs["first_k_dense_replace"] = 0
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # wrong value type for a field
            raise ConfigError(f"{source}: {e}") from None
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "DeepseekV2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The hub ``config.json`` form (readable by transformers' DeepseekV2)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_scaling", "quantization"):
                continue
            d[f.name] = getattr(self, f.name)
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["attention_dropout"] = 0.0
        d["use_cache"] = True
        if self.rope_scaling is not None:
            rs = dataclasses.asdict(self.rope_scaling)
            d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **rs}
        else:
            d["rope_scaling"] = None
        if self.quantization is not None:
            q = dataclasses.asdict(self.quantization)
            q["modules_to_not_convert"] = list(q["modules_to_not_convert"]) or None
            d["quantization_config"] = {"quant_method": "awq", **q}
        return d

    def replace(self, **changes: Any) -> "DeepseekV2Config":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate("replace()")
        return cfg

    def validate(self, source: str = "config") -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: {key} = {getattr(self, key)!r}: {msg}")

        for key in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        ):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise bad(key, "expected a positive integer")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "RoPE rotates pairs, so it must be even")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", "expected null or a positive integer")
        if self.n_routed_experts:
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "expected a positive integer")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise bad(
                    "num_experts_per_tok",
                    f"expected between 1 and n_routed_experts ({self.n_routed_experts})",
                )
        if self.first_k_dense_replace and self.intermediate_size <= 0:
            raise bad("intermediate_size", "expected a positive integer")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise bad("topk_method", "expected 'greedy' or 'group_limited_greedy'")
        if self.topk_method == "group_limited_greedy":
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"expected between 1 and n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise bad("topk_group", "the kept groups hold fewer experts than num_experts_per_tok")
        if self.scoring_func != "softmax":
            raise bad("scoring_func", "only 'softmax' (DeepSeek-V2) is supported")
        if self.moe_layer_freq < 1:
            raise bad("moe_layer_freq", "expected an integer >= 1")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "DeepSeek-V2 unties lm_head; true is not supported")
        if self.attention_bias:
            raise bad("attention_bias", "DeepSeek-V2 has no attention biases; true is not supported")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "expected a positive number")

    # ---- presets ------------------------------------------------------
    @classmethod
    def v2_lite(cls, **overrides: Any) -> "DeepseekV2Config":
        """DeepSeek-V2-Lite (15.7B total, 2.4B active)."""
        base = dict(
            vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
            intermediate_size=10944, moe_intermediate_size=1408, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=None,
            n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
            first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
            norm_topk_prob=False, routed_scaling_factor=1.0, rope_theta=10000.0,
            rope_scaling=RopeScaling(40.0, 4096, 32.0, 1.0, 0.707, 0.707),
            max_position_embeddings=163840, rms_norm_eps=1e-6,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def v2(cls, **overrides: Any) -> "DeepseekV2Config":
        """DeepSeek-V2 (236B total, 21B active)."""
        base = dict(
            vocab_size=102400, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
            intermediate_size=12288, moe_intermediate_size=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536,
            n_routed_experts=160, num_experts_per_tok=6, n_shared_experts=2,
            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=8, topk_group=3,
            norm_topk_prob=False, routed_scaling_factor=16.0, rope_theta=10000.0,
            rope_scaling=RopeScaling(40.0, 4096, 32.0, 1.0, 0.707, 0.707),
            max_position_embeddings=163840, rms_norm_eps=1e-6,
        )
        base.update(overrides)
        return cls(**base)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _read_rope(d: dict[str, Any], source: str) -> tuple[RopeScaling | None, float | None]:
    """Read ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    rs = d.get("rope_scaling")
    theta = None
    rp = d.get("rope_parameters")
    key = "rope_scaling"
    if rp is not None:
        key = "rope_parameters"
        theta = rp.get("rope_theta")
        if rs is None:
            rs = rp
    if not rs:
        return None, theta
    kind = rs.get("rope_type", rs.get("type"))
    if kind in ("default", None) and "factor" not in rs:
        return None, theta
    if kind != "yarn":
        raise ConfigError(f"{source}: {key}.type = {kind!r}; only 'yarn' is supported")
    defaults = RopeScaling()
    try:
        out = RopeScaling(
            factor=float(rs["factor"]),
            original_max_position_embeddings=int(
                rs.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
            ),
            beta_fast=float(rs.get("beta_fast") or defaults.beta_fast),
            beta_slow=float(rs.get("beta_slow") or defaults.beta_slow),
            mscale=float(rs.get("mscale") if rs.get("mscale") is not None else 1.0),
            mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: {key} is missing {e}") from None
    if out.factor <= 0:
        raise ConfigError(f"{source}: {key}.factor = {out.factor}: expected > 0")
    return out, theta


def _read_quant(q: dict[str, Any] | None, source: str) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "awq":
        raise ConfigError(
            f"{source}: quantization_config.quant_method = {method!r}; only 'awq' is supported"
        )
    bits = q.get("bits", q.get("w_bit", 4))
    if bits != 4:
        raise ConfigError(f"{source}: quantization_config.bits = {bits!r}; only 4-bit AWQ is supported")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(
            f"{source}: quantization_config.version = {version!r}; only 'gemm' is supported"
            " (gemv/marlin/exllama pack differently)"
        )
    zero_point = q.get("zero_point", True)
    if not zero_point:
        raise ConfigError(
            f"{source}: quantization_config.zero_point = {zero_point!r}; only zero_point=true is supported"
        )
    group_size = int(q.get("group_size", q.get("q_group_size", 128)))
    if group_size <= 0:
        raise ConfigError(f"{source}: quantization_config.group_size = {group_size}: expected > 0")
    skip = tuple(q.get("modules_to_not_convert") or ())
    return QuantConfig(bits=4, group_size=group_size, zero_point=True, version="gemm",
                       modules_to_not_convert=skip)
