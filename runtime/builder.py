"""``kiln build``: checkpoint in, engine directory out.

The builder streams the checkpoint tensor by tensor: each engine tensor is cut for every rank
that holds it (``kiln.parallel.partition``), cast, and appended to that rank's safetensors file
at once, so host memory holds about one checkpoint tensor and its slices, never the model.

``ranks`` builds only some ranks' files (one node's share of a multi-node engine, or a large
engine in parts where the disk holds a few ranks at a time). Parts built into one directory with
the same model and build settings merge: engine.json gathers every part's checksums, and the
engine loads once all ranks are there.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time

import torch
from tqdm import tqdm

import kiln
from kiln.parallel.mapping import Mapping
from kiln.parallel.partition import ReadOnce, rank_slice
from kiln.runtime.checkpoint import CheckpointError, CheckpointReader, FirstLayers, RandomReader, open_checkpoint
from kiln.runtime.config import BuildConfig, EngineConfig, LinearQuant, ModelConfig
from kiln.runtime.model import DecoderModel
from kiln.runtime.quantize import QuantizationError, linear_quant_for, prepare_source
from kiln.runtime.safetensors_stream import StreamingSafetensorsWriter, sha256_file

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BuildError(ValueError):
    """A build that cannot proceed; the message is one line naming the problem and the fix."""


def rank_layout(cfg: ModelConfig, mapping: Mapping, dtype: torch.dtype, quant: LinearQuant | None = None
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of one rank's engine tensors, in file order (no memory is used)."""
    meta_model = DecoderModel(cfg, mapping, dtype=dtype, device="meta", quant=quant)
    return {n: (tuple(p.shape), p.dtype) for n, p in meta_model.named_parameters()}


