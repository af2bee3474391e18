"""The coordinator's speculation budget (``speculative.within_budget``): which proposals a step
verifies when it has room for fewer than the sequences would make."""

from __future__ import annotations

from kiln.runtime.speculative import within_budget


def test_no_budget_or_room_for_all_keeps_every_proposal():
    wants = [(0.9, 4), (None, 2), (0.1, 3)]
    assert within_budget(wants, None) == [4, 2, 3]
    assert within_budget(wants, 9) == [4, 2, 3]
    assert within_budget([], 4) == []


def test_budget_goes_to_the_highest_expected_yield():
    # yields: a=0.9 -> .9 .81 .729 .656; a=0.5 -> .5 .25; a=0.1 -> .1 .01 .001
    wants = [(0.9, 4), (0.5, 2), (0.1, 3)]
    assert within_budget(wants, 5) == [4, 1, 0]
    assert within_budget(wants, 6) == [4, 2, 0]
    assert within_budget(wants, 7) == [4, 2, 1]
    assert within_budget(wants, 0) == [0, 0, 0]


def test_unmeasured_sequences_use_the_prior_and_ties_go_first_come():
    # equal yields: every sequence's first proposal before anyone's second, earlier sequences first
    assert within_budget([(None, 2), (0.5, 2), (None, 2)], 3, prior=0.5) == [1, 1, 1]
    assert within_budget([(None, 2), (0.5, 2), (None, 2)], 4, prior=0.5) == [2, 1, 1]
    assert within_budget([(0.6, 3), (None, 3)], 2, prior=0.7) == [1, 1]  # .7 then .6
    assert within_budget([(0.6, 3), (None, 3)], 3, prior=0.7) == [1, 2]  # then .49 (.7 ** 2) before .36


def test_a_sequence_keeps_a_prefix_of_its_proposals():
    """With equal rates (a = 1: every proposal yields one token) the budget is spent sequence by
    sequence, each keeping its first proposals, never a later one without an earlier one."""
    got = within_budget([(1.0, 3), (1.0, 3), (1.0, 3)], 4)
    assert got == [3, 1, 0] and sum(got) == 4


def test_step_budget_cuts_proposals_and_keeps_outputs(small_engine):
    """Eight speculating sequences: with no budget every proposal is verified; a budget of 12
    tokens a step leaves room for 4 proposals beside the 8 decode rows; a budget of 8 leaves none.
    The outputs stay the target's in each case, and the cuts are counted."""
    from kiln.runtime.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams

    prompts = [list(range(100 + 7 * i, 130 + 7 * i)) * 3 for i in range(8)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(small_engine).generate(prompts, sp)]
    spec = {"method": "ngram", "num_speculative_tokens": 4, "min_acceptance": 0.0}
    stats = {}
    for budget in (None, 12, 8):
        llm = LLM(small_engine, speculative_config={**spec, "step_token_budget": budget})
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == ref
        stats[budget] = llm.stats()
        assert stats[budget]["spec_step_token_budget"] == budget  # a CPU engine has no default limit
    assert stats[None]["spec_budget_cut_tokens"] == 0 and stats[None]["spec_proposed_tokens"] > 0
    assert 0 < stats[12]["spec_proposed_tokens"] < stats[None]["spec_proposed_tokens"]
    assert stats[12]["spec_budget_cut_tokens"] > 0
    assert stats[8]["spec_proposed_tokens"] == 0 and stats[8]["spec_budget_cut_tokens"] > 0
