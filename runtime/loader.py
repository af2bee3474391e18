"""Loading an engine directory: checks first (schema, device class, world size, checksums), then
this rank's weights, the tokenizer, the KV cache and the model runner."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from kiln.parallel.mapping import Mapping
from kiln.runtime.builder import TORCH_DTYPES, BuildError, check_fp8_device, read_engine_config
from kiln.runtime.config import EngineConfig
from kiln.runtime.kv_cache import KVCache, choose_num_blocks, memory_block_capacity
from kiln.runtime.model import DecoderModel
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.safetensors_stream import sha256_file
from kiln.runtime import tuning


class EngineLoadError(BuildError):
    """An engine that cannot be loaded here; the message names the problem and the fix."""


@dataclass
class LoadedEngine:
    config: EngineConfig
    tokenizer: object
    executor: object
    num_kv_blocks: int
    max_num_tokens: int
    max_batch_size: int
    eos_token_ids: list[int]
    add_bos: bool
    chat_template: str | None


def resolve_device(config: EngineConfig, device: str | None) -> torch.device:
    want = torch.device(device) if device else torch.device(config.device_class)
    if want.type != config.device_class:
        raise EngineLoadError(
            f"engine was built for {config.device_class} but is being loaded on {want.type}: "
            f"rebuild it with `kiln build ... --device {want.type}`"
        )
    if want.type == "cuda" and not torch.cuda.is_available():
        raise EngineLoadError("engine was built for cuda but no CUDA GPU is visible: run it on a GPU or rebuild with --device cpu")
    return want


def kv_cache_dtype(config: EngineConfig) -> torch.dtype:
    """The KV cache's element type: E4M3 for ``--kv-cache-dtype fp8``, else the engine dtype."""
    return torch.float8_e4m3fn if config.build.kv_cache_dtype == "fp8" else TORCH_DTYPES[config.build.dtype]


def tune_for_device(model: DecoderModel, engine_dir: str | None = None) -> None:
    """Load-time GPU work before the KV cache takes the free memory: the 16-bit GEMV choice per
    projection shape and, for quantized projections, their kernels' choice and compilation
    (nothing is compiled on a request's path). Choices an earlier load on this GPU saved in
    ``engine_dir`` are read back instead of timed again (``kiln.runtime.tuning``).
    KILN_EAGER=1 skips it."""
    dev = next(model.parameters()).device
    if dev.type != "cuda" or os.environ.get("KILN_EAGER"):
        return
    if engine_dir is not None:
        tuning.restore(engine_dir, dev)
    model.tune_linears()
    model.prepare_quantized()


def save_tuning(engine_dir: str, device: torch.device) -> None:
    """Writes this load's kernel choices into the engine directory for the next load."""
    if device.type == "cuda" and not os.environ.get("KILN_EAGER"):
        tuning.store(engine_dir, device)


def verify_files(engine_dir: str, config: EngineConfig, names: list[str]) -> None:
    for name in names:
        path = os.path.join(engine_dir, name)
        want = config.files.get(name)
        if want is None:
            raise EngineLoadError(f"engine.json lists no checksum for '{name}': the engine is incomplete; rebuild it")
        if not os.path.exists(path):
            raise EngineLoadError(f"engine file '{name}' is missing from {engine_dir}: rebuild the engine")
        if sha256_file(path) != want:
            raise EngineLoadError(f"engine file '{name}' fails its sha256 checksum: the engine is corrupt; rebuild it")


def check_complete(engine_dir: str, config: EngineConfig) -> None:
    """Every rank's file is listed with a checksum and present (not verified: each rank does that)."""
    if config.random_weights_seed is not None:
        return  # weights drawn at load: no rank files
    for name in config.rank_files:
        if name not in config.files:
            raise EngineLoadError(f"engine.json lists no checksum for '{name}': the engine is incomplete (built in parts "
                                  "with --ranks: build the missing ranks into it); rebuild it")
        if not os.path.exists(os.path.join(engine_dir, name)):
            raise EngineLoadError(f"engine file '{name}' is missing from {engine_dir}: rebuild the engine")


