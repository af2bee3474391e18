"""The wire between API server processes and the engine core process.

Every frame is one msgpack array whose first element names its kind; nothing is pickled, and a
frame that does not match its schema is dropped by the receiver with a warning.

API server -> engine core: a DEALER socket (its routing id names the API process) connected to
the core's ROUTER socket::

    [HELLO, {"version", "output": address, "api_index", "pid"}]
    [ADD, [[request_id, prompt_token_ids, sampling_params (dict), priority], ...]]
    [ABORT, [request_id, ...]]
    [STATS, token]                       # asks for the core's stats now
    [CONFIG, {"max_waiting": int | None}]
    [BYE]                                # this API process is leaving; its requests are aborted

Engine core -> API server: a PUSH socket per API process, connected to the address the API
process bound and named in its HELLO::

    [READY, {"version", "pid", "max_waiting", "stats"}]
    [STEP, [output, ...], stats]         # one frame per engine step: all of that step's outputs
                                         # for the requests of this API process
    [REJECT, [[request_id, kind, message, code, param], ...]]   # kind: invalid, queue_full,
                                                                # draining, error
    [STATS, token | None, stats]         # a reply to STATS, or a heartbeat (token None)
    [DRAINING]                           # the core is shutting down: no new requests
    [DEAD, message]                      # the step loop failed; the core exits
    [BYE]                                # the core exits normally

An output carries a ``RequestOutput`` as the changes since the last frame: ``[request_id,
[request fields], [[index, [completion fields]], ...]]``, the fields in the order of
``REQUEST_WIRE`` and ``COMPLETION_WIRE``. A ``LATEST`` field is sent whole each time; an
``APPEND`` field (a list or string that only grows) is sent as ``[start, new items]``, or None
when nothing is new. Fields in ``REQUEST_LOCAL`` / ``COMPLETION_LOCAL`` never travel: the API
process knows them already (it tokenized the prompt). A new field of ``RequestOutput`` or
``CompletionOutput`` goes into one of these tables; ``check_schema`` says if one is missing.
"""

from __future__ import annotations

import dataclasses

import msgpack

from kiln.runtime.outputs import CompletionOutput, Logprob, RequestOutput

WIRE_VERSION = 1

HELLO, ADD, ABORT, STATS, CONFIG, BYE = "hello", "add", "abort", "stats", "config", "bye"
READY, STEP, REJECT, DRAINING, DEAD = "ready", "step", "reject", "draining", "dead"

LATEST, APPEND = "latest", "append"


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# --- field codecs ------------------------------------------------------------------------------------
def _encode_entry(entry: dict | None):
    """A logprob entry ``{token_id: Logprob}`` as ``[[token_id, logprob, rank, decoded], ...]``."""
    if entry is None:
        return None
    return [[t, lp.logprob, lp.rank, lp.decoded_token] for t, lp in entry.items()]


def _decode_entry(rows):
    if rows is None:
        return None
    return {int(t): Logprob(lp, rank, dec) for t, lp, rank, dec in rows}


LOGPROB_ENTRY = (_encode_entry, _decode_entry)

# (field, mode, codec for the value of a LATEST field or each item of an APPEND field)
REQUEST_WIRE = (
    ("finished", LATEST, None),
    ("error", LATEST, None),
    ("num_cached_tokens", LATEST, None),
    ("metrics", LATEST, None),
    ("prompt_logprobs", APPEND, LOGPROB_ENTRY),
)
REQUEST_LOCAL = ("request_id", "prompt", "prompt_token_ids", "outputs")
COMPLETION_WIRE = (
    ("text", APPEND, None),
    ("token_ids", APPEND, None),
    ("cumulative_logprob", LATEST, None),
    ("logprobs", APPEND, LOGPROB_ENTRY),
    ("finish_reason", LATEST, None),
    ("stop_reason", LATEST, None),
)
COMPLETION_LOCAL = ("index",)


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


_REQUEST_NAMES = _names(RequestOutput)
_COMPLETION_NAMES = _names(CompletionOutput)


def check_schema() -> list[str]:
    """Fields of the output dataclasses that the wire tables do not name (empty when complete)."""
    missing = []
    for cls, wire, local in ((RequestOutput, REQUEST_WIRE, REQUEST_LOCAL), (CompletionOutput, COMPLETION_WIRE, COMPLETION_LOCAL)):
        known = {name for name, _, _ in wire} | set(local)
        missing += [f"{cls.__name__}.{n}" for n in sorted(_names(cls) - known)]
    return missing


# --- the core's side ---------------------------------------------------------------------------------
def _encode_field(value, mode, codec, sent: dict, key):
    if mode is LATEST:
        return value if codec is None else codec[0](value)
    if value is None:
        return None
    n = sent.get(key)
    size = len(value)
    if n == size:
        return None
    start = 0 if n is None else min(n, size)
    sent[key] = size
    items = value[start:]
    return [start, items if codec is None else [codec[0](x) for x in items]]


def _append(value, sent: dict, key, codec):
    """``_encode_field`` for an APPEND field (the hot path of ``OutputEncoder.encode``)."""
    if value is None:
        return None
    size = len(value)
    n = sent.get(key)
    if n == size:
        return None
    start = 0 if n is None else (n if n < size else size)
    sent[key] = size
    items = value[start:]
    return [start, items if codec is None else [codec(x) for x in items]]


_FAST_REQUEST = ("finished", "error", "num_cached_tokens", "metrics", "prompt_logprobs")
_FAST_COMPLETION = ("text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason", "stop_reason")
_FAST = (tuple(n for n, _, _ in REQUEST_WIRE) == _FAST_REQUEST
         and tuple(n for n, _, _ in COMPLETION_WIRE) == _FAST_COMPLETION)
