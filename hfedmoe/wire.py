"""Wire format of a sparse update: one safetensors blob plus a JSON header, optionally zstd-framed.

Layout (STYLE.md section 5)::

    [b"HFZ1" + zstd frame of]  safetensors blob
        tensors       canonical keys (hfedmoe.names) -> deltas, only what the client trained
        __metadata__  {"hfedmoe": "<JSON header>"}

The JSON header carries the schema version, run id, round, client id, num_examples (|D_c|),
base-model hash, the wire dtype, per-expert usage u_c(e) (Eq. 16) and importance s^c(e)
(mean of Eq. 5), and the routed / updated / aggregated expert sets (aggregated = updated with
u_c(e) >= tau, Eq. 17). Tensors travel as fp32, bf16 or fp16 and are decoded to float32.

Decoding treats the bytes as hostile: sizes are bounded before anything is allocated, the
safetensors header is parsed and checked by hand before safetensors sees the blob, every field
is validated against a :class:`ModelSpec`, and any failure raises a :class:`WireError` subclass.
Nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import zstandard
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hfedmoe.errors import (
    ConfigError,
    MismatchError,
    ModelError,
    NonFiniteError,
    PayloadTooLarge,
    SchemaError,
    ShapeError,
    UnknownKeyError,
    WireError,
)
from hfedmoe.names import ExpertId, parse_key
from hfedmoe.update import SparseUpdate

SCHEMA_VERSION = 1
HEADER_KEY = "hfedmoe"
ZSTD_MAGIC = b"HFZ1"

WireDtype = Literal["float32", "bfloat16", "float16"]
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ST_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
_HEADER_FIELDS = {
    "schema": int, "run_id": str, "round": int, "client_id": str, "num_examples": int,
    "base_model_hash": str, "dtype": str, "tau": float, "usage": dict, "importance": dict,
    "routed": list, "updated": list, "aggregated": list, "meta": dict,
}
_STAT_TOLERANCE = 1e-6  # usage and importance are averages of gate probabilities: [0, 1]
_USAGE_SUM_TOLERANCE = 1e-3  # a layer's usage sums to 1 (float32 sums of many tokens)


@dataclass(frozen=True)
class WireConfig:
    """How updates are encoded and the limits decoding enforces."""

    dtype: WireDtype = "float32"
    compress: bool = False
    zstd_level: int = 3
    max_payload_bytes: int = 1 << 30  # on the wire and after decompression
    max_header_bytes: int = 4 << 20  # the safetensors JSON header (tensor table + our header)

    def __post_init__(self) -> None:
        if self.dtype not in _TORCH_DTYPES:
            raise ConfigError(f"wire.dtype must be one of {sorted(_TORCH_DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError("wire.zstd_level must be in [1, 22]")
        if self.max_payload_bytes < 1024 or self.max_header_bytes < 1024:
            raise ConfigError("wire.max_payload_bytes and wire.max_header_bytes must be >= 1024")


@dataclass(frozen=True)
class ParamSpec:
    """What the model allows for one canonical key: its exact shape and the wire dtypes."""

    shape: tuple[int, ...]
    dtypes: frozenset[str] = frozenset(_TORCH_DTYPES)


@dataclass(frozen=True)
class ModelSpec:
    """Canonical key -> :class:`ParamSpec`, plus the experts that exist (for expert-id checks)."""

    params: Mapping[str, ParamSpec]
    experts: frozenset[ExpertId] = field(default=frozenset())

    def __post_init__(self) -> None:
        if not self.experts:
            found = set()
            for key in self.params:
                try:
                    expert = parse_key(key).expert
                except ModelError:
                    continue
                if expert is not None:
                    found.add(expert)
            object.__setattr__(self, "experts", frozenset(found))


def spec_from_state(state: Mapping[str, torch.Tensor],
                    dtypes: frozenset[str] = frozenset(_TORCH_DTYPES)) -> ModelSpec:
    """Build a :class:`ModelSpec` from canonical key -> tensor (a model's trainable state)."""
    return ModelSpec({k: ParamSpec(tuple(v.shape), dtypes) for k, v in state.items()})


@dataclass(frozen=True)
class WireHeader:
    """The decoded JSON header of an update."""

    schema: int
    run_id: str
    round_idx: int
    client_id: str
    num_examples: int
    base_model_hash: str
    dtype: str
    tau: float
    usage: Mapping[ExpertId, float]
    importance: Mapping[ExpertId, float]
    routed: frozenset[ExpertId]
    updated: frozenset[ExpertId]
    aggregated: frozenset[ExpertId]
    meta: Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# Encoding


def _finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN/Inf. min/max propagate NaN and expose +-Inf, and one
    ``aminmax`` pass is several times faster than ``isfinite(t).all()`` on CPU."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _ids(ids: Any) -> list[str]:
    return sorted(str(e) for e in ids)


def encode(update: SparseUpdate, tau: float, cfg: WireConfig = WireConfig()) -> bytes:
    """Encode ``update`` as wire bytes; ``tau`` defines the aggregated set (Eq. 17).

    Raises:
        NonFiniteError: a delta holds NaN/Inf, or overflows the wire dtype.
        PayloadTooLarge: the encoded blob exceeds ``cfg.max_payload_bytes``.
        SchemaError: the header is not JSON-serialisable.
    """
    wire_dtype = _TORCH_DTYPES[cfg.dtype]
    tensors: dict[str, torch.Tensor] = {}
    for key, value in update.deltas.items():
        t = value.detach().to("cpu", wire_dtype).contiguous()
        if not _finite(t):
            raise NonFiniteError(f"{key}: NaN/Inf in delta (in {cfg.dtype})")
        tensors[key] = t
    header = {
        "schema": SCHEMA_VERSION, "run_id": update.run_id, "round": update.round_idx,
        "client_id": update.client_id, "num_examples": update.num_examples,
        "base_model_hash": update.base_model_hash, "dtype": cfg.dtype, "tau": float(tau),
        "usage": {str(e): float(v) for e, v in sorted(update.usage.items())},
        "importance": {str(e): float(v) for e, v in sorted(update.importance.items())},
        "routed": _ids(update.routed), "updated": _ids(update.updated),
        "aggregated": _ids(update.aggregated(tau)), "meta": update.meta.to_dict(),
    }
    try:
        text = json.dumps(header, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"header is not valid JSON: {exc}") from exc
    blob = st_save(tensors, metadata={HEADER_KEY: text})
    if cfg.compress:
        blob = ZSTD_MAGIC + zstandard.ZstdCompressor(level=cfg.zstd_level).compress(blob)
    if len(blob) > cfg.max_payload_bytes:
        raise PayloadTooLarge(f"encoded update is {len(blob)} bytes > {cfg.max_payload_bytes}")
    return blob


# ---------------------------------------------------------------------------------------------
# Decoding


def _decompress(data: bytes, limit: int) -> bytes:
    frame = data[len(ZSTD_MAGIC):]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise SchemaError(f"corrupt zstd frame: {exc}") from exc
    if declared > limit:
        raise PayloadTooLarge(f"zstd frame declares {declared} bytes > {limit}")
    out = io.BytesIO()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame, read_size=4 << 20)
        while chunk := reader.read(8 << 20):
            out.write(chunk)
            if out.tell() > limit:
                raise PayloadTooLarge(f"decompressed update exceeds {limit} bytes")
    except zstandard.ZstdError as exc:
        raise SchemaError(f"corrupt zstd frame: {exc}") from exc
    return out.getvalue()


