"""Quantized Hugging Face checkpoints, read into kiln's canonical layout without re-quantizing.

Four formats are read (``docs/quantization.md`` defines the canonical tensors):

- **compressed-tensors FP8** (``float-quantized`` / ``naive-quantized``): ``X.weight`` in
  float8_e4m3fn with a per-tensor or per-channel ``X.weight_scale`` and, for static activations,
  ``X.input_scale``. The FP8 bytes are kept as they are; a per-tensor scale is expanded to [N].
- **compressed-tensors W4A16** (``pack-quantized``, group strategy): ``X.weight_packed`` int32
  [N, K/8] holding eight 4-bit values per word, little end first, each stored as ``q + 8``;
  ``X.weight_scale`` [N, K/G]; asymmetric checkpoints add ``X.weight_zero_point`` packed the same
  way along N ([N/8, K/G]); ``X.weight_shape`` holds [N, K].
- **AutoAWQ GEMM**: ``X.qweight`` int32 [K, N/8], ``X.qzeros`` int32 [K/G, N/8], ``X.scales``
  [K/G, N]; a word holds the eight columns in the order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds
  column ``ORDER[i]``). Zero points are stored as they are.
- **GPTQ** (4-bit): ``X.qweight`` int32 [K/8, N] packed along K, ``X.qzeros`` int32 [K/G, N/8]
  packed along N (both little end first), ``X.scales`` [K/G, N], ``X.g_idx`` [K] (the group of
  each input column; act-order checkpoints shuffle it). ``checkpoint_format`` ``gptq`` (v1, the
  default) stores ``zero - 1`` in each nibble, so the zero point is ``(stored + 1) & 15``;
  ``gptq_v2`` stores the zero point itself. Symmetric checkpoints store their zeros too (8).

Act-order checkpoints (GPTQ ``desc_act``, compressed-tensors ``actorder: group`` with
``weight_g_idx``) get ``input_perm`` = the stable argsort of g_idx (the identity when g_idx is
already in order), with qweight's columns in that order so each group is contiguous; every group
must hold exactly G columns. Not read (one-line ``CheckpointError``): per-channel int4
(group_size -1), 3/8-bit GPTQ, GPTQ marlin/bitblas formats, AWQ GEMV/llm-awq, FP8 block scales,
compressed-tensors int8/nvfp4/sparse/transformed checkpoints, bitsandbytes and any other method.

Integer values only move between layouts: nibbles are unpacked and repacked, zero points are
offset into 0..15 and transposed, FP8 bytes and scales are copied. Dequantization is
``(q - zero) * scale`` (int4) or ``weight * weight_scale`` (FP8), in float32.
"""

from __future__ import annotations

import os
from typing import Annotated, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint import CheckpointError, _json

