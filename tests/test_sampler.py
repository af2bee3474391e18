import math

import pytest
import torch

from kiln.runtime.sampler import SampleRow, Sampler
from kiln.runtime.sampling_params import SamplingParams

V = 32


def row(prompt=(), output=(), generator=None, eos=(), mask=None, **kw):
    kw.setdefault("max_tokens", 1000)
    return SampleRow(SamplingParams(**kw), list(prompt), list(output), generator, tuple(eos), mask)


def random_logits(seed, n=1, vocab=V, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * scale
    assert x.abs().sum() > 0
    return x


def draw_many(logits_row, count, sampler=None, **kw):
    """Draw ``count`` tokens from one logits row in a single batched call."""
    sampler = sampler or Sampler(seed=1234)
    logits = logits_row.unsqueeze(0).expand(count, -1).contiguous()
    res = sampler(logits, [row(**kw) for _ in range(count)])
    return torch.tensor([r.token_id for r in res])


def test_greedy_equals_argmax():
    logits = random_logits(0, n=8)
    res = Sampler(seed=0)(logits, [row(temperature=0.0) for _ in range(8)])
    assert [r.token_id for r in res] == logits.argmax(-1).tolist()
    assert all(r.logprob is None and r.top_logprobs is None and r.rank is None for r in res)


def test_greedy_ties_pick_lowest_index():
    logits = torch.zeros(1, V)
    logits[0, [5, 9, 20]] = 4.0
    res = Sampler()(logits, [row(temperature=0.0, logprobs=1)])
    assert res[0].token_id == 5
    assert res[0].rank == 1


def test_caller_logits_untouched():
    logits = random_logits(1, n=2)
    before = logits.clone()
    Sampler(seed=0)(logits, [row(temperature=0.7, output=[1, 2, 2], presence_penalty=1.0, top_k=5),
                             row(temperature=0.0, repetition_penalty=1.5, prompt=[3])])
    assert torch.equal(logits, before)


def test_seed_reproducible_and_seed_dependent():
    logits = random_logits(2, scale=0.5)

    def run(seed):
        gen = Sampler.make_generator(seed)
        s = Sampler(seed=999)
        toks = []
        for _ in range(50):
            toks.append(s(logits, [row(seed=seed, generator=gen)])[0].token_id)
        return toks

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert len(set(a)) > 3  # actually random, not stuck on one token


def test_sampler_seed_reproducible():
    logits = random_logits(3, n=4, scale=0.5)
    rows = [row() for _ in range(4)]
    s1, s2 = Sampler(seed=5), Sampler(seed=5)
    seq1 = [r.token_id for _ in range(20) for r in s1(logits, rows)]
    seq2 = [r.token_id for _ in range(20) for r in s2(logits, rows)]
    assert seq1 == seq2


def test_seeded_rows_independent_of_batch():
    logits = random_logits(4, n=4, scale=0.5)
    target = logits[2:3]
    alone_gen = Sampler.make_generator(42)
    alone = [Sampler(seed=1)(target, [row(seed=42, generator=alone_gen, top_p=0.9)])[0].token_id
             for _ in range(30)]
    batch_gen = Sampler.make_generator(42)
    other_gen = Sampler.make_generator(43)
    s = Sampler(seed=2)
    mixed = []
    for step in range(30):
        rows = [row(), row(seed=43, generator=other_gen, top_k=3),
                row(seed=42, generator=batch_gen, top_p=0.9), row(temperature=0.0)]
        # Vary the batch's other rows from step to step.
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(step))
        others = logits.clone()
        others[[0, 1, 3]] = logits[perm[:3]]
        others[2] = logits[2]
        mixed.append(s(others, rows)[2].token_id)
    assert alone == mixed


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_stays_in_top_k(k):
    for seed in range(4):
        logits = random_logits(100 + seed, scale=1.0)[0]
        toks = draw_many(logits, 500, temperature=1.5, top_k=k)
        allowed = set(logits.topk(k).indices.tolist())
        assert set(toks.tolist()) <= allowed
        if k > 1:
            assert len(set(toks.tolist())) > 1


def nucleus(logits, p, temperature):
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    keep, mass = [], 0.0
    for t in order.tolist():
        keep.append(t)
        mass += probs[t].item()
        if mass >= p - 1e-6:
            break
    return set(keep)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_top_p_stays_in_nucleus(p):
    for seed in range(4):
        logits = random_logits(200 + seed, scale=1.5)[0]
        toks = draw_many(logits, 500, temperature=0.8, top_p=p)
        allowed = nucleus(logits, p, 0.8)
        assert set(toks.tolist()) <= allowed


def test_top_p_keeps_top_token_even_when_tiny():
    logits = random_logits(5)[0]
    toks = draw_many(logits, 50, top_p=1e-6)
    assert set(toks.tolist()) == {int(logits.argmax())}


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.8])
def test_min_p_threshold(min_p):
    for seed in range(4):
        logits = random_logits(300 + seed, scale=1.5)[0]
        probs = torch.softmax(logits.double(), -1)
        toks = draw_many(logits, 500, temperature=1.0, min_p=min_p)
        assert (probs[toks] >= min_p * probs.max() - 1e-7).all()