def _table(blob: bytes, cfg: WireConfig) -> dict[str, Any]:
    """Parse and check the safetensors header by hand, before safetensors sees the blob."""
    if len(blob) < 8:
        raise SchemaError(f"payload of {len(blob)} bytes is too short for safetensors")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > cfg.max_header_bytes:
        raise PayloadTooLarge(f"safetensors header of {n} bytes > {cfg.max_header_bytes}")
    if n < 2 or 8 + n > len(blob):
        raise SchemaError(f"safetensors header length {n} does not fit a {len(blob)}-byte blob")
    try:
        table = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SchemaError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(table, dict):
        raise SchemaError("safetensors header is not a JSON object")
    return table


def _check_table(table: dict[str, Any], spec: ModelSpec, wire_dtype: str, data_len: int) -> None:
    want_st = _ST_DTYPES[wire_dtype]
    for key, info in table.items():
        if key == "__metadata__":
            continue
        if key not in spec.params:
            raise UnknownKeyError(f"tensor key not in the model: {key!r}")
        if not isinstance(info, dict):
            raise SchemaError(f"{key}: tensor entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise SchemaError(f"{key}: malformed shape {shape!r}")
        if tuple(shape) != spec.params[key].shape:
            raise ShapeError(f"{key}: shape {tuple(shape)} != model {spec.params[key].shape}")
        if dtype != want_st or wire_dtype not in spec.params[key].dtypes:
            raise ShapeError(f"{key}: dtype {dtype!r} not allowed (header says {wire_dtype})")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)):
            raise SchemaError(f"{key}: malformed data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if not (0 <= offsets[0] <= offsets[1] <= data_len and offsets[1] - offsets[0] == nbytes):
            raise SchemaError(f"{key}: data_offsets {offsets} do not fit the tensor data")


def _field(header: Mapping[str, Any], name: str) -> Any:
    if name not in header:
        raise SchemaError(f"header field {name!r} is missing")
    value, want = header[name], _HEADER_FIELDS[name]
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if want is float \
        else (type(value) is want)
    if not ok:
        raise SchemaError(f"header field {name!r} must be {want.__name__}, got {type(value).__name__}")
    return float(value) if want is float else value


def _expert(text: Any, spec: ModelSpec, where: str) -> ExpertId:
    if not isinstance(text, str):
        raise SchemaError(f"{where}: expert id must be a string, got {text!r}")
    try:
        expert = ExpertId.parse(text)
    except ModelError as exc:
        raise SchemaError(f"{where}: {exc}") from exc
    if expert not in spec.experts:
        raise UnknownKeyError(f"{where}: expert {text} does not exist in the model")
    return expert


def _stats(raw: dict[str, Any], spec: ModelSpec, where: str) -> dict[ExpertId, float]:
    out = {}
    for text, value in raw.items():
        expert = _expert(text, spec, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise SchemaError(f"{where}[{text}]: not a finite number: {value!r}")
        if not -_STAT_TOLERANCE <= value <= 1.0 + _STAT_TOLERANCE:
            raise SchemaError(f"{where}[{text}]: {value} is outside [0, 1]")
        out[expert] = float(value)
    return out


def _parse_header(text: Any, spec: ModelSpec) -> WireHeader:
    if not isinstance(text, str):
        raise SchemaError(f"__metadata__ has no {HEADER_KEY!r} entry")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"header is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SchemaError("header is not a JSON object")
    schema = _field(raw, "schema")
    if schema != SCHEMA_VERSION:
        raise SchemaError(f"schema version {schema} is not supported (want {SCHEMA_VERSION})")
    unknown = sorted(set(raw) - set(_HEADER_FIELDS))
    if unknown:
        raise SchemaError(f"unknown header field(s): {', '.join(unknown)}")
    f = {name: _field(raw, name) for name in _HEADER_FIELDS}
    if f["dtype"] not in _TORCH_DTYPES:
        raise SchemaError(f"header dtype {f['dtype']!r} is not a wire dtype")
    if f["num_examples"] <= 0:
        raise SchemaError(f"num_examples must be > 0, got {f['num_examples']}")
    if f["round"] < 0:
        raise SchemaError(f"round must be >= 0, got {f['round']}")
    if not (math.isfinite(f["tau"]) and 0.0 <= f["tau"] <= 1.0):
        raise SchemaError(f"tau must be in [0, 1], got {f['tau']}")
    sets = {}
    for name in ("routed", "updated", "aggregated"):
        sets[name] = frozenset(_expert(t, spec, name) for t in f[name])
    usage = _stats(f["usage"], spec, "usage")
    header = WireHeader(
        schema=schema, run_id=f["run_id"], round_idx=f["round"], client_id=f["client_id"],
        num_examples=f["num_examples"], base_model_hash=f["base_model_hash"], dtype=f["dtype"],
        tau=f["tau"], usage=usage, importance=_stats(f["importance"], spec, "importance"),
        routed=sets["routed"], updated=sets["updated"], aggregated=sets["aggregated"],
        meta=f["meta"])
    layer_sums: dict[int, float] = {}
    for e, u in usage.items():  # G_e(x) sums to 1 over a layer's experts for every token
        layer_sums[e.layer_idx] = layer_sums.get(e.layer_idx, 0.0) + u
    for layer, total in sorted(layer_sums.items()):
        if total > 1.0 + _USAGE_SUM_TOLERANCE:
            raise SchemaError(f"usage of layer {layer} sums to {total:.6f} > 1 (Eq. 16 averages "
                              f"gate probabilities, which sum to 1 over a layer's experts)")
    withheld = header.meta.get("withheld") if isinstance(header.meta, dict) else None
    if isinstance(withheld, list) and "usage" in withheld:  # nothing to threshold: all count
        if usage:
            raise SchemaError("usage is withheld (meta.withheld) but the header carries usage")
        want_agg = header.updated
    else:
        want_agg = frozenset(e for e in header.updated if usage.get(e, 0.0) >= header.tau)
    if header.aggregated != want_agg:
        raise SchemaError("aggregated set is not {updated with usage >= tau} (or, with usage "
                          "withheld, updated)")
    return header


def _expect(name: str, got: Any, want: Any) -> None:
    if want is not None and got != want:
        raise MismatchError(f"{name}: got {got!r}, expected {want!r}")


def decode_full(data: bytes, spec: ModelSpec, cfg: WireConfig = WireConfig(), *,
                run_id: str | None = None, round_idx: int | None = None,
                client_id: str | None = None,
                base_model_hash: str | None = None) -> tuple[WireHeader, SparseUpdate]:
    """Decode and validate wire bytes; see :func:`decode`. Also returns the header."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > cfg.max_payload_bytes:
        raise PayloadTooLarge(f"payload is {len(data)} bytes > {cfg.max_payload_bytes}")
    if data[:len(ZSTD_MAGIC)] == ZSTD_MAGIC:
        data = _decompress(data, cfg.max_payload_bytes)
    table = _table(data, cfg)
    meta = table.get("__metadata__")
    if not isinstance(meta, dict):
        raise SchemaError("safetensors header has no __metadata__ object")
    header = _parse_header(meta.get(HEADER_KEY), spec)
    _expect("run_id", header.run_id, run_id)
    _expect("round", header.round_idx, round_idx)
    _expect("client_id", header.client_id, client_id)
    _expect("base_model_hash", header.base_model_hash, base_model_hash)
    n = struct.unpack("<Q", data[:8])[0]
    _check_table(table, spec, header.dtype, len(data) - 8 - n)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise SchemaError(f"safetensors rejected the payload: {exc}") from exc
    deltas: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key not in spec.params or tuple(t.shape) != spec.params[key].shape:
            raise ShapeError(f"{key}: unexpected tensor after parsing")
        t = t.to(torch.float32)
        if not _finite(t):
            raise NonFiniteError(f"{key}: NaN/Inf in delta")
        deltas[key] = t
    update = SparseUpdate(
        run_id=header.run_id, round_idx=header.round_idx, client_id=header.client_id,
        num_examples=header.num_examples, deltas=deltas, usage=header.usage,
        importance=header.importance, routed=header.routed, updated=header.updated,
        base_model_hash=header.base_model_hash, meta=header.meta)
    return header, update


def decode(data: bytes, spec: ModelSpec, cfg: WireConfig = WireConfig(), *,
           run_id: str | None = None, round_idx: int | None = None, client_id: str | None = None,
           base_model_hash: str | None = None) -> SparseUpdate:
    """Decode wire bytes into a :class:`SparseUpdate` with float32 deltas.

    Args:
        data: the bytes as received (plain safetensors or ``ZSTD_MAGIC`` + zstd frame).
        spec: what the model allows (keys, shapes, dtypes, experts).
        cfg: size limits.
        run_id, round_idx, client_id, base_model_hash: expected values; ``None`` skips a check.

    Raises:
        WireError: a subclass naming what is wrong (never any other exception for bad bytes).
    """
    return decode_full(data, spec, cfg, run_id=run_id, round_idx=round_idx, client_id=client_id,
                       base_model_hash=base_model_hash)[1]


__all__ = [
    "HEADER_KEY", "SCHEMA_VERSION", "ZSTD_MAGIC", "ModelSpec", "ParamSpec", "WireConfig",
    "WireError", "WireHeader", "decode", "decode_full", "encode", "spec_from_state",
]
