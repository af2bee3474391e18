"""``LLM``: offline generation over an engine directory, as vLLM's LLM API users know it."""

from __future__ import annotations

import itertools
from typing import Sequence

from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams


class LLM:
    """Loads an engine and generates with in-flight batching over all the prompts given.

    ``launcher``: ``"local"`` (this process; more ranks start one process each),
    ``"torchrun"`` or ``"ray"`` (placed on a Ray cluster as ``topology`` describes: a file from
    ``cluster_configs/``, a path or a ``Topology``; data-parallel replicas, failover, restarts).
    ``num_kv_blocks``, ``enable_prefix_caching``, ``max_num_tokens`` and ``max_batch_size`` override
    the engine's defaults; ``scheduler_policy`` is "guaranteed_no_evict" (admit only what can
    finish without preemption) or "max_utilization"; ``speculative_config`` turns on speculative
    decoding (``kiln.runtime.speculative.SpeculativeConfig``, e.g. ``{"method": "ngram",
    "num_speculative_tokens": 4}`` or ``{"method": "draft", "draft_engine": "engines/draft",
    "num_speculative_tokens": 3}``, or ``"medusa"`` / ``"eagle"`` with ``"model"`` the heads' directory).
    """

    def __init__(
        self,
        engine: str,
        *,
        launcher: str = "local",
        device: str | None = None,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_tokens: int | None = None,
        max_batch_size: int | None = None,
        seed: int | None = None,
        topology=None,
        scheduler_policy: str = "guaranteed_no_evict",
        speculative_config: dict | None = None,
        async_scheduling: bool | None = None,
    ):
        if launcher == "ray":
            if speculative_config is not None:
                raise ValueError("speculative decoding runs with the local and torchrun launchers in this version")
            if scheduler_policy != "guaranteed_no_evict":
                raise ValueError("scheduler_policy is fixed to guaranteed_no_evict under the ray launcher in this version")
            from kiln.launch.ray_launcher import make_ray_engine

            self.engine = make_ray_engine(
                engine, topology, device=device, num_kv_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching,
                max_num_tokens=max_num_tokens, max_batch_size=max_batch_size, seed=seed,
            )
        else:
            self.engine = LLMEngine(
                engine, launcher=launcher, device=device, num_kv_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size,
                seed=seed, scheduler_policy=scheduler_policy, speculative_config=speculative_config,
                async_scheduling=async_scheduling,
            )
        self.engine.stream_outputs = False
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, p, sp, priority=priority[i] if priority else 0)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        want = set(ids)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(want):
            for out in self.engine.step():
                if out.finished and out.request_id in want:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation or a list of them through the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=add_generation_prompt) for c in convs]
        prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
        return self.generate(prompts, sampling_params)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stops worker processes of a multi-rank engine."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