def default_output_dir(model_name: str, build: BuildConfig) -> str:
    base = os.path.basename(os.path.normpath(model_name))
    for ext in (".gguf", ".json"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    name = f"{base}-{build.dtype}"
    if build.quant != "none":
        name += f"-{build.quant}"
    if build.kv_cache_dtype == "fp8":
        name += "-kvfp8"
    name += f"-tp{build.tp}"
    if build.pp > 1:
        name += f"-pp{build.pp}"
    if build.ep > 1:
        name += f"-ep{build.ep}"
    return os.path.join("engines", name)


def _check_fits(cfg: ModelConfig, build: BuildConfig, quant: LinearQuant) -> None:
    try:
        for r in range(build.world_size):
            m = Mapping(tp=build.tp, pp=build.pp, ep=build.ep, rank=r)
            DecoderModel(cfg, m, device="meta", quant=quant)
    except ValueError as e:
        raise BuildError(f"the model cannot be split as tp={build.tp} pp={build.pp} ep={build.ep}"
                         f"{' with ' + quant.method + ' weights' if quant.method != 'none' else ''}: {e}") from None
    if quant.input_perm and build.tp > 1:
        raise BuildError("an act-order (desc_act) GPTQ checkpoint's input permutation cannot be split across tensor-parallel "
                         "ranks: build it with --tp 1, or use a checkpoint quantized without desc_act")


def check_fp8_device(quant: LinearQuant, device_class: str, error=None) -> None:
    """FP8 weights or KV cache need an sm_89+ GPU (Ada, Hopper, Blackwell) when they run on CUDA."""
    if device_class != "cuda" or not (quant.method == "fp8" or quant.kv_fp8) or not torch.cuda.is_available():
        return
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        what = "FP8 weights" if quant.method == "fp8" else "an FP8 KV cache"
        raise (error or BuildError)(
            f"{what} need a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}: build with --quant int8-weight or int4-awq, "
            "and --kv-cache-dtype auto")


def build_engine(
    model: str,
    output: str | None,
    build: BuildConfig,
    *,
    random_weights: bool = False,
    seed: int = 0,
    device_class: str | None = None,
    progress: bool = True,
    reader: CheckpointReader | None = None,
    ranks: list[int] | None = None,
    weights_at_load: bool = False,
    calibration_text: str | None = None,
    num_layers: int | None = None,
) -> str:
    """Builds an engine directory (or, with ``ranks``, those ranks' part of it) and returns its path.
    ``num_layers`` keeps the model's first decoder layers only (``checkpoint.FirstLayers``)."""
    t0 = time.time()
    if weights_at_load and not random_weights and reader is None:
        raise BuildError("--weights-at-load needs --random-weights: only random weights can be drawn at load")
    if weights_at_load and ranks is not None:
        raise BuildError("--weights-at-load writes no rank files: drop --ranks")
    if reader is None:
        # Random weights are drawn in the build dtype, on the GPU when there is one: one tensor at a time.
        gen_device = "cuda" if (random_weights and torch.cuda.is_available() and device_class != "cpu") else "cpu"
        reader = open_checkpoint(model, random_weights=random_weights, seed=seed, dtype=TORCH_DTYPES[build.dtype], device=gen_device)
    if weights_at_load and not isinstance(reader, RandomReader):
        raise BuildError("--weights-at-load needs --random-weights: only random weights can be drawn at load")
    if num_layers is not None:
        try:
            reader = FirstLayers(reader, num_layers)
        except CheckpointError as e:
            raise BuildError(str(e)) from None
    cfg = reader.config
    if build.max_seq_len > cfg.max_position_embeddings:
        build = build.model_copy(update={"max_seq_len": cfg.max_position_embeddings})
    try:
        lq = linear_quant_for(build, reader.quant)
    except QuantizationError as e:
        raise BuildError(str(e)) from None
    _check_fits(cfg, build, lq)
    target = device_class or ("cuda" if torch.cuda.is_available() else "cpu")
    check_fp8_device(lq, target)
    out = output or default_output_dir(model, build)
    world = build.world_size
    todo = list(range(world)) if ranks is None else sorted(set(int(r) for r in ranks))
    if not todo or todo[0] < 0 or todo[-1] >= world:
        raise BuildError(f"--ranks must name ranks in 0..{world - 1} (world size {world}), got {ranks}")
    merge_from: EngineConfig | None = None
    if os.path.exists(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, "engine.json")):
            raise BuildError(f"output directory '{out}' exists and is not an engine: choose another --output")
        if ranks is not None:
            old = read_engine_config(out)
            if old.model.model_copy(update={"eos_token_id": cfg.eos_token_id}) != cfg or old.build != build:
                raise BuildError(f"output directory '{out}' holds an engine with other settings: build its parts with the same "
                                 "model and flags, or choose another --output")
            merge_from = old
        else:
            shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)

    dtype = TORCH_DTYPES[build.dtype]
    rank_files = [f"rank{r}.safetensors" for r in range(world)]
    mappings = [Mapping(tp=build.tp, pp=build.pp, ep=build.ep, rank=r) for r in todo]
    layouts = [rank_layout(cfg, m, dtype, lq) for m in mappings]
    if weights_at_load:  # engine.json and the tokenizer only; each rank draws its weights at load
        todo, mappings, layouts = [], [], []
    writers = [
        StreamingSafetensorsWriter(os.path.join(out, rank_files[r]), lay, {"rank": str(r), "world_size": str(world)})
        for r, lay in zip(todo, layouts)
    ]

    def discard() -> None:
        if merge_from is None:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for r in todo:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(out, rank_files[r]))
    order: list[str] = []
    for lay in layouts:
        order.extend(n for n in lay if n not in order)

    try:  # the tokenizer first: calibration reads it
        tok_info = reader.save_tokenizer(os.path.join(out, "tokenizer"))
        calib_device = "cuda" if target == "cuda" and torch.cuda.is_available() else "cpu"
        source, quant_info = prepare_source(
            reader, build, lq, tokenizer_dir=os.path.join(out, "tokenizer"), device=calib_device, dtype=dtype,
            weights_at_load=weights_at_load, progress=progress, calibration_text=calibration_text,
            random_weights=isinstance(reader, RandomReader))
    except QuantizationError as e:
        discard()
        raise BuildError(str(e)) from None
    except BaseException:
        discard()
        raise
    fetch = ReadOnce(source)
    bar = tqdm(order, desc=f"build {os.path.basename(out)}", unit="tensor", disable=not progress)
    try:
        for name in bar:
            for m, lay, w in zip(mappings, layouts, writers):
                if name in lay:
                    w.write(name, rank_slice(name, fetch, cfg, m).to(lay[name][1]))
            fetch.clear()
        digests = {f: c for f, c in (merge_from.files.items() if merge_from else ()) if f.startswith("rank")}
        digests.update({rank_files[r]: w.close() for r, w in zip(todo, writers)})
    except BaseException:
        discard()
        raise
    finally:
        bar.close()
    for root, _, files in os.walk(os.path.join(out, "tokenizer")):
        for f in sorted(files):
            p = os.path.join(root, f)
            digests[os.path.relpath(p, out)] = sha256_file(p)
    if not cfg.eos_token_id and tok_info.eos_token_ids:
        cfg = cfg.model_copy(update={"eos_token_id": list(tok_info.eos_token_ids)})
    engine = EngineConfig(
        kiln_version=kiln.__version__,
        model_name=os.path.basename(os.path.normpath(model)),
        model=cfg,
        build=build,
        device_class=target,
        device_name=torch.cuda.get_device_name() if target == "cuda" and torch.cuda.is_available() else "cpu",
        rank_files=rank_files,
        tokenizer=tok_info,
        files=digests,
        source=reader.source,
        random_weights_seed=seed if weights_at_load else None,
        quantization=quant_info,
    )
    with open(os.path.join(out, "engine.json"), "w") as f:
        f.write(engine.model_dump_json(indent=2))
    if progress:
        size = sum(os.path.getsize(os.path.join(out, rank_files[r])) for r in todo)
        if weights_at_load:
            print(f"built {out}: no weight files (each of {world} rank(s) draws its weights at load), in {time.time() - t0:.1f} s")
            return out
        part = "" if ranks is None else f" (ranks {','.join(map(str, todo))} of {world}; {sum(f in digests for f in rank_files)} built so far)"
        print(f"built {out}: {len(todo)} rank file(s){part}, {size / 2**20:.1f} MiB, in {time.time() - t0:.1f} s; "
              f"peak host memory {peak_host_memory() / 2**30:.2f} GiB")
    return out


