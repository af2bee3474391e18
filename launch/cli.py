"""The ``kiln`` command: build, generate, serve, bench, plan.

Bad input exits non-zero with one line naming the problem and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_USAGE = 2


class CLIError(Exception):
    """A problem the user can fix; printed as one line."""


def _pydantic_line(err, prefix: str = "--") -> str:
    """One line from a pydantic ValidationError: the first failing field as a flag."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ()))
    flag = prefix + loc.replace("_", "-") if loc else "input"
    return f"invalid {flag}: {e.get('msg', 'invalid value')} (got {e.get('input')!r})"


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build an engine directory from a checkpoint")
    p.add_argument("--model", required=True, help="HF folder, .gguf file, built-in name, or (with --random-weights) an architecture name or config.json")
    p.add_argument("--output", default=None, help="engine directory (default engines/<model>-<dtype>-tp<N>)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--quant", default="none", choices=["none", "fp8", "int4-awq", "int8-weight"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: the KV cache in E4M3 (twice the tokens)")
    p.add_argument("--calibration", default="dynamic", choices=["dynamic", "static"],
                   help="--quant fp8 activations: scaled per token at run time, or per tensor from calibration")
    p.add_argument("--calibration-text", default=None, help="a text file to calibrate on (default: the text kiln ships)")
    p.add_argument("--group-size", type=int, default=128, help="--quant int4-awq: input columns per scale and zero point")
    p.add_argument("--int4-search", default="awq+gptq", choices=["awq+gptq", "awq", "rtn"],
                   help="--quant int4-awq: AWQ's scale and clip search then GPTQ's rounding, AWQ's search alone, "
                        "or plain round-to-nearest")
    p.add_argument("--fp8-rounding", default="gptq", choices=["gptq", "rtn"],
                   help="--quant fp8: GPTQ's rounding against the calibration text's inputs, or plain round-to-nearest")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="device class the engine targets (default: cuda if present)")
    for flag in ("tp", "pp", "ep"):
        p.add_argument(f"--{flag}", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--tokens-per-block", type=int, default=16)
    p.add_argument("--random-weights", action="store_true", help="draw weights at build time")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    p.add_argument("--weights-at-load", action="store_true",
                   help="with --random-weights: write no weight files; each rank draws its weights at load (engines larger than the disk)")
    p.add_argument("--ranks", default=None, help="build only these ranks' files, e.g. 0-3 or 0,2 (parts merge into one --output)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep the model's first N decoder layers (a cheap draft of the same vocabulary for --speculative draft-target)")
    p.add_argument("--quiet", action="store_true")


def cmd_build(a) -> int:
    import torch
    from pydantic import ValidationError

    from kiln.runtime.builder import build_engine
    from kiln.runtime.config import BuildConfig

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    try:
        build = BuildConfig(
            dtype=dtype, quant=a.quant, kv_cache_dtype=a.kv_cache_dtype, tp=a.tp, pp=a.pp, ep=a.ep,
            max_batch_size=a.max_batch_size, max_seq_len=a.max_seq_len, max_num_tokens=a.max_num_tokens,
            tokens_per_block=a.tokens_per_block, activation_scales=a.calibration, group_size=a.group_size,
            int4_search=a.int4_search, fp8_rounding=a.fp8_rounding,
        )
    except ValidationError as e:
        raise CLIError(_pydantic_line(e)) from None
    if a.max_num_tokens < build.tokens_per_block:
        raise CLIError(f"invalid --max-num-tokens: must be at least --tokens-per-block ({build.tokens_per_block})")
    ranks = _parse_ranks(a.ranks) if a.ranks is not None else None
    build_engine(a.model, a.output, build, random_weights=a.random_weights, seed=a.seed, device_class=device, progress=not a.quiet,
                 ranks=ranks, weights_at_load=a.weights_at_load, calibration_text=a.calibration_text, num_layers=a.num_layers)
    return 0


def _parse_ranks(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]."""
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise CLIError(f"invalid --ranks {text!r}: give ranks like 0-3 or 0,2") from None
    if not out:
        raise CLIError("invalid --ranks: no rank given")
    return out


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from an engine")
    p.add_argument("engine")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    p.add_argument("--device", default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stats", action="store_true", help="print tokens/s after the text")


def cmd_generate(a) -> int:
    from pydantic import ValidationError

    from kiln.runtime.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams

    try:
        sp = SamplingParams(
            max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
            ignore_eos=a.ignore_eos,
        )
    except ValidationError as e:
        raise CLIError(_pydantic_line(e)) from None
    with LLM(a.engine, device=a.device) as llm:  # stops worker processes of a multi-rank engine on exit
        t0 = time.perf_counter()
        if a.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in a.prompt], sp)
        else:
            outs = llm.generate(a.prompt, sp)
        dt = time.perf_counter() - t0
    for o in outs:
        print(o.outputs[0].text)
    if a.stats:
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"[{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an engine over an OpenAI-compatible HTTP API")
    p.add_argument("engine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--launcher", default="local", choices=["local", "torchrun", "ray"])
    p.add_argument("--topology", default=None)
    p.add_argument("--draft-engine", "--speculative-model", dest="draft_engine", default=None,
                   help="with --speculative draft-target: the draft model's engine directory; with medusa or eagle: "
                        "the heads' directory")
    p.add_argument("--speculative", default="none", choices=["none", "ngram", "draft-target", "eagle", "medusa"],
                   help="speculative decoding: ngram (prompt lookup, no model), draft-target (a draft engine proposes), "
                        "medusa or eagle (heads trained on the target propose from its hidden states)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="proposals per step and request at most (1..16)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 429")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds to drain on SIGTERM")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-server-count", type=int, default=1,
                   help="API server processes (HTTP, tokenization, streaming) in front of the one engine core process")


def cmd_serve(a) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
        import zmq  # noqa: F401

        from kiln.launch.supervisor import serve
    except ImportError as e:
        raise CLIError(f"serving needs the server extras ({e.name} is missing): pip install 'kiln-llm[serve]'") from None
    if not (0 < a.port < 65536):
        raise CLIError(f"invalid --port: {a.port} is not in 1..65535")
    if not (1 <= a.api_server_count <= 64):
        raise CLIError(f"invalid --api-server-count: {a.api_server_count} is not in 1..64")
    if a.launcher == "ray":
        from kiln.launch.topology import load_topology

        if not a.topology:
            raise CLIError("--launcher ray needs --topology: pass a file from cluster_configs/ (e.g. local-cpu.yaml)")
        a.topology_spec = load_topology(a.topology)  # one clear line on a bad file, before anything starts
    elif a.topology:
        raise CLIError("--topology only applies to --launcher ray")
    a.speculative_config = None
    if a.draft_engine and a.speculative not in ("draft-target", "medusa", "eagle"):
        raise CLIError("--draft-engine needs --speculative draft-target, medusa or eagle")
    if a.speculative == "draft-target" and not a.draft_engine:
        raise CLIError("--speculative draft-target needs --draft-engine DIR: the draft model's engine (built with `kiln build`)")
    if a.speculative in ("medusa", "eagle") and not a.draft_engine:
        raise CLIError(f"--speculative {a.speculative} needs --draft-engine DIR (or --speculative-model DIR): "
                       "the directory of its heads")
    if a.speculative != "none":
        if a.launcher == "ray":
            raise CLIError("--speculative runs with --launcher local or torchrun in this version")
        from kiln.runtime.speculative import parse_config

        a.speculative_config = {"method": "ngram", "num_speculative_tokens": a.num_speculative_tokens}
        if a.speculative == "draft-target":
            from kiln.runtime.builder import read_engine_config

            a.speculative_config.update(method="draft", draft_engine=os.path.abspath(a.draft_engine))
            try:
                read_engine_config(a.draft_engine)  # one clear line before anything starts
            except ValueError as e:
                raise CLIError(f"--draft-engine: {e}") from None
        elif a.speculative in ("medusa", "eagle"):
            from kiln.runtime.heads import check_heads_dir

            a.speculative_config.update(method=a.speculative, model=os.path.abspath(a.draft_engine))
            try:
                check_heads_dir(a.speculative, a.draft_engine)  # one clear line before anything starts
            except ValueError as e:
                raise CLIError(f"--draft-engine: {e}") from None
        try:
            parse_config(a.speculative_config)
        except ValueError as e:
            raise CLIError(f"invalid --num-speculative-tokens: {e}") from None
    elif a.num_speculative_tokens != 4:
        raise CLIError("--num-speculative-tokens needs --speculative ngram, draft-target, medusa or eagle")
    return serve(a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="Build and serve large language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_generate(sub)
    _add_serve(sub)
    from kiln.launch import bench_cli, plan

    bench_cli.add_parser(sub)
    plan.add_parser(sub)
    a = parser.parse_args(argv)
    handlers = {"build": cmd_build, "generate": cmd_generate, "serve": cmd_serve, "bench": bench_cli.run, "plan": plan.cmd_plan}
    try:
        return handlers[a.command](a)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for anything the user can fix; a traceback only with --debug
        if a.debug or os.environ.get("KILN_DEBUG"):
            raise
        from pydantic import ValidationError

        msg = _pydantic_line(e) if isinstance(e, ValidationError) else str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kiln {a.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (CLIError, ValueError, FileNotFoundError, MemoryError)) else 1


if __name__ == "__main__":
    sys.exit(main())
