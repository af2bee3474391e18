"""Moving a request that was running on a failed replica onto another engine.

The coordinator keeps every request's state (its prompt, the tokens generated so far, the text
decoded so far, log-probabilities, grammar state), so a request whose replica died can continue
elsewhere: it is added to the new engine with its prompt, then its sequence takes over the old
tokens before the scheduler first sees it. The scheduler then prefills prompt + output together
(as after a preemption) and the next token follows; greedy outputs are unchanged. A request with
``n > 1`` completions cannot be moved this way and ends with an error instead.
"""

from __future__ import annotations

from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.sequence import Request, SeqStatus


def can_resume(req: Request) -> bool:
    return req.params.n == 1 and len(req.seqs) == 1 and not req.seqs[0].finished


def resume_request(engine, old: Request) -> Request:
    """Adds ``old`` (from a failed engine) to ``engine`` with its generated tokens; returns the new Request."""
    if not can_resume(old):
        raise ValueError(f"request '{old.request_id}' cannot be resumed (n > 1 or already finished)")
    req = engine.add_request(old.request_id, list(old.prompt_token_ids), old.params, priority=old.priority)
    req.prompt = old.prompt
    req.arrival = old.arrival
    req.first_token_time = old.first_token_time
    req.num_cached_tokens = old.num_cached_tokens
    if old.prompt_logprobs is not None:
        req.prompt_logprobs = list(old.prompt_logprobs)  # positions scored already are not scored again
    src, dst = old.seqs[0], req.seqs[0]
    assert dst.status is SeqStatus.WAITING and dst.sent_table is None
    outs = src.output_ids
    if outs:
        dst.token_ids.extend(outs)
        dst.text = src.text
        dst.detok = src.detok
        dst.cumulative_logprob = src.cumulative_logprob
        dst.logprobs = list(src.logprobs) if src.logprobs is not None else None
        dst.grammar = src.grammar if src.grammar is not None else dst.grammar
        dst.sent_text_len = src.sent_text_len
        dst.sent_token_len = src.sent_token_len
    return req


def ended_output(req: Request, reason: str, message: str | None) -> RequestOutput:
    """A finished RequestOutput for a request the coordinator ends itself (error or abort)."""
    outs = []
    for seq in sorted(req.seqs, key=lambda s: s.index):
        outs.append(CompletionOutput(
            index=seq.index, text=seq.text, token_ids=list(seq.output_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason or reason, stop_reason=seq.stop_reason,
        ))
    metrics = {"arrival": req.arrival}
    if req.first_token_time is not None:
        metrics["first_token"] = req.first_token_time
    return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids, outputs=outs,
                         finished=True, error=message, num_cached_tokens=req.num_cached_tokens, metrics=metrics,
                         prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None)
