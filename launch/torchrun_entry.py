"""Run an engine under torchrun: rank 0 is the coordinator, every other rank a worker.

    torchrun --nproc-per-node N -m kiln.launch.torchrun_entry ENGINE --prompt TEXT [--max-tokens N]
             [--temperature T] [--json-out FILE]

With ``--json-out`` rank 0 writes the prompts' outputs (text and token ids) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kiln.launch.torchrun_entry")
    ap.add_argument("engine")
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--prompt-ids", default=None, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if rank != 0:
            from kiln.runtime.worker import Worker

            w = Worker(a.engine, rank, int(os.environ["WORLD_SIZE"]), None, None, a.device, int(os.environ.get("LOCAL_RANK", 0)))
            w.handshake(None, 1, 1, [], None)
            w.serve_forever()
            return 0
        from kiln.runtime import LLM, SamplingParams

        llm = LLM(a.engine, launcher="torchrun", device=a.device)
        prompts = list(a.prompt) + (json.loads(a.prompt_ids) if a.prompt_ids else [])
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, ignore_eos=a.ignore_eos)
        outs = llm.generate(prompts, sp) if prompts else []
        llm.shutdown()
    except Exception as e:
        print(f"kiln torchrun rank {rank}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    for o in outs:
        print(o.outputs[0].text)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump([{"text": o.outputs[0].text, "token_ids": o.outputs[0].token_ids} for o in outs], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