def load_tokenizer(engine_dir: str, config: EngineConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(engine_dir, config.tokenizer.path))
    if config.tokenizer.chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = config.tokenizer.chat_template
    return tok


def load_rank(engine_dir: str, config: EngineConfig, mapping: Mapping, device: torch.device, comm=None, verify: bool = True) -> DecoderModel:
    """This rank's model with its weights; reads only this rank's file."""
    fname = config.rank_files[mapping.rank]
    dtype = TORCH_DTYPES[config.build.dtype]
    check_fp8_device(config.linear_quant, device.type, EngineLoadError)
    model = DecoderModel(config.model, mapping, dtype=dtype, device=device, comm=comm, quant=config.linear_quant)
    want = model.engine_state_names()
    if config.random_weights_seed is not None:
        _draw_rank(model, config, mapping, dtype, device, want)
        model.eval()
        return model
    if verify:
        verify_files(engine_dir, config, [fname])
    with safe_open(os.path.join(engine_dir, fname), framework="pt", device=str(device)) as f:
        have = set(f.keys())
        if have != want:
            missing = sorted(want - have)[:3]
            raise EngineLoadError(f"{fname} does not match the model (missing {missing}): the engine is corrupt; rebuild it")
        for n in sorted(want):  # tensor by tensor: the peak is the model plus one tensor
            model.load_weight(n, f.get_tensor(n))
    model.eval()
    return model


def _draw_rank(model: DecoderModel, config: EngineConfig, mapping: Mapping, dtype, device, names) -> None:
    """This rank's weights drawn where they will live, as the builder would have cut them."""
    from kiln.parallel.partition import ReadOnce, rank_slice
    from kiln.runtime.checkpoint import RandomReader
    from kiln.runtime.quantize import QuantizedSource

    get = RandomReader(config.model, seed=config.random_weights_seed, dtype=dtype, device=device).get
    fetch = ReadOnce(QuantizedSource(get, config.linear_quant, dtype))
    params = dict(model.named_parameters())
    for n in sorted(names):
        model.load_weight(n, rank_slice(n, fetch, config.model, mapping).to(params[n].dtype))
        fetch.clear()


def load_engine(engine_dir: str, *, launcher: str = "local", **kw) -> LoadedEngine:
    """Loads an engine with the given launcher: ``local`` (this process; more ranks start as
    worker processes here), ``torchrun`` (this process is rank 0 of a torchrun job) or ``ray`` (one
    replica placed on a Ray cluster; pass ``topology=``)."""
    if launcher == "ray":
        from kiln.launch.ray_launcher import load_ray_engine

        return load_ray_engine(engine_dir, **kw)
    if launcher not in ("local", "torchrun"):
        raise EngineLoadError(f"launcher '{launcher}' is not available here: use 'local', 'torchrun' or 'ray'")
    config = read_engine_config(engine_dir)
    if launcher == "torchrun" or config.build.world_size > 1:
        return load_distributed(engine_dir, launcher=launcher, **kw)
    return load_local(engine_dir, **kw)


def _limits(config: EngineConfig, max_num_tokens, max_batch_size) -> tuple[int, int]:
    b = config.build
    mnt = max_num_tokens or b.max_num_tokens
    mbs = max_batch_size or b.max_batch_size
    for name, v in (("max_num_tokens", mnt), ("max_batch_size", mbs)):
        if v < 1:
            raise EngineLoadError(f"{name} must be at least 1")
    return mnt, mbs


