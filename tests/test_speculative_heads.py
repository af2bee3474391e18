"""Speculative decoding with Medusa heads and an EAGLE layer (``runtime/heads.py``), saved in the
layouts their projects publish: greedy outputs are the target's own token for token (in flight,
under preemption, through an abort storm, with no block leaked); heads that know the target are
always right; at temperature 1 the first generated tokens keep the target's distribution; the
Medusa logits equal a plain-torch evaluation of the saved tensors, the EAGLE proposal equals one
made with transformers' own decoder layer; bad heads are refused with one line."""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter

import pytest
import torch
from torch import nn

from kiln.runtime import LLM
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from test_batching import make_workload
from test_speculative import Solo, assert_equal_solo, homogeneity_p, one_thread, run_over_time  # noqa: F401


# --- heads written the way their projects write them --------------------------------------------------
class ResBlock(nn.Module):
    """Medusa's residual block: ``x + silu(linear(x))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def save_medusa(out: str, hidden: int, vocab: int, num_heads: int, num_layers: int = 1, fmt: str = "safetensors",
                seed: int = 0, lm_heads=None, std: float = 0.05, config_edit=None) -> str:
    """Medusa heads as ``MedusaModel.medusa_head`` holds them (a ModuleList of Sequential(ResBlock * L,
    Linear without bias); the ResBlock repeated, as Medusa builds it), saved with their state-dict names
    beside a config.json. ``lm_heads[i]``: head i's LM head, with its ResBlocks set to zero (identity)."""
    torch.manual_seed(seed)
    heads = nn.ModuleList([nn.Sequential(*([ResBlock(hidden)] * num_layers), nn.Linear(hidden, vocab, bias=False))
                           for _ in range(num_heads)])
    for p in heads.parameters():
        nn.init.normal_(p, std=std)
    for i, w in enumerate(lm_heads or []):
        heads[i][-1].weight.data.copy_(w)
        for j in range(num_layers):
            heads[i][j].linear.weight.data.zero_()
            heads[i][j].linear.bias.data.zero_()
    os.makedirs(out, exist_ok=True)
    sd = heads.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in sd.items()}, os.path.join(out, "medusa_lm_head.safetensors"))
    else:
        torch.save(sd, os.path.join(out, "medusa_lm_head.pt"))
    cfg = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "base_model_name_or_path": "target"}
    if config_edit:
        config_edit(cfg)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def eagle_config(target_folder: str):
    import transformers

    t = transformers.AutoConfig.from_pretrained(target_folder)
    cfg = transformers.LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                    num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                                    max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                                    num_hidden_layers=1)
    cfg._attn_implementation = "eager"  # transformers' reference layer runs on its own
    return cfg


class EagleDraft(nn.Module):
    """EAGLE-1/2's draft module: ``embed_tokens``, ``fc`` over concat(embedding, feature) and one
    llama decoder layer whose first (index 0) input norm is absent."""

    def __init__(self, cfg, bias: bool = True):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layer = LlamaDecoderLayer(cfg, 0)
        layer.input_layernorm = nn.Identity()
        self.layers = nn.ModuleList([layer])
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=bias)


def save_eagle(out: str, target_folder: str, seed: int = 0, std: float = 0.05, edit=None, config_edit=None,
               drop=()) -> str:
    """An EAGLE draft saved as EAGLE publishes one: the module's state dict in pytorch_model.bin
    (with the target's embedding table) and a llama config.json with ``bias``."""
    import transformers

    cfg = eagle_config(target_folder)
    torch.manual_seed(seed)
    d = EagleDraft(cfg)
    for n, p in d.named_parameters():
        nn.init.normal_(p, mean=1.0 if "norm" in n else 0.0, std=std)
    target = transformers.AutoModelForCausalLM.from_pretrained(target_folder, dtype=torch.float32)
    d.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight)
    if edit:
        edit(d)
    os.makedirs(out, exist_ok=True)
    sd = {k: v for k, v in d.state_dict().items() if k not in drop}
    torch.save(sd, os.path.join(out, "pytorch_model.bin"))
    c = cfg.to_dict()
    c.update(architectures=["LlamaForCausalLM"], bias=True)
    if config_edit:
        config_edit(c)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f)
    return out