"""Whether the tables still name the fields ``OutputEncoder.encode`` spells out (else it takes
the table-driven path)."""
DIRECT_ENCODING = _FAST
"""Whether ``OutputEncoder.encode_request`` may stand in for ``encode`` of a snapshot."""
_ENC_LP = LOGPROB_ENTRY[0]
_COMP_KEYS: dict[int, tuple] = {}


def _comp_keys(i: int) -> tuple:
    k = _COMP_KEYS.get(i)
    if k is None:
        k = _COMP_KEYS[i] = ((i, "text"), (i, "token_ids"), (i, "logprobs"))
    return k


def _by_index(seq) -> int:
    return seq.index


class OutputEncoder:
    """Turns successive ``RequestOutput`` snapshots of one API process's requests into deltas.

    It runs for every request of every step on the engine core's loop: ``encode`` spells the
    tables' fields out (the same values as ``encode_by_table``, a test holds them equal) at a third
    of the table-driven cost, and ``encode_request`` reads an in-process engine's request state
    without the snapshot."""

    def __init__(self):
        self._sent: dict[str, dict] = {}

    def encode(self, out: RequestOutput) -> list:
        if not _FAST:
            return self.encode_by_table(out)
        rid = out.request_id
        sent = self._sent.get(rid)
        if sent is None:
            sent = self._sent[rid] = {}
        req = [out.finished, out.error, out.num_cached_tokens, out.metrics,
               _append(out.prompt_logprobs, sent, "prompt_logprobs", _ENC_LP)]
        comps = []
        for c in out.outputs:
            i = c.index
            kt, ki, kl = _comp_keys(i)
            comps.append([i, [_append(c.text, sent, kt, None), _append(c.token_ids, sent, ki, None),
                              c.cumulative_logprob, _append(c.logprobs, sent, kl, _ENC_LP),
                              c.finish_reason, c.stop_reason]])
        if out.finished:
            self._sent.pop(rid, None)
        return [rid, req, comps]

    def encode_request(self, req, finished: bool) -> list:
        """``encode(engine._output(req))`` read straight off the engine's live ``Request`` and its
        sequences, without building the snapshot (a test holds the two equal). The caller runs it
        on the engine's thread between steps: the state moves on with the next step."""
        rid = req.request_id
        sent = self._sent.get(rid)
        if sent is None:
            sent = self._sent[rid] = {}
        head = [finished, req.error, req.num_cached_tokens, req.timings(),
                _append(req.prompt_logprobs, sent, "prompt_logprobs", _ENC_LP)]
        seqs = req.seqs if len(req.seqs) == 1 else sorted(req.seqs, key=_by_index)
        comps = []
        for seq in seqs:
            i = seq.index
            kt, ki, kl = _comp_keys(i)
            tokens = seq.token_ids
            end = len(tokens) - seq.num_pending
            size = end - seq.num_prompt
            n = sent.get(ki)
            if n == size:
                ids = None
            else:
                start = 0 if n is None else (n if n < size else size)
                sent[ki] = size
                ids = [start, tokens[seq.num_prompt + start:end]]
            lps = seq.logprobs
            comps.append([i, [_append(seq.visible_text(), sent, kt, None), ids,
                              seq.cumulative_logprob if lps is not None else None, _append(lps, sent, kl, _ENC_LP),
                              seq.finish_reason, seq.stop_reason]])
        if finished:
            self._sent.pop(rid, None)
        return [rid, head, comps]

    def encode_by_table(self, out: RequestOutput) -> list:
        """``encode`` read off ``REQUEST_WIRE`` and ``COMPLETION_WIRE`` field by field."""
        sent = self._sent.setdefault(out.request_id, {})
        req = [_encode_field(getattr(out, name, None), mode, codec, sent, name) for name, mode, codec in REQUEST_WIRE]
        comps = []
        for c in out.outputs:
            i = c.index
            comps.append([i, [_encode_field(getattr(c, name, None), mode, codec, sent, (i, name))
                              for name, mode, codec in COMPLETION_WIRE]])
        if out.finished:
            self._sent.pop(out.request_id, None)
        return [out.request_id, req, comps]

    def drop(self, request_id: str) -> None:
        self._sent.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._sent)


# --- the API process's side --------------------------------------------------------------------------
def apply_fields(state: dict, values: list, table) -> None:
    """Applies one output's wire values for ``table``'s fields to ``state`` (field -> value)."""
    for (name, mode, codec), v in zip(table, values):
        if mode is LATEST:
            state[name] = v if codec is None else codec[1](v)
            continue
        if v is None:
            continue
        start, items = v
        if codec is not None:
            items = [codec[1](x) for x in items]
        cur = state.get(name)
        if isinstance(items, str):
            state[name] = (cur or "")[:start] + items
        else:
            if cur is None:
                cur = state[name] = []
            del cur[start:]
            cur.extend(items)


def build(cls, values: dict):
    """``cls`` (RequestOutput or CompletionOutput) from the fields it has; lists are copied."""
    names = _REQUEST_NAMES if cls is RequestOutput else _COMPLETION_NAMES
    return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in values.items() if k in names})


__all__ = [
    "ABORT", "ADD", "APPEND", "BYE", "COMPLETION_LOCAL", "COMPLETION_WIRE", "CONFIG", "DEAD", "DRAINING", "HELLO",
    "LATEST", "OutputEncoder", "READY", "REJECT", "REQUEST_LOCAL", "REQUEST_WIRE", "STATS", "STEP", "WIRE_VERSION",
    "apply_fields", "build", "check_schema", "pack", "unpack",
]
