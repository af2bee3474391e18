"""The accuracy table of the quantized engines: perplexity of the built-in model on the held-out
text (tests/data/heldout.txt, 3,693 tokens) through ``prompt_logprobs``, for every variant of
``benchmarks/bench_perplexity.py`` (which prints the table and writes the record).

Checked here: float32 and bfloat16 agree within 1%, int8-weight is within +1% of bfloat16, and
the AWQ search beats plain round-to-nearest int4 at the same group size. The table's other limits
(fp8 within +2%, int4-awq within +8%) are ``bench_perplexity.LIMITS``; ``failures`` names each one
the table misses, and the record carries them.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_perplexity as bp  # noqa: E402


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return bp.measure(list(bp.VARIANTS), str(tmp_path_factory.mktemp("ppl")), device="cpu", window=1024)


def test_every_variant_scored_on_the_whole_text(table):
    assert [r["variant"] for r in table] == list(bp.VARIANTS)
    tokens = {r["tokens"] for r in table}
    assert len(tokens) == 1 and tokens.pop() >= 3000  # the same windows for every variant
    for r in table:
        assert 1.0 < r["perplexity"] < 100.0, r  # a trained model on English prose


def test_limits_against_bfloat16(table):
    print("\n" + bp.text_table(table, bp.COLUMNS))
    print("\n".join(bp.failures(table)) or "every limit met")
    ppl = {r["variant"]: r["perplexity"] for r in table}
    base = ppl["bfloat16"]
    assert 1 / bp.FLOAT32_LIMIT <= ppl["float32"] / base <= bp.FLOAT32_LIMIT
    assert ppl["int8-weight"] <= base * bp.LIMITS["int8-weight"]
    assert ppl["int4-awq"] < ppl["int4-rtn"]  # the activation-aware search beats plain rounding
    for name in ("fp8", "fp8+fp8kv", "int4-awq"):
        assert ppl[name] > base  # quantization costs something: the scores are of the quantized weights


def test_failures_names_each_missed_limit():
    rows = [{"variant": "bfloat16", "perplexity": 10.0}, {"variant": "float32", "perplexity": 10.0},
            {"variant": "fp8", "perplexity": 10.3}, {"variant": "int8-weight", "perplexity": 10.05},
            {"variant": "int4-awq", "perplexity": 10.5}, {"variant": "int4-rtn", "perplexity": 10.4}]
    missed = bp.failures(rows)
    assert len(missed) == 2
    assert missed[0].startswith("fp8:") and missed[1].startswith("int4-awq:") and "round-to-nearest" in missed[1]
    assert bp.failures(rows[:2] + [{"variant": "fp8", "perplexity": 10.2}]) == []