def peak_host_memory() -> int:
    """This process's peak resident memory in bytes (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def read_engine_config(engine_dir: str) -> EngineConfig:
    path = os.path.join(engine_dir, "engine.json")
    if not os.path.isdir(engine_dir):
        raise BuildError(f"engine directory '{engine_dir}' does not exist: build one with `kiln build --model MODEL --output {engine_dir}`")
    if not os.path.exists(path):
        raise BuildError(f"'{engine_dir}' has no engine.json: it is not a kiln engine; build one with `kiln build`")
    try:
        raw = json.load(open(path))
    except json.JSONDecodeError as e:
        raise BuildError(f"{path} is not valid JSON ({e.msg}): rebuild the engine") from None
    from kiln.runtime.config import SCHEMA_VERSION

    ver = raw.get("schema_version") if isinstance(raw, dict) else None
    if not isinstance(ver, int):
        raise BuildError(f"{path} has no schema_version: rebuild the engine with this kiln")
    if ver > SCHEMA_VERSION:
        raise BuildError(
            f"engine schema version {ver} is newer than this kiln supports ({SCHEMA_VERSION}): upgrade kiln or rebuild the engine"
        )
    try:
        return EngineConfig.model_validate(raw)
    except Exception as e:  # pydantic's ValidationError: name the first problem on one line
        first = str(e).splitlines()
        raise BuildError(f"{path} is invalid ({first[1] if len(first) > 1 else first[0]}): rebuild the engine") from None