# --- targets ------------------------------------------------------------------------------------------
def chain_target(folder: str, scale: float = 1.0, noise: float = 0.0, seed: int = 0):
    """A one-layer llama of 256 tokens and 256 hidden units whose next token follows a fixed
    permutation ``f``: one-hot embeddings, attention and MLP outputs zeroed, and an LM head
    ``scale * P_f + noise * N`` (so greedy decoding walks x, f(x), f(f(x)), ...; with noise and a
    small scale, sampling wanders). Returns (folder, P_f as a [256, 256] matrix)."""
    import transformers

    v = 256
    cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=v, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    perm = torch.randperm(v)
    P = torch.zeros(v, v)
    P[perm, torch.arange(v)] = 1.0  # column x holds a one at row f(x)
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.eye(v))
        m.model.layers[0].self_attn.o_proj.weight.zero_()
        m.model.layers[0].mlp.down_proj.weight.zero_()
        m.model.norm.weight.fill_(1.0)
        m.lm_head.weight.copy_(scale * P + noise * torch.randn(v, v))
    m.save_pretrained(folder)
    return folder, P


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from conftest import build_small

    d = tmp_path_factory.mktemp("chain")
    folder, P = chain_target(str(d / "hf"))
    return build_small(folder, str(d / "engine"), max_seq_len=512), folder, P


@pytest.fixture(scope="module")
def heads(small_checkpoint, tmp_path_factory):
    """Random heads for the small target: Medusa (3 heads of one ResBlock) and EAGLE."""
    d = tmp_path_factory.mktemp("heads")
    return {"medusa": save_medusa(str(d / "medusa"), 128, 2048, 3),
            "eagle": save_eagle(str(d / "eagle"), small_checkpoint)}


@pytest.fixture(scope="module")
def solo(small_engine):
    return Solo(small_engine)


def spec(method: str, folder: str, k: int = 3, **kw) -> dict:
    return {"method": method, "model": folder, "num_speculative_tokens": k, **kw}


def assert_nothing_leaked(engine: LLMEngine) -> None:
    st = engine.stats()
    assert st["kv_blocks_used"] == 0 and engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()
    h = engine.heads
    if hasattr(h, "blocks"):
        assert st["spec_draft_kv_blocks_used"] == 0 and not h.seqs and not h.blocks.tables
    else:
        assert not h.last
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


