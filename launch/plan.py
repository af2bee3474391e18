"""``kiln plan``: will a model fit, which parallel layout to build, how fast will it decode.

For a model (an architecture name, a checkpoint folder, a GGUF file or a config.json) on a GPU
type and count (or a topology file), every tensor/pipeline layout that the model's shapes allow
is sized exactly from the per-rank partition the builder would write (``rank_layout``): the
largest rank's weight bytes, what memory is left for the KV cache on that rank (after
``KILN_GPU_MEMORY_UTILIZATION`` and a reserve for activations and CUDA graphs), how many
tokens of KV cache one replica holds, and an estimate of batch-1 decode time: the largest
rank's bytes over the GPU's effective memory bandwidth, times the overhead kiln measured on an
H100 (see benchmarks/results, gpu-decode-batch1), plus two all-reduces per layer when tp > 1.
The recommended layout is the smallest one that leaves room for ``max_batch_size`` sequences at
a quarter of ``max_seq_len``; the remaining GPUs become data-parallel replicas.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

GIB = 1 << 30

# name: (label, memory in MiB as nvidia-smi reports it, effective copy bandwidth in bytes/s)
GPUS: dict[str, tuple[str, int, float]] = {
    "h100": ("H100-SXM5-80GB", 81559, 3.0e12),   # copy bandwidth measured on the device tool's H100
    "h200": ("H200-SXM-141GB", 143771, 4.3e12),
    "b200": ("B200-SXM-180GB", 183359, 7.2e12),
    "a100": ("A100-SXM4-80GB", 81920, 1.8e12),
    "l40s": ("L40S-48GB", 46068, 0.78e12),
}
DECODE_OVERHEAD = 1.16     # kiln's batch-1 decode time over the bandwidth floor (llama-3-8b, H100)
ALLREDUCE_S = 8e-6         # one small all-reduce inside an NVLink board
RESERVE_BYTES = 3 * GIB    # activations, logits, CUDA graph pools


class PlanError(ValueError):
    """A question plan cannot answer; the message says what to change."""


@dataclass
class Option:
    tp: int
    pp: int
    dp: int
    weights_gib_per_gpu: float
    fits: bool
    kv_tokens_per_replica: int
    max_seqs_at_max_len: int
    decode_ms_per_token: float
    build_command: str


def gpu_spec(name: str) -> tuple[str, int, float]:
    key = name.lower().split("-")[0]
    if key not in GPUS:
        raise PlanError(f"unknown GPU '{name}': use one of {', '.join(GPUS)}")
    return GPUS[key]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(model: str, gpu: str = "h100", gpus: int = 1, gpus_per_node: int | None = None, dtype: str = "bfloat16",
         max_seq_len: int = 4096, max_batch_size: int = 256, ep: int = 1, quant: str = "none",
         kv_cache_dtype: str = "auto") -> dict:
    from kiln.parallel.mapping import Mapping
    from kiln.runtime.builder import TORCH_DTYPES, rank_layout
    from kiln.runtime.config import BuildConfig
    from kiln.runtime.quantize import linear_quant_for
    from kiln.runtime.checkpoint import open_checkpoint
    from kiln.runtime.kv_cache import gpu_memory_utilization
    from kiln.runtime.model import LocalShape

    if gpus < 1:
        raise PlanError("--gpus must be at least 1")
    if dtype not in TORCH_DTYPES:
        raise PlanError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}")
    label, mem_mib, bw = gpu_spec(gpu)
    per_node = gpus_per_node or min(gpus, 8)
    cfg = open_checkpoint(model, random_weights=not os.path.exists(model), dtype=TORCH_DTYPES[dtype]).config
    tdt = TORCH_DTYPES[dtype]
    try:
        lq = linear_quant_for(BuildConfig(dtype=dtype, quant=quant, kv_cache_dtype=kv_cache_dtype))
    except ValueError as e:
        raise PlanError(f"invalid --quant/--kv-cache-dtype: {str(e).splitlines()[0]}") from None
    kv_size = 1 if lq.kv_fp8 else torch.empty((), dtype=tdt).element_size()

    def nbytes(layout) -> int:  # each tensor at its own element size (quantized weights are smaller)
        return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in layout.values())
    budget = mem_mib * (1 << 20) * gpu_memory_utilization() - RESERVE_BYTES
    max_len = min(max_seq_len, cfg.max_position_embeddings)
    options: list[Option] = []
    for tp in _divisors(gpus):
        if tp > per_node or cfg.num_attention_heads % tp or cfg.intermediate_size % tp or (ep > 1 and tp % ep):
            continue
        for pp in _divisors(gpus // tp):
            if pp > cfg.num_hidden_layers:
                continue
            try:
                ranks = [Mapping(tp=tp, pp=pp, ep=ep, rank=r) for r in range(tp * pp)]
                sizes = [nbytes(rank_layout(cfg, m, tdt, lq)) for m in ranks]
                shapes = [LocalShape.of(cfg, m) for m in ranks]
            except ValueError:
                continue
            kv_per_token = [len(ls.layers) * 2 * ls.num_kv_heads * ls.head_dim * kv_size for ls in shapes]
            free = [budget - s for s in sizes]
            kv_tokens = int(min(f // k for f, k in zip(free, kv_per_token))) if min(free) > 0 else 0
            fits = kv_tokens >= max_len
            # Batch 1: the stages run one after another, so each stage's largest rank adds up.
            stage_bytes = [max(sizes[s * tp:(s + 1) * tp]) for s in range(pp)]
            ms = sum(stage_bytes) / bw * DECODE_OVERHEAD * 1e3 + (2 * cfg.num_hidden_layers * ALLREDUCE_S * 1e3 if tp > 1 else 0)
            cmd = f"kiln build --model {model} --dtype {dtype}" + (f" --quant {quant}" if quant != "none" else "") + \
                  (" --kv-cache-dtype fp8" if lq.kv_fp8 else "") + f" --tp {tp}" + (f" --pp {pp}" if pp > 1 else "") + \
                  (f" --ep {ep}" if ep > 1 else "") + f" --max-seq-len {max_len} --max-batch-size {max_batch_size}"
            options.append(Option(tp, pp, gpus // (tp * pp), round(max(sizes) / GIB, 2), fits, kv_tokens,
                                  kv_tokens // max_len if fits else 0, round(ms, 2), cmd))
    fitting = [o for o in options if o.fits]
    if not fitting:
        need = min((o.weights_gib_per_gpu for o in options), default=0.0)
        raise PlanError(f"{model} ({dtype}) does not fit on {gpus} x {label}: the smallest layout needs "
                        f"{need:.1f} GiB of weights per GPU plus KV cache for one {max_len}-token sequence; "
                        "add GPUs or use a smaller --dtype/--max-seq-len")
    want = max_batch_size * max_len // 4
    roomy = [o for o in fitting if o.kv_tokens_per_replica >= want]
    best = min(roomy or fitting, key=lambda o: (o.tp * o.pp, o.pp, -o.kv_tokens_per_replica) if roomy
               else (-o.kv_tokens_per_replica, o.tp * o.pp))
    return {
        "model": model, "gpu": label, "gpus": gpus, "dtype": dtype, "max_seq_len": max_len, "max_batch_size": max_batch_size,
        "gpu_memory_utilization": gpu_memory_utilization(),
        "quant": quant, "kv_cache_dtype": kv_cache_dtype,
        "weights_gib": round(nbytes(rank_layout(cfg, Mapping(), tdt, lq)) / GIB, 2),
        "options": [asdict(o) for o in options], "recommended": asdict(best),
    }


def format_plan(p: dict) -> str:
    prec = p["dtype"] + (f" + {p['quant']}" if p.get("quant", "none") != "none" else "") + \
        (" + fp8 KV" if p.get("kv_cache_dtype") == "fp8" else "")
    lines = [f"{p['model']} in {prec}: {p['weights_gib']} GiB of weights; {p['gpus']} x {p['gpu']}, "
             f"max_seq_len {p['max_seq_len']}, max_batch_size {p['max_batch_size']}",
             f"{'layout':<14}{'GiB/GPU':>9}{'fits':>6}{'KV tokens/replica':>19}{'seqs@max':>10}{'batch-1 ms/tok':>16}"]
    for o in p["options"]:
        lay = f"tp{o['tp']} pp{o['pp']} dp{o['dp']}"
        lines.append(f"{lay:<14}{o['weights_gib_per_gpu']:>9.2f}{'yes' if o['fits'] else 'no':>6}"
                     f"{o['kv_tokens_per_replica']:>19,}{o['max_seqs_at_max_len']:>10}{o['decode_ms_per_token']:>16.2f}")
    r = p["recommended"]
    lines.append(f"recommended: tp={r['tp']} pp={r['pp']} with {r['dp']} replica(s); about {r['decode_ms_per_token']:.1f} ms "
                 f"per token at batch 1 (an estimate from kiln's measured overhead over the bandwidth floor)")
    lines.append(f"  {r['build_command']}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="sizing: fit, parallel layout, expected speed and the matching build command")
    p.add_argument("--model", required=True, help="architecture name, HF folder, .gguf file or config.json")
    p.add_argument("--gpu", default="h100", help=f"GPU type: {', '.join(GPUS)}")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: the topology's, or 1)")
    p.add_argument("--topology", default=None, help="a cluster_configs/ file: GPU type and count from it")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--quant", default="none", choices=["none", "fp8", "int4-awq", "int8-weight"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_plan(a) -> int:
    gpu, gpus, per_node = a.gpu, a.gpus, None
    if a.topology:
        from kiln.launch.topology import load_topology

        t = load_topology(a.topology)
        if not t.gpus_per_node or not t.gpu_type:
            raise PlanError(f"topology '{t.name}' has no GPUs: plan sizes GPU deployments")
        gpu, per_node = t.gpu_type, t.gpus_per_node
        gpus = gpus or t.nodes * t.gpus_per_node
    for name, v in (("--max-seq-len", a.max_seq_len), ("--max-batch-size", a.max_batch_size), ("--ep", a.ep)):
        if v < 1:
            raise PlanError(f"{name} must be at least 1")
    p = plan(a.model, gpu, gpus or 1, per_node, a.dtype, a.max_seq_len, a.max_batch_size, a.ep, a.quant, a.kv_cache_dtype)
    print(json.dumps(p, indent=2) if a.json else format_plan(p))
    return 0