SUPPORTED = (
    "compressed-tensors FP8 (float-quantized, per-tensor or per-channel weight scales)",
    "compressed-tensors W4A16 (pack-quantized, 4-bit group strategy)",
    "AutoAWQ GEMM (4-bit)",
    "GPTQ (4-bit, checkpoint_format gptq or gptq_v2)",
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's column order within one int32: nibble i holds column ``AWQ_ORDER[i]`` of its 8."""

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


class CheckpointQuant(BaseModel):
    """How a Hugging Face checkpoint's linears are quantized, as read from its quantization_config.

    ``activation`` is set for FP8 checkpoints that quantize activations (``None``: FP8 weights
    with 16-bit activations); ``zero_offset`` is added to stored int4 zero points (1 for GPTQ
    v1 checkpoints, which store ``zero - 1``); ``ignored`` lists the modules (names or the
    checkpoint's ``re:`` patterns) the checkpoint left unquantized.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["compressed-tensors-fp8", "compressed-tensors-w4a16", "awq", "gptq"]
    method: Literal["fp8", "int4"]
    group_size: int | None = Field(None, ge=1, le=1 << 16, description="int4: input columns per scale")
    activation: Literal["dynamic", "static"] | None = Field(None, description="fp8: how activations are scaled")
    desc_act: bool = Field(False, description="GPTQ act-order: input columns grouped through g_idx")
    symmetric: bool
    zero_offset: Literal[0, 1] = Field(0, description="added to stored int4 zero points")
    ignored: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=1 << 16)


def _unsupported(found: str) -> CheckpointError:
    found = " ".join(str(found).split())[:200]
    return CheckpointError(f"checkpoint quantization {found} is not supported: kiln reads {'; '.join(SUPPORTED)}")


def _positive_group(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _unsupported(f"{what} with group_size {value!r} (per-channel or missing)")
    return value


def _names(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in ([value] if isinstance(value, str) else value)]


def detect_quantization(hf_config: dict) -> CheckpointQuant | None:
    """The quantization of a checkpoint from its config.json dict; ``None`` when it has none.

    Raises ``CheckpointError`` (one line naming the format found and the supported ones) for
    any other quantization_config.
    """
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise _unsupported(f"config {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _detect_compressed_tensors(qc)
    if method == "awq":
        return _detect_awq(qc)
    if method == "gptq":
        return _detect_gptq(qc)
    extra = ""
    if method == "bitsandbytes":
        extra = " (4-bit)" if qc.get("load_in_4bit") else " (8-bit)" if qc.get("load_in_8bit") else ""
    raise _unsupported(f"quant_method {qc.get('quant_method')!r}{extra}")


def _detect_awq(qc: dict) -> CheckpointQuant:
    bits = qc.get("bits", qc.get("w_bit"))
    version = str(qc.get("version", "gemm")).lower()
    backend = str(qc.get("backend") or "autoawq").lower()
    if bits != 4:
        raise _unsupported(f"awq with bits={bits!r}")
    if version != "gemm":
        raise _unsupported(f"awq version {version!r}")
    if backend != "autoawq":
        raise _unsupported(f"awq backend {backend!r}")
    group = _positive_group(qc.get("group_size", qc.get("q_group_size")), "awq")
    return CheckpointQuant(format="awq", method="int4", group_size=group, symmetric=not qc.get("zero_point", True),
                           ignored=_names(qc.get("modules_to_not_convert")))


def _detect_gptq(qc: dict) -> CheckpointQuant:
    bits = qc.get("bits")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if bits != 4:
        raise _unsupported(f"gptq with bits={bits!r}")
    if qc.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
        raise _unsupported(f"gptq checkpoint_format {('marlin' if qc.get('is_marlin_format') else fmt)!r}")
    if qc.get("dynamic"):
        raise _unsupported("gptq with per-module 'dynamic' overrides")
    group = _positive_group(qc.get("group_size"), "gptq")
    ignored = [] if qc.get("lm_head") else ["lm_head"]
    ignored += [n for n in _names(qc.get("modules_to_not_convert")) if n not in ignored]
    return CheckpointQuant(format="gptq", method="int4", group_size=group, desc_act=bool(qc.get("desc_act", False)),
                           symmetric=bool(qc.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0, ignored=ignored)


def _detect_compressed_tensors(qc: dict) -> CheckpointQuant:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise _unsupported("compressed-tensors without config_groups")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and str(sparsity.get("format", "dense")).lower() != "dense":
        raise _unsupported(f"compressed-tensors sparsity {sparsity.get('format')!r}")
    if qc.get("transform_config"):
        raise _unsupported("compressed-tensors with transforms (rotations)")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _unsupported(f"compressed-tensors with quantization_status {status!r}")
    found = {_ct_group(dict(g), str(g.get("format") or qc.get("format") or "")) for g in groups.values()}
    if len(found) > 1:
        raise _unsupported("compressed-tensors with mixed schemes across config_groups")
    fields = dict(found.pop())
    return CheckpointQuant(**fields, ignored=_names(qc.get("ignore")))


def _ct_group(group: dict, fmt: str) -> tuple:
    """One config group as a hashable tuple of CheckpointQuant fields (raising when unsupported)."""
    w = group.get("weights") or {}
    a = group.get("input_activations")
    if group.get("output_activations"):
        raise _unsupported(f"compressed-tensors {fmt} with quantized output activations")
    wtype, bits, strategy = w.get("type"), w.get("num_bits"), str(w.get("strategy"))
    desc = f"compressed-tensors {fmt or '?'} with {bits}-bit {wtype} weights ({strategy} strategy)"
    if wtype == "float" and bits == 8 and fmt in ("float-quantized", "naive-quantized"):
        if strategy not in ("tensor", "channel") or not w.get("symmetric", True) or w.get("dynamic"):
            raise _unsupported(desc)
        activation = None
        if a:
            if a.get("type") != "float" or a.get("num_bits") != 8 or not a.get("symmetric", True):
                raise _unsupported(f"{desc} and {a.get('num_bits')}-bit {a.get('type')} activations")
            if a.get("dynamic") in (True, "true", "local"):
                activation = "dynamic"
            elif a.get("strategy") == "tensor":
                activation = "static"
            else:
                raise _unsupported(f"{desc} and static {a.get('strategy')} activations")
        return (("format", "compressed-tensors-fp8"), ("method", "fp8"), ("activation", activation), ("symmetric", True))
    if wtype == "int" and bits == 4 and fmt == "pack-quantized" and strategy == "group" and not a:
        group_size = _positive_group(w.get("group_size"), "compressed-tensors pack-quantized")
        return (("format", "compressed-tensors-w4a16"), ("method", "int4"), ("group_size", group_size),
                ("desc_act", w.get("actorder") == "group"), ("symmetric", bool(w.get("symmetric", True))))
    if a:
        desc += f" and {a.get('num_bits')}-bit {a.get('type')} activations"
    raise _unsupported(desc)


def read_quant_config(folder: str, hf_config: dict) -> CheckpointQuant | None:
    """``detect_quantization`` of a folder: config.json's quantization_config, else an AutoGPTQ
    ``quantize_config.json`` or an AutoAWQ ``quant_config.json`` beside it."""
    if not hf_config.get("quantization_config"):
        for fname, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
            side = _json(os.path.join(folder, fname))
            if side:
                hf_config = {**hf_config, "quantization_config": {"quant_method": method, **side}}
                break
    return detect_quantization(hf_config)


_MARKERS = (".qweight", ".weight_packed")


def check_unquantized(shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise when a checkpoint without a quantization config holds packed quantized tensors."""
    packed = next((n for n in shapes if n.endswith(_MARKERS)), None)
    if packed is not None:
        raise CheckpointError(f"checkpoint {source!r} holds quantized tensors ({packed!r}) but no quantization_config: "
                              "restore its config.json (or quantize_config.json)")


# Per format: the tensor that marks a quantized module and every tensor of one module.
_PARTS = {
    "compressed-tensors-fp8": ("weight_scale", ("weight", "weight_scale", "input_scale", "weight_zero_point",
                                                "input_zero_point")),
    "compressed-tensors-w4a16": ("weight_packed", ("weight_packed", "weight_scale", "weight_zero_point",
                                                   "weight_shape", "weight_g_idx")),
    "awq": ("qweight", ("qweight", "qzeros", "scales")),
    "gptq": ("qweight", ("qweight", "qzeros", "scales", "g_idx")),
}
_REQUIRED = {"compressed-tensors-fp8": ("weight",), "compressed-tensors-w4a16": ("weight_scale",),
             "awq": ("qzeros", "scales"), "gptq": ("qzeros", "scales")}

Loader = Callable[[str], torch.Tensor]


class QuantModules:
    """The quantized modules of one checkpoint: their stored tensors and unquantized [N, K] shapes.

    ``shapes`` maps stored tensor names (kiln-renamed modules) to their shapes; a module is
    quantized when its format's marker tensor (``weight_scale``, ``weight_packed`` or
    ``qweight``) is present.
    """

    def __init__(self, quant: CheckpointQuant, shapes: dict[str, tuple[int, ...]], source: str):
        self.quant = quant
        self.source = source
        marker, parts = _PARTS[quant.format]
        self.parts: dict[str, dict[str, str]] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        for name in shapes:
            if not name.endswith("." + marker):
                continue
            prefix = name[: -len(marker) - 1]
            found = {p: f"{prefix}.{p}" for p in parts if f"{prefix}.{p}" in shapes}
            required = _REQUIRED[quant.format]
            if quant.format == "compressed-tensors-w4a16" and not quant.symmetric:
                required += ("weight_zero_point",)
            missing = [p for p in required if p not in found]
            if missing:
                raise CheckpointError(f"quantized module {prefix!r} in {source!r} lacks {prefix}.{missing[0]}: "
                                      "re-download the checkpoint")
            self.parts[prefix] = found
            self.shapes[prefix] = self._logical_shape(prefix, {p: tuple(shapes[n]) for p, n in found.items()})

    def __contains__(self, prefix: str) -> bool:
        return prefix in self.parts

    def stored_names(self) -> set[str]:
        """Every stored tensor that belongs to a quantized module."""
        return {n for found in self.parts.values() for n in found.values()}

    def _bad(self, prefix: str, s: dict[str, tuple[int, ...]]) -> CheckpointError:
        listed = ", ".join(f"{p} {list(v)}" for p, v in s.items())
        return CheckpointError(f"quantized module {prefix!r} in {self.source!r} has shapes that do not fit "
                               f"{self.quant.format} (group size {self.quant.group_size}): {listed}")

    def _logical_shape(self, prefix: str, s: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        fmt, g = self.quant.format, self.quant.group_size or 1
        if fmt == "compressed-tensors-fp8":
            if len(s["weight"]) != 2:
                raise self._bad(prefix, s)
            n, k = s["weight"]
            if _numel(s["weight_scale"]) not in (1, n) or _numel(s.get("input_scale", (1,))) != 1:
                raise self._bad(prefix, s)
            return n, k
        if fmt == "compressed-tensors-w4a16":
            n, words = _dims(s["weight_packed"], 2, prefix, self)
            k = _dims(s["weight_scale"], 2, prefix, self)[1] * g
            zp = s.get("weight_zero_point")
            ok = s["weight_scale"][0] == n and words * 8 == k and (zp is None or zp in ((-(-n // 8), k // g), (n, k // g)))
            ok = ok and s.get("weight_g_idx", (k,)) == (k,)
        elif fmt == "awq":
            k, words = _dims(s["qweight"], 2, prefix, self)
            n = words * 8
            ok = s["scales"] == (k // g, n) and s["qzeros"] == (k // g, words) and k % g == 0
        else:
            rows, n = _dims(s["qweight"], 2, prefix, self)
            k = rows * 8
            ok = s["scales"] == (k // g, n) and s["qzeros"] == (k // g, -(-n // 8)) and k % g == 0
            ok = ok and s.get("g_idx", (k,)) == (k,)
        if not ok:
            raise self._bad(prefix, s)
        return n, k

    def canonical(self, prefix: str, load: Loader) -> dict[str, torch.Tensor]:
        """The module's tensors in kiln's canonical layout (``docs/quantization.md``)."""
        found = self.parts[prefix]
        get = lambda p: load(found[p])  # noqa: E731
        n, k = self.shapes[prefix]
        if self.quant.method == "fp8":
            return self._fp8(prefix, get, found, n)
        g = int(self.quant.group_size or k)
        fmt = self.quant.format
        if fmt == "compressed-tensors-w4a16":
            if "weight_shape" in found and [int(v) for v in get("weight_shape").reshape(-1)] != [n, k]:
                raise CheckpointError(f"{prefix}.weight_shape in {self.source!r} disagrees with its packed tensors [{n}, {k}]")
            q = _unpack_cols(get("weight_packed"))[:, :k]
            scales = get("weight_scale")
            if self.quant.symmetric:
                zeros = torch.full((n, k // g), 8, dtype=torch.uint8)
            else:
                zeros = self._ct_zeros(get("weight_zero_point"), n)
            g_idx = get("weight_g_idx") if "weight_g_idx" in found else None
        elif fmt == "awq":
            inverse = [AWQ_ORDER.index(j) for j in range(8)]
            q = _reorder(_unpack_cols(get("qweight")), inverse).t()
            zeros = _reorder(_unpack_cols(get("qzeros")), inverse).t()
            scales = get("scales").t()
            g_idx = None
        else:
            q = _unpack_rows(get("qweight")).t()
            zeros = _unpack_cols(get("qzeros"))[:, :n].t()
            if self.quant.zero_offset:
                zeros = (zeros + self.quant.zero_offset) & 15
            scales = get("scales").t()
            g_idx = get("g_idx") if "g_idx" in found else None
        out = {"qweight": None, "scales": scales.contiguous(), "qzeros": zeros.to(torch.uint8).contiguous()}
        perm = self._input_perm(prefix, g_idx, k, g)
        if perm is not None:
            q = q[:, perm.long()]
            out["input_perm"] = perm
        out["qweight"] = pack_canonical_int4(q)
        return out

    def _fp8(self, prefix: str, get, found: dict[str, str], n: int) -> dict[str, torch.Tensor]:
        weight = get("weight")
        if weight.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{prefix}.weight in {self.source!r} is {weight.dtype}, FP8 checkpoints need "
                                  "float8_e4m3fn: re-export the checkpoint in E4M3")
        scale = get("weight_scale").to(torch.float32).reshape(-1)
        out = {"weight": weight, "weight_scale": scale.expand(n).contiguous() if scale.numel() == 1 else scale}
        if "input_scale" in found:
            out["input_scale"] = get("input_scale").to(torch.float32).reshape(1)
        elif self.quant.activation == "static":
            raise CheckpointError(f"{prefix} in {self.source!r} has static activations but no input_scale: "
                                  "re-download the checkpoint")
        return out

    def _ct_zeros(self, zp: torch.Tensor, n: int) -> torch.Tensor:
        """compressed-tensors zero points as 0..15: packed int32 [N/8, K/G] (nibble = zp + 8), or
        signed int8 [N, K/G] as older versions stored them."""
        if zp.dtype == torch.int32:
            return _unpack_rows(zp)[:n]
        return (zp.to(torch.int16) + 8).clamp(0, 15).to(torch.uint8)

    def _input_perm(self, prefix: str, g_idx: torch.Tensor | None, k: int, g: int) -> torch.Tensor | None:
        """Act-order checkpoints: the column order that makes groups contiguous (the identity when
        g_idx already is in order); None for the others, whose g_idx must be in order."""
        plain = torch.arange(k) // g
        g_idx = plain if g_idx is None else g_idx.to(torch.int64).reshape(-1)
        if not self.quant.desc_act:
            if not torch.equal(g_idx, plain):
                raise CheckpointError(f"g_idx of {prefix!r} in {self.source!r} is shuffled but the config has no "
                                      "desc_act/actorder: fix quantization_config")
            return None
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], plain):
            raise CheckpointError(f"g_idx of {prefix!r} in {self.source!r} does not give each group {g} columns: "
                                  "kiln reads act-order checkpoints whose groups are all full")
        return perm.to(torch.int32)

    def dequantize(self, prefix: str, load: Loader) -> torch.Tensor:
        """The module's weight, dequantized to float32 [N, K] in the checkpoint's column order."""
        return dequantize_canonical(self.canonical(prefix, load), self.quant.group_size)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _dims(shape: tuple[int, ...], ndim: int, prefix: str, mods: QuantModules) -> tuple[int, ...]:
    if len(shape) != ndim:
        raise CheckpointError(f"quantized module {prefix!r} in {mods.source!r} has a tensor of shape {list(shape)}, "
                              f"expected {ndim} dimensions")
    return shape


def _unpack_cols(x: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, 8C]: nibble j (bits 4j..4j+3) of word c is column 8c + j."""
    r, c = x.shape
    return ((x.to(torch.int32).unsqueeze(-1) >> _SHIFTS) & 15).reshape(r, c * 8).to(torch.uint8)


def _unpack_rows(x: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> uint8 [8R, C]: nibble j of word (r, c) is row 8r + j."""
    r, c = x.shape
    return ((x.to(torch.int32).unsqueeze(1) >> _SHIFTS[:, None]) & 15).reshape(r * 8, c).to(torch.uint8)


def _reorder(q: torch.Tensor, inverse: list[int]) -> torch.Tensor:
    """Columns in blocks of 8 put back in natural order: column j of a block is nibble inverse[j]."""
    r, c = q.shape
    return q.reshape(r, c // 8, 8)[:, :, inverse].reshape(r, c)


def pack_canonical_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8 with column 2j in the low nibble, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def dequantize_canonical(tensors: dict[str, torch.Tensor], group_size: int | None) -> torch.Tensor:
    """float32 [N, K] weight of one projection's canonical tensors, in the ORIGINAL column order.

    FP8: ``weight * weight_scale[:, None]``. int4: ``(q - qzeros) * scales`` per group of
    ``group_size`` columns (inferred from the shapes when ``None``); with ``input_perm`` the
    stored columns are in permuted order and are put back (``w[:, input_perm] = w_perm``).
    """
    if "weight" in tensors:
        return tensors["weight"].to(torch.float32) * tensors["weight_scale"].to(torch.float32)[:, None]
    packed = tensors["qweight"]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
    n, k = q.shape
    g = group_size or k // tensors["scales"].shape[1]
    zeros = tensors["qzeros"].to(torch.float32).repeat_interleave(g, dim=1)
    scales = tensors["scales"].to(torch.float32).repeat_interleave(g, dim=1)
    w = (q.to(torch.float32) - zeros) * scales
    perm = tensors.get("input_perm")
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm.long()] = w
    return out