# --- greedy: the target's own outputs -------------------------------------------------------------
@pytest.mark.parametrize("method", ["medusa", "eagle"])
@pytest.mark.parametrize("name, kwargs", [
    ("in-flight", dict(num_kv_blocks=2048, max_num_tokens=256)),
    ("preemption", dict(num_kv_blocks=24, max_num_tokens=128, scheduler_policy="max_utilization")),
])
def test_greedy_equals_the_target_alone(method, name, kwargs, small_engine, heads, solo):
    """Mixed requests (plain, repetition penalty, stop token with min_tokens, logprobs and n=2
    rows that do not speculate) arriving over time; proposals every step (min_acceptance 0)."""
    workload = make_workload(seed=1, count=24, max_prompt=80, max_out=20, shared_prefix=32)
    engine = LLMEngine(small_engine, speculative_config=spec(method, heads[method], min_acceptance=0.0), **kwargs)
    step = engine.step

    def checked_step():
        out = step()
        held = engine.heads.seqs if method == "eagle" else engine.heads.last
        # state only for running sequences: finished, aborted and preempted ones gave it back
        assert set(held) <= {s.seq_id for s in engine.scheduler.running}
        return out
    engine.step = checked_step
    outputs = run_over_time(engine, workload)
    assert_equal_solo(outputs, workload, solo)
    st = engine.stats()
    assert st["spec_proposed_tokens"] > 200
    assert_nothing_leaked(engine)
    if name == "preemption":
        assert st["preemptions"] > 0


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_abort_storm_leaks_nothing(method, small_engine, heads, solo):
    rng = random.Random(5)
    workload = make_workload(seed=3, count=48, max_prompt=40, max_out=12, shared_prefix=16)
    abort = {rid: rng.randint(0, 20) for rid, _, _ in rng.sample(workload, len(workload) // 3)}
    engine = LLMEngine(small_engine, num_kv_blocks=80, max_num_tokens=128, max_batch_size=24,
                       scheduler_policy="max_utilization", speculative_config=spec(method, heads[method], min_acceptance=0.0))
    outputs = run_over_time(engine, workload, per_step=4, abort=abort)
    assert_equal_solo(outputs, workload, solo, skip=set(abort))
    assert engine.stats()["spec_proposed_tokens"] > 0
    assert_nothing_leaked(engine)


# --- heads that know the target ------------------------------------------------------------------
def chain_prompts(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_heads_that_know_the_target_are_always_right(method, chain, tmp_path):
    """On the permutation target, Medusa head i with LM head P^(i+2) (ResBlocks zero) and an EAGLE
    layer whose fc keeps the token embedding (attention and MLP outputs zero) propose exactly the
    target's next tokens: every proposal stands, also with prefix-cache hits and preemption."""
    engine_dir, folder, P = chain
    if method == "medusa":
        d = save_medusa(str(tmp_path / "m"), 256, 256, 4, lm_heads=[torch.linalg.matrix_power(P, i + 2) for i in range(4)])
    else:
        def exact(m):
            with torch.no_grad():
                m.fc.weight.zero_()
                m.fc.weight[:, :256].copy_(torch.eye(256))
                m.fc.bias.zero_()
                m.layers[0].self_attn.o_proj.weight.zero_()
                m.layers[0].mlp.down_proj.weight.zero_()
        d = save_eagle(str(tmp_path / "e"), folder, edit=exact)
    prompts = chain_prompts(24)
    prompts += [p[:5] + [7, 8, 9] for p in prompts[:6]]  # shared beginnings: prefix-cache hits
    sp = [SamplingParams(max_tokens=random.Random(i).randint(1, 30), temperature=0.0, ignore_eos=True)
          for i in range(len(prompts))]
    ref = [o.outputs[0].token_ids for o in LLM(engine_dir).generate(prompts, sp)]
    for p, r in zip(prompts, ref):  # the target walks its permutation
        x = p[-1]
        for t in r:
            assert t == int(P[:, x].argmax())
            x = t
    for kw in (dict(), dict(num_kv_blocks=12, max_num_tokens=64, scheduler_policy="max_utilization")):
        llm = LLM(engine_dir, speculative_config=spec(method, d, k=4), **kw)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        st = llm.stats()
        assert got == ref
        assert st["spec_proposed_tokens"] > 100 and st["spec_acceptance_rate"] == 1.0, st
        if kw:
            assert st["preemptions"] > 0


# --- sampling keeps the target's distribution -----------------------------------------------------------
@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_sampling_keeps_the_target_distribution(method, tmp_path):
    """The first three generated tokens over 3,000 seeded draws at temperature 1, with and without
    speculation: one distribution (chi-square homogeneity, p > 0.01). The target follows its
    permutation with probability about one half; the heads propose that chain, so proposals
    stand about as often as they fall."""
    from conftest import build_small

    folder, P = chain_target(str(tmp_path / "hf"), scale=0.5, noise=0.12, seed=3)
    engine_dir = build_small(folder, str(tmp_path / "engine"), max_seq_len=64)
    if method == "medusa":
        d = save_medusa(str(tmp_path / "m"), 256, 256, 3, lm_heads=[torch.linalg.matrix_power(P, i + 2) for i in range(3)])
    else:
        def exact(m):
            with torch.no_grad():
                m.fc.weight.zero_()
                m.fc.weight[:, :256].copy_(torch.eye(256))
                m.layers[0].self_attn.o_proj.weight.zero_()
                m.layers[0].mlp.down_proj.weight.zero_()
        d = save_eagle(str(tmp_path / "e"), folder, edit=exact)
    draws, prompt = 3000, [5, 17, 99, 3]
    params = [[SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True, seed=i + run * draws) for i in range(draws)]
              for run in range(2)]
    kw = dict(max_batch_size=512, max_num_tokens=4096)
    base = Counter(tuple(o.outputs[0].token_ids[:3]) for o in LLM(engine_dir, **kw).generate([prompt] * draws, params[0]))
    llm = LLM(engine_dir, speculative_config=spec(method, d, k=2, min_acceptance=0.0), **kw)
    got = Counter(tuple(o.outputs[0].token_ids[:3]) for o in llm.generate([prompt] * draws, params[1]))
    st = llm.stats()
    p, dof = homogeneity_p(base, got)
    print(f"{method}: p={p:.3f} dof={dof} proposed={st['spec_proposed_tokens']} accepted={st['spec_accepted_tokens']}")
    assert 0.15 < st["spec_acceptance_rate"] < 0.85
    assert dof >= 10 and not math.isnan(p) and p > 0.01


# --- independent references -----------------------------------------------------------------------
def test_medusa_logits_equal_plain_torch(small_engine, tmp_path):
    """Two ResBlocks per head (Medusa's repeated block, saved with torch.save): the proposer's
    logits and proposals equal the saved tensors evaluated by hand."""
    from kiln.runtime.heads import MedusaProposer

    d = save_medusa(str(tmp_path / "m"), 128, 2048, 4, num_layers=2, fmt="pt", std=0.1)
    sd = torch.load(os.path.join(d, "medusa_lm_head.pt"))
    llm = LLM(small_engine)
    prop = MedusaProposer(d, llm.engine.executor.runner.model, 3)
    h = torch.randn(5, 128)
    for i in range(3):
        x = h
        for j in range(2):
            x = x + torch.nn.functional.silu(x @ sd[f"{i}.{j}.linear.weight"].T + sd[f"{i}.{j}.linear.bias"])
        want = x @ sd[f"{i}.2.weight"].T
        torch.testing.assert_close(prop.heads.head_logits(i, h), want, rtol=1e-5, atol=1e-5)
    prop.observe({7: (3, h[:2])})  # positions 3 and 4: the newest hidden state is position 4's
    ref = []
    for i in range(3):
        x = h[1:2]
        for j in range(2):
            x = x + torch.nn.functional.silu(x @ sd[f"{i}.{j}.linear.weight"].T + sd[f"{i}.{j}.linear.bias"])
        ref.append(int((x @ sd[f"{i}.2.weight"].T).argmax()))
    assert prop.propose([(7, [0] * 6, 3)])[7] == ref
    assert prop.propose([(7, [0] * 7, 3)]) == {}  # its hidden state is not the newest token's


def test_eagle_proposal_equals_transformers(small_checkpoint, small_engine, heads):
    """The first proposal after a prompt: the saved EAGLE module run by transformers' own decoder
    layer over the whole prompt (features from transformers' target, tokens shifted by one) and
    the target's LM head, against the proposer's."""
    import transformers

    target = transformers.AutoModelForCausalLM.from_pretrained(small_checkpoint, dtype=torch.float32).eval()
    cfg = eagle_config(small_checkpoint)
    draft = EagleDraft(cfg)
    draft.load_state_dict(torch.load(os.path.join(heads["eagle"], "pytorch_model.bin")))
    draft.eval()
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 2048) for _ in range(n)] for n in (9, 23, 40)]
    eng = LLMEngine(small_engine, speculative_config=spec("eagle", heads["eagle"], k=1, min_acceptance=0.0))
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    eng.step()  # the prefills: features of every prompt position reach the layer
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    with torch.no_grad():
        for seq in eng.scheduler.running:
            toks = seq.token_ids  # the prompt and the target's first token
            ids = torch.tensor([toks[:-1]])
            feats = target.model(ids).last_hidden_state  # after the final norm, as EAGLE reads them
            x = draft.fc(torch.cat([draft.embed_tokens(torch.tensor([toks[1:]])), feats], dim=-1))
            pos = torch.arange(len(toks) - 1)[None]
            mask = torch.full((len(toks) - 1, len(toks) - 1), float("-inf")).triu(1)[None, None]
            out = draft.layers[0](x, attention_mask=mask, position_ids=pos, position_embeddings=rotary(x, pos))
            out = out[0] if isinstance(out, tuple) else out
            want = int(target.lm_head(out[0, -1]).argmax())
            assert eng.heads.propose([(seq.seq_id, toks, 1)]) == {seq.seq_id: [want]}


