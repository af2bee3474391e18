"""Model shapes for random-weight builds.

A preset is a ``ModelConfig`` with the published shape of a well-known model (or a tiny one
for tests). Building from a preset draws the weights at random, which is enough to measure
speed and memory without downloading a checkpoint. Random-weight engines use the built-in
SmolLM2 tokenizer, so token ids, bos and eos come from that tokenizer rather than from the
original model; every preset's vocabulary is at least SmolLM2's 49152 tokens.
"""

from __future__ import annotations

from .config import ModelConfig, RopeScaling

PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "llama-3-70b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "llama-3.1-405b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
    ),
    "mixtral-8x7b": ModelConfig(
        architecture="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=14336,
        norm_topk_prob=True,
    ),
    "qwen3-30b-a3b": ModelConfig(
        architecture="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        qk_norm=True,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
    ),
    "tiny-llama": ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
    "tiny-moe": ModelConfig(
        architecture="mixtral",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        norm_topk_prob=True,
    ),
    "tiny-qwen3": ModelConfig(
        architecture="qwen3",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        qk_norm=True,
        tie_word_embeddings=True,
    ),
}


# Llama-3.1-8B: Llama-3-8B's shape with the 128k context and its rope scaling.
PRESETS["llama-3.1-8b"] = PRESETS["llama-3-8b"].model_copy(update={
    "max_position_embeddings": 131072,
    "rope_scaling": RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192),
})


class UnknownPresetError(ValueError):
    """The name is not one of ``PRESETS``."""


def resolve_preset(name: str) -> ModelConfig:
    """The preset called ``name`` (case-insensitive); a one-line error lists the known names."""
    key = name.strip().lower()
    if key not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise UnknownPresetError(f"unknown model preset {name!r}: known presets are {known}")
    return PRESETS[key]