def test_combined_filters():
    logits = random_logits(6, scale=1.0)[0]
    toks = draw_many(logits, 2000, temperature=0.9, top_k=8, top_p=0.7, min_p=0.1)
    # top-k first, then the nucleus of the renormalised top-k distribution.
    topk = logits.topk(8).indices
    sub = torch.full_like(logits, float("-inf"))
    sub[topk] = logits[topk]
    allowed = nucleus(sub, 0.7, 0.9)
    probs = torch.softmax(logits.double() / 0.9, -1)
    assert set(toks.tolist()) <= allowed
    assert (probs[toks] >= 0.1 * probs.max() - 1e-7).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_distribution_matches_softmax(temperature):
    vocab = 6
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    n = 20000
    toks = draw_many(logits, n, sampler=Sampler(seed=11), temperature=temperature)
    counts = torch.bincount(toks, minlength=vocab).double()
    expected = torch.softmax(logits.double() / temperature, -1) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    # 5 degrees of freedom: P(chi2 > 25) is about 1.4e-4.
    assert chi2 < 25.0, (counts, expected)


def test_seeded_distribution_matches_softmax():
    logits = torch.tensor([[0.5, 1.5, -0.3, 0.9]])
    gen = Sampler.make_generator(3)
    s = Sampler()
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[s(logits, [row(seed=3, generator=gen)])[0].token_id] += 1
    expected = torch.softmax(logits[0], -1) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 22.0  # 3 degrees of freedom: P(chi2 > 22) is about 6.5e-5


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])
    pen = 2.0
    res = Sampler()(logits, [row(temperature=0.0, prompt=[0, 1], output=[1, 4, 4], logprobs=6,
                                 repetition_penalty=pen)])[0]
    expected = logits[0].clone()
    expected[0] = 2.0 / pen
    expected[1] = -1.0 * pen  # once, though seen twice
    expected[4] = -2.0 * pen
    lp = torch.log_softmax(expected, -1)
    assert res.token_id == 3
    for t in range(6):
        assert math.isclose(res.top_logprobs[t], lp[t].item(), abs_tol=1e-5)


def test_repetition_penalty_flips_argmax():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    plain = Sampler()(logits, [row(temperature=0.0)])[0].token_id
    pen = Sampler()(logits, [row(temperature=0.0, prompt=[0], repetition_penalty=2.0)])[0].token_id
    assert plain == 0 and pen == 1


def test_presence_frequency_penalties():
    logits = random_logits(7, vocab=8)
    out = [2, 2, 2, 5, 7]
    res = Sampler()(logits, [row(temperature=0.0, prompt=[0, 1, 3], output=out, logprobs=8,
                                 presence_penalty=0.7, frequency_penalty=0.4)])[0]
    expected = logits[0].clone()
    for t, c in {2: 3, 5: 1, 7: 1}.items():
        expected[t] -= 0.7 + 0.4 * c
    lp = torch.log_softmax(expected, -1)
    assert res.token_id == int(expected.argmax())
    got = torch.tensor([res.top_logprobs[t] for t in range(8)])
    assert torch.allclose(got, lp, atol=1e-5)