# --- bad input --------------------------------------------------------------------------------------------
def refused(cfg, *words, **kw):
    with pytest.raises(ValueError) as e:
        LLM(kw.pop("engine"), speculative_config=cfg, **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_heads(small_engine, small_checkpoint, heads, tmp_path):
    m, e = heads["medusa"], heads["eagle"]
    refused(spec("medusa", str(tmp_path / "nope")), "does not exist", engine=small_engine)
    refused(spec("eagle", str(tmp_path / "nope")), "does not exist", engine=small_engine)
    refused({"method": "medusa", "num_speculative_tokens": 2}, "needs model", engine=small_engine)
    refused(spec("medusa", m, k=4), "num_speculative_tokens 4 exceeds the 3 Medusa heads", engine=small_engine)
    os.makedirs(tmp_path / "empty")
    with open(tmp_path / "empty" / "config.json", "w") as f:
        json.dump({"medusa_num_heads": 2, "medusa_num_layers": 1}, f)
    refused(spec("medusa", str(tmp_path / "empty"), k=2), "medusa_lm_head.safetensors", engine=small_engine)
    refused(spec("medusa", save_medusa(str(tmp_path / "h64"), 64, 2048, 2), k=2), "hidden states of size 64", "128",
            engine=small_engine)
    refused(spec("medusa", save_medusa(str(tmp_path / "v"), 128, 1000, 2), k=2), "vocabulary of 1000", "2048",
            engine=small_engine)
    refused(spec("medusa", save_medusa(str(tmp_path / "nohead"), 128, 2048, 2,
                                       config_edit=lambda c: c.pop("medusa_num_heads")), k=2),
            "medusa_num_heads", engine=small_engine)
    # misnamed tensors: a head saved under another name
    from safetensors.torch import load_file, save_file

    src = load_file(os.path.join(m, "medusa_lm_head.safetensors"))
    bad = str(tmp_path / "misnamed")
    os.makedirs(bad)
    save_file({k.replace("1.0.linear", "1.0.lin"): v for k, v in src.items()}, os.path.join(bad, "medusa_lm_head.safetensors"))
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({"medusa_num_heads": 3, "medusa_num_layers": 1}, f)
    refused(spec("medusa", bad, k=2), "lacks tensor '1.0.linear.weight'", engine=small_engine)
    # EAGLE: missing tensors, a size that is not the target's, a layer count kiln does not run
    refused(spec("eagle", save_eagle(str(tmp_path / "nofc"), small_checkpoint, drop=("fc.weight",))),
            "lacks tensor 'fc.weight'", engine=small_engine)
    refused(spec("eagle", save_eagle(str(tmp_path / "e2"), small_checkpoint,
                                     config_edit=lambda c: c.update(num_hidden_layers=2))), "2 layers", engine=small_engine)
    refused(spec("eagle", save_eagle(str(tmp_path / "ev"), small_checkpoint,
                                     config_edit=lambda c: c.update(vocab_size=4096))), "vocabulary of 4096",
            engine=small_engine)
    refused(spec("eagle", save_eagle(str(tmp_path / "eh"), small_checkpoint,
                                     config_edit=lambda c: c.update(hidden_size=64))), "hidden size 64", engine=small_engine)
    refused(spec("eagle", e), "local and torchrun", engine=small_engine, launcher="ray")


def test_pipeline_targets_are_refused(small_checkpoint, heads, tmp_path):
    from conftest import build_small

    pp = build_small(small_checkpoint, str(tmp_path / "pp"), max_seq_len=256, pp=2)
    refused(spec("medusa", heads["medusa"]), "pipeline stages", engine=pp)

