"""kiln.runtime: configs, model, checkpoint readers and builder, KV cache, scheduler, sampler, engine.

The names most users need: ``LLM``, ``SamplingParams`` and the output types.
"""

from kiln.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from kiln.runtime.sampling_params import SamplingParams


def __getattr__(name):
    if name == "LLM":
        from kiln.runtime.llm import LLM

        return LLM
    if name == "LLMEngine":
        from kiln.runtime.engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
