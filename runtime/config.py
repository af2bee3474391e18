"""Configs: the model's shape, the build's settings and the frozen engine record.

Every config is a pydantic model with bounds on every field. ``ModelConfig`` covers the one
decoder that serves Llama (with Llama-3.1 rope scaling), Mistral, Qwen2 (QKV bias), Qwen3 (QK
norm, explicit head_dim) and their MoE variants (Mixtral, Qwen3-MoE).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
"""Version of engine.json's layout; an engine with a newer one is refused."""

Dtype = Literal["float32", "bfloat16", "float16"]
Quant = Literal["none", "fp8", "int4-awq", "int8-weight"]


class RopeScaling(BaseModel):
    """Llama-3.1 style frequency scaling of rotary embeddings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rope_type: Literal["llama3"] = "llama3"
    factor: float = Field(8.0, gt=0, le=1024)
    low_freq_factor: float = Field(1.0, gt=0, le=1024)
    high_freq_factor: float = Field(4.0, gt=0, le=1024)
    original_max_position_embeddings: int = Field(8192, ge=1, le=1 << 24)


class ModelConfig(BaseModel):
    """The shape of a decoder-only transformer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"] = Field(
        "llama", description="model family; selects the config switches below"
    )
    vocab_size: int = Field(ge=1, le=1 << 22)
    hidden_size: int = Field(ge=1, le=1 << 17)
    intermediate_size: int = Field(ge=1, le=1 << 19, description="dense MLP width")
    num_hidden_layers: int = Field(ge=1, le=1024)
    num_attention_heads: int = Field(ge=1, le=1024)
    num_key_value_heads: int = Field(ge=1, le=1024)
    head_dim: int = Field(ge=1, le=1024)
    max_position_embeddings: int = Field(4096, ge=1, le=1 << 24)
    rms_norm_eps: float = Field(1e-6, gt=0, le=1)
    rope_theta: float = Field(10000.0, gt=0, le=1e12)
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = Field(False, description="bias on q, k and v projections (Qwen2)")
    qk_norm: bool = Field(False, description="RMSNorm on each head of q and k before rotary (Qwen3)")
    sliding_window: int | None = Field(None, ge=1, le=1 << 24)
    # Mixture of experts (0 experts: a dense MLP in every layer).
    num_experts: int = Field(0, ge=0, le=4096)
    num_experts_per_tok: int = Field(0, ge=0, le=64)
    moe_intermediate_size: int = Field(0, ge=0, le=1 << 19)
    norm_topk_prob: bool = Field(True, description="renormalise the top-k router weights")
    bos_token_id: int | None = Field(None, ge=0)
    eos_token_id: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError("num_experts_per_tok must be in 1..num_experts")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_parameters(self) -> int:
        """Parameter count, embeddings and LM head included."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        if self.is_moe:
            mlp = self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
        else:
            mlp = 3 * h * self.intermediate_size
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * (attn + mlp + norms) + emb + h


class BuildConfig(BaseModel):
    """What ``kiln build`` was asked for: precision, parallel layout and shape limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Dtype = "bfloat16"
    quant: Quant = "none"
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="fp8: the KV cache in E4M3 with per-layer scales")
    activation_scales: Literal["dynamic", "static"] = Field(
        "dynamic", description="fp8 activations: per token at run time, or per tensor from calibration")
    group_size: int = Field(128, ge=16, le=8192, description="int4 weights: columns sharing one scale and zero point")
    int4_search: Literal["awq+gptq", "awq", "rtn"] = Field(
        "awq+gptq", description="int4 weights: AWQ's activation-aware scale and clip search, then GPTQ's rounding "
                                "onto those groups; AWQ's search with round-to-nearest; or plain round-to-nearest")
    fp8_rounding: Literal["gptq", "rtn"] = Field(
        "gptq", description="fp8 weights: GPTQ's Hessian-compensated rounding on the calibration text, or round-to-nearest")
    tp: int = Field(1, ge=1, le=1024)
    pp: int = Field(1, ge=1, le=1024)
    ep: int = Field(1, ge=1, le=1024)
    max_batch_size: int = Field(256, ge=1, le=65536)
    max_seq_len: int = Field(4096, ge=1, le=1 << 24)
    max_num_tokens: int = Field(8192, ge=1, le=1 << 24, description="tokens per engine step")
    tokens_per_block: int = Field(16, ge=1, le=4096, description="KV cache block size")

    @model_validator(mode="after")
    def _check(self) -> "BuildConfig":
        if self.tokens_per_block & (self.tokens_per_block - 1):
            raise ValueError("tokens_per_block must be a power of two")
        if self.ep > self.tp:
            raise ValueError("ep must not exceed tp (experts are split inside a tensor-parallel group)")
        if self.tp % self.ep:
            raise ValueError("tp must be a multiple of ep")
        if self.activation_scales == "static" and self.quant != "fp8":
            raise ValueError("activation_scales 'static' applies to --quant fp8 only")
        if self.group_size != 128 and self.quant != "int4-awq":
            raise ValueError("group_size applies to --quant int4-awq only")
        if self.int4_search != "awq+gptq" and self.quant != "int4-awq":
            raise ValueError("int4_search applies to --quant int4-awq only")
        if self.fp8_rounding != "gptq" and self.quant != "fp8":
            raise ValueError("fp8_rounding applies to --quant fp8 only")
        if self.group_size & (self.group_size - 1):
            raise ValueError("group_size must be a power of two")
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