def test_frequency_penalty_flips_argmax_prompt_not_counted():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    # Token 0 in the prompt only: presence/frequency ignore the prompt.
    r1 = Sampler()(logits, [row(temperature=0.0, prompt=[0, 0, 0], frequency_penalty=2.0)])[0]
    assert r1.token_id == 0
    r2 = Sampler()(logits, [row(temperature=0.0, output=[0], frequency_penalty=2.0)])[0]
    assert r2.token_id == 1


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0, 7.0]])
    kw = dict(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert Sampler()(logits, [row(output=[3, 3], eos=(1,), **kw)])[0].token_id == 4
    assert Sampler()(logits, [row(output=[3, 3, 3], eos=(1,), **kw)])[0].token_id == 1
    # Sampling never emits a masked token either.
    toks = draw_many(logits[0], 300, output=[0], eos=(1,), min_tokens=2, stop_token_ids=[2])
    assert not ({1, 2} & set(toks.tolist()))


def test_allowed_mask():
    logits = random_logits(8, scale=1.0)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[[3, 17, 30]] = True
    toks = draw_many(logits[0], 500, mask=mask, temperature=1.0)
    assert set(toks.tolist()) <= {3, 17, 30}
    assert len(set(toks.tolist())) > 1
    greedy = Sampler()(logits, [row(temperature=0.0, mask=mask, logprobs=2)])[0]
    assert greedy.token_id == max([3, 17, 30], key=lambda t: logits[0, t].item())
    assert set(greedy.top_logprobs) <= {3, 17, 30}


def test_logprobs_match_log_softmax_of_penalised_logits():
    logits = random_logits(9, n=3)
    rows = [
        row(temperature=0.8, logprobs=5, output=[1, 1, 4], repetition_penalty=1.3,
            presence_penalty=0.5, frequency_penalty=0.2, prompt=[7, 8]),
        row(temperature=0.0, logprobs=0),
        row(temperature=1.0, top_k=2, logprobs=3),
    ]
    res = Sampler(seed=3)(logits, rows)
    pen = logits[0].clone()
    for t in {1, 4, 7, 8}:
        pen[t] = pen[t] / 1.3 if pen[t] > 0 else pen[t] * 1.3
    pen[1] -= 0.5 + 0.2 * 2
    pen[4] -= 0.5 + 0.2 * 1
    for r, base in zip(res, [pen, logits[1], logits[2]]):
        lp = torch.log_softmax(base, -1)
        assert math.isclose(r.logprob, lp[r.token_id].item(), abs_tol=1e-5)
        assert r.rank == int((lp > lp[r.token_id]).sum()) + 1
        assert r.top_logprobs[r.token_id] == pytest.approx(r.logprob)
    lp_top = torch.log_softmax(pen, -1).topk(5)
    assert set(lp_top.indices.tolist()) <= set(res[0].top_logprobs)
    for t, v in zip(lp_top.indices.tolist(), lp_top.values.tolist()):
        assert math.isclose(res[0].top_logprobs[t], v, abs_tol=1e-5)
    assert list(res[1].top_logprobs) == [res[1].token_id] and res[1].rank == 1
    assert len(res[2].top_logprobs) in (3, 4)
    # top-k acts on sampling only, not on the reported logprobs.
    assert res[2].token_id in set(logits[2].topk(2).indices.tolist())


def test_mixed_batch_fast_and_slow_paths():
    logits = random_logits(10, n=5)
    rows = [row(temperature=0.0), row(temperature=0.0, output=[int(logits[1].argmax())],
                                      repetition_penalty=10.0),
            row(temperature=0.0), row(temperature=1.0, top_k=1), row(temperature=0.0, logprobs=1)]
    res = Sampler(seed=0)(logits, rows)
    am = logits.argmax(-1).tolist()
    assert res[0].token_id == am[0] and res[2].token_id == am[2] and res[4].token_id == am[4]
    assert res[3].token_id == am[3]
    assert res[1].token_id != am[1] or logits[1].max() <= 0


def test_empty_batch():
    assert Sampler()(torch.zeros(0, V), []) == []


def test_mask_allowing_nothing_falls_back_to_unmasked():
    logits = random_logits(11, n=2)
    mask = torch.zeros(V, dtype=torch.bool)
    res = Sampler()(logits, [row(temperature=0.0, mask=mask), row(temperature=0.0, mask=~mask)])
    assert [r.token_id for r in res] == logits.argmax(-1).tolist()


def test_generator_on_sampler_only_when_unseeded():
    # Unseeded rows share the sampler's generator: two samplers with one seed agree,
    # and a seeded row in the batch does not disturb them.
    logits = random_logits(12, n=3, scale=0.3)
    a, b = Sampler(seed=9), Sampler(seed=9)
    ga, gb = Sampler.make_generator(1), Sampler.make_generator(2)
    for _ in range(10):
        ra = a(logits, [row(), row(seed=1, generator=ga), row()])
        rb = b(logits, [row(), row(seed=2, generator=gb), row()])
        assert (ra[0].token_id, ra[2].token_id) == (rb[0].token_id, rb[2].token_id)


def test_logit_bias_is_added_before_everything_else():
    logits = random_logits(7, n=3)
    top = int(logits[0].argmax())
    low = int(logits[0].argmin())
    rows = [row(temperature=0.0), row(temperature=0.0, logit_bias={low: 100.0}),
            row(temperature=0.0, logit_bias={top: -100.0}, logprobs=1)]
    res = Sampler(seed=0)(logits[[0, 0, 0]].clone(), rows)
    assert res[0].token_id == top and res[1].token_id == low
    biased = logits[0].clone()
    biased[top] -= 100.0
    assert res[2].token_id == int(biased.argmax())
    # the log-probability is the biased distribution's (as OpenAI reports it)
    assert res[2].logprob == pytest.approx(float(torch.log_softmax(biased, -1)[res[2].token_id]), abs=1e-5)
    # sampled: a token biased by -100 is never drawn; one biased by +100 always is
    draws = draw_many(logits[0], 400, temperature=1.0, logit_bias={top: -100.0})
    assert not (draws == top).any()
    assert (draw_many(logits[0], 50, temperature=1.0, logit_bias={low: 100.0}) == low).all()


def test_logit_bias_checked():
    with pytest.raises(ValueError):
        SamplingParams(logit_bias={3: 100.5})
    with pytest.raises(ValueError):
        SamplingParams(logit_bias={-1: 1.0})
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(logit_bias={"17": -3}).logit_bias == {17: -3.0}