def load_distributed(
    engine_dir: str, *, launcher: str = "local", device: str | None = None, num_kv_blocks: int | None = None,
    max_num_tokens: int | None = None, max_batch_size: int | None = None, seed: int | None = None, verify: bool = True,
) -> LoadedEngine:
    """Rank 0 of a multi-rank engine: under torchrun the other ranks already exist; with the
    local launcher they are started here as worker processes."""
    from kiln.runtime.worker import DistributedExecutor, Worker, free_port, spawn_local_workers

    config = read_engine_config(engine_dir)
    resolve_device(config, device)
    check_complete(engine_dir, config)
    if verify:
        verify_files(engine_dir, config, [n for n in config.files if not n.startswith("rank")])
    tokenizer = load_tokenizer(engine_dir, config)
    mnt, mbs = _limits(config, max_num_tokens, max_batch_size)
    eos = list(config.tokenizer.eos_token_ids or config.model.eos_token_id)
    procs = []
    if launcher == "torchrun":
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if rank != 0:
            raise EngineLoadError("only rank 0 of a torchrun job loads the engine; other ranks run kiln.launch.torchrun_entry")
        addr, port = None, None  # join through torchrun's environment
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        world, addr, port, local_rank = config.build.world_size, "127.0.0.1", free_port(), 0
        procs = spawn_local_workers(engine_dir, world, port, device)
    try:
        w = Worker(engine_dir, 0, world, addr, port, device, local_rank, verify=verify)
        nb = w.handshake(num_kv_blocks, mnt, mbs, eos, seed)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return LoadedEngine(config, tokenizer, DistributedExecutor(w, procs), nb, mnt, mbs, eos,
                        config.tokenizer.add_bos_token, config.tokenizer.chat_template)


def load_local(
    engine_dir: str, *, device: str | None = None, num_kv_blocks: int | None = None,
    max_num_tokens: int | None = None, max_batch_size: int | None = None, seed: int | None = None,
    verify: bool = True,
) -> LoadedEngine:
    """Loads a one-rank engine in this process."""
    config = read_engine_config(engine_dir)
    if config.build.world_size != 1:
        raise EngineLoadError(
            f"engine was built for {config.build.world_size} ranks (tp={config.build.tp}, pp={config.build.pp}) "
            "but this launcher runs 1: rebuild with --tp 1 --pp 1"
        )
    dev = resolve_device(config, device)
    check_complete(engine_dir, config)
    if verify:
        verify_files(engine_dir, config, [n for n in config.files if not n.startswith("rank")])
    tokenizer = load_tokenizer(engine_dir, config)
    model = load_rank(engine_dir, config, Mapping(), dev, verify=verify)
    tune_for_device(model, engine_dir)
    b = config.build
    mnt, mbs = _limits(config, max_num_tokens, max_batch_size)
    ls = model.ls
    dtype = kv_cache_dtype(config)
    nb = num_kv_blocks or choose_num_blocks(
        memory_block_capacity(len(ls.layers), ls.num_kv_heads, ls.head_dim, b.tokens_per_block, dtype, dev),
        b.tokens_per_block, mbs, b.max_seq_len,
    )
    kv = KVCache(len(ls.layers), nb, b.tokens_per_block, ls.num_kv_heads, ls.head_dim, dtype, dev)
    eos = list(config.tokenizer.eos_token_ids or config.model.eos_token_id)
    runner = ModelRunner(model, kv, mnt, mbs, eos_token_ids=eos, seed=seed)
    runner.tune_attention()
    save_tuning(engine_dir, dev)
    if dev.type == "cuda" and not os.environ.get("KILN_EAGER"):
        runner.enable_cuda_graphs(b.max_seq_len)
    return LoadedEngine(config, tokenizer, LocalExecutor(runner), nb, mnt, mbs, eos, config.tokenizer.add_bos_token, config.tokenizer.chat_template)


class LocalExecutor:
    """Runs step plans on a model runner in this process."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, plan, allowed_masks=None):
        return self.runner.execute(plan, allowed_masks)

    late_masks = True  # launch() takes sequences whose masks come after the launch

    def launch(self, plan, allowed_masks=None, late_masks=()):
        return self.runner.launch(plan, allowed_masks, late_masks)

    def shutdown(self) -> None:
        pass