LinearMethod = Literal["none", "fp8", "int8-weight", "int4"]


class LinearQuant(BaseModel):
    """The tensor layout of the model's projections (docs/quantization.md) and what their
    forward needs: one value for every projection of the engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: LinearMethod = "none"
    static_activations: bool = Field(False, description="fp8: a calibrated input_scale per projection")
    group_size: int = Field(128, ge=16, le=8192, description="int4: columns per scale and zero point")
    input_perm: bool = Field(False, description="int4: inputs permuted first (GPTQ act-order checkpoints)")
    kv_fp8: bool = Field(False, description="KV cache in E4M3 with k_scale / v_scale per layer")


class QuantizationInfo(BaseModel):
    """engine.json's record of how the engine was quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    linear: LinearQuant
    source: str = Field(description="'build' (quantized by kiln build) or 'checkpoint:<format>'")
    search: Literal["none", "awq+gptq", "awq", "gptq", "rtn"] = Field(
        "none", description="weights quantized here: int4's AWQ scale search, fp8's GPTQ rounding, or plain "
                            "round-to-nearest (asked for, or random weights)")
    weight_scales: str = Field(description="layout of the weight scales")
    kv_scales: str | None = Field(None, description="how the FP8 KV cache scales were chosen")
    calibration: dict | None = Field(None, description="calibration text, sequences, tokens and seconds")


class TokenizerInfo(BaseModel):
    """Where the tokenizer lives in the engine and the ids the runtime needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = "tokenizer"
    eos_token_ids: list[int] = Field(default_factory=list)
    bos_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None


class EngineConfig(BaseModel):
    """engine.json: the frozen build. Files are checked against their sha256 at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    kiln_version: str
    model_name: str
    model: ModelConfig
    build: BuildConfig
    device_class: Literal["cpu", "cuda"] = Field(description="the device the engine was built for")
    device_name: str = Field("cpu", description="e.g. the GPU's name at build time")
    rank_files: list[str] = Field(description="weights file of each rank, by rank")
    tokenizer: TokenizerInfo
    files: dict[str, str] = Field(description="sha256 of every file, relative path to hex digest")
    source: str = Field("", description="what the engine was built from")
    random_weights_seed: int | None = Field(
        None, description="set when no weight files were written: each rank draws its weights at load from this seed")
    quantization: QuantizationInfo | None = Field(None, description="set for engines with quantized linears or KV cache")

    @property
    def linear_quant(self) -> LinearQuant:
        return self.quantization.linear if self.quantization is not None else LinearQuant()
