"""Shared fixtures: tiny checkpoints saved by transformers, engines built from them, the built-in model."""

from __future__ import annotations

import os

import pytest
import torch

from kiln.runtime.builder import build_engine
from kiln.runtime.config import BuildConfig

HF_ARCHS = {
    "llama": dict(
        cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    "llama-mha-tied": dict(
        cls="LlamaConfig", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True,
    ),
    "mistral-mqa": dict(
        cls="MistralConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        cls="Qwen2Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "qwen3": dict(
        cls="Qwen3Config", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
    ),
    "mixtral": dict(
        cls="MixtralConfig", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        cls="Qwen3MoeConfig", hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    ),
}


def make_hf_model(arch: str, vocab_size: int = 512, seed: int = 0):
    import transformers

    spec = dict(HF_ARCHS[arch])
    cls = getattr(transformers, spec.pop("cls"))
    cfg = cls(vocab_size=vocab_size, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    # Norm weights start at one; perturb them so a missing or swapped norm shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """arch -> (folder, transformers model)."""
    out = {}
    for arch in HF_ARCHS:
        d = tmp_path_factory.mktemp(f"hf-{arch}")
        m = make_hf_model(arch)
        m.save_pretrained(d)
        out[arch] = (str(d), m)
    return out


def build_small(model: str, out: str, dtype: str = "float32", **kw) -> str:
    return build_engine(model, out, BuildConfig(dtype=dtype, max_seq_len=kw.pop("max_seq_len", 256), **kw), device_class="cpu", progress=False)


@pytest.fixture(scope="session")
def smollm_engine(tmp_path_factory):
    """The built-in model built in float32 for the CPU."""
    return build_small("smollm2-135m-instruct", str(tmp_path_factory.mktemp("eng") / "smollm2"), max_seq_len=2048)


@pytest.fixture(scope="session")
def smollm_hf():
    """transformers' own model and tokenizer, loaded from the same GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.runtime.checkpoint import builtin_gguf_path

    path = builtin_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def small_engine(small_checkpoint, tmp_path_factory):
    """A small random Llama (transformers-initialised, wide logits so greedy ties are rare) built
    for the CPU: fast enough to run hundreds of requests with long prompts in CI."""
    return build_small(small_checkpoint, str(tmp_path_factory.mktemp("eng") / "small"), max_seq_len=1024)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """The Hugging Face folder behind ``small_engine``."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.08, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("small-hf")
    model.save_pretrained(d)
    return str(d)
