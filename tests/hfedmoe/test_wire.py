"""Wire format: round trips, every validation path, and a fuzzed decoder."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from hfedmoe import wire
from hfedmoe.errors import (
    MismatchError,
    NonFiniteError,
    PayloadTooLarge,
    SchemaError,
    ShapeError,
    UnknownKeyError,
    WireError,
)
from hfedmoe.names import ExpertId
from hfedmoe.update import SparseUpdate

E00, E01, E10 = ExpertId(0, 0), ExpertId(0, 1), ExpertId(1, 0)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.experts.0.w1": torch.randn(4, 3, generator=g),
        "layers.0.experts.1.w1": torch.randn(4, 3, generator=g),
        "layers.1.experts.0.w1": torch.randn(4, 3, generator=g),
        "layers.1.experts.1.w1": torch.randn(4, 3, generator=g),
        "layers.0.gate.weight": torch.randn(2, 3, generator=g),
        "shared.head.weight": torch.randn(5, 3, generator=g),
    }


SPEC = wire.spec_from_state(_state())


def _update(**kw) -> SparseUpdate:
    state = _state()
    base = dict(
        run_id="run1", round_idx=3, client_id="dev1", num_examples=17,
        deltas={k: state[k] for k in ("layers.0.experts.0.w1", "layers.1.experts.0.w1",
                                      "layers.0.gate.weight")},
        usage={E00: 0.5, E10: 0.001, E01: 0.2}, importance={E00: 0.7, E10: 0.1},
        routed=frozenset({E00, E01, E10}), updated=frozenset({E00, E10}),
        base_model_hash="abc123", meta={"loss": 0.25, "steps": 4},
    )
    base.update(kw)
    return SparseUpdate(**base)


def _resave(blob: bytes, mutate) -> bytes:
    """Re-encode ``blob`` with its JSON header changed by ``mutate(dict)``."""
    n = struct.unpack("<Q", blob[:8])[0]
    table = json.loads(blob[8:8 + n])
    header = json.loads(table["__metadata__"]["hfedmoe"])
    mutate(header)
    tensors = wire.decode(blob, SPEC).deltas
    return st_save(dict(tensors), metadata={"hfedmoe": json.dumps(header)})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(dtype, compress):
    cfg = wire.WireConfig(dtype=dtype, compress=compress)
    update = _update()
    blob = wire.encode(update, tau=0.01, cfg=cfg)
    header, out = wire.decode_full(blob, SPEC, cfg, run_id="run1", round_idx=3,
                                   client_id="dev1", base_model_hash="abc123")
    assert set(out.deltas) == set(update.deltas)
    tol = 0 if dtype == "float32" else 1e-2
    for k, v in update.deltas.items():
        assert out.deltas[k].dtype == torch.float32
        torch.testing.assert_close(out.deltas[k], v, atol=tol, rtol=tol)
    assert out.usage == update.usage and out.importance == update.importance
    assert out.routed == update.routed and out.updated == update.updated
    assert header.aggregated == frozenset({E00}) == update.aggregated(0.01)
    assert header.dtype == dtype and out.meta == {"loss": 0.25, "steps": 4}
    assert (blob[:4] == wire.ZSTD_MAGIC) == compress


def test_spec_collects_experts():
    assert SPEC.experts == {E00, E01, E10, ExpertId(1, 1)}
    assert SPEC.params["shared.head.weight"].shape == (5, 3)


@pytest.mark.parametrize("kw, err", [
    (dict(run_id="other"), MismatchError),
    (dict(round_idx=4), MismatchError),
    (dict(client_id="dev2"), MismatchError),
    (dict(base_model_hash="zzz"), MismatchError),
])
def test_expectations(kw, err):
    blob = wire.encode(_update(), tau=0.01)
    with pytest.raises(err):
        wire.decode(blob, SPEC, **kw)


def test_unknown_key_and_bad_shape():
    blob = wire.encode(_update(deltas={"layers.7.experts.0.w1": torch.zeros(4, 3)}), 0.01)
    with pytest.raises(UnknownKeyError):
        wire.decode(blob, SPEC)
    blob = wire.encode(_update(deltas={"layers.0.experts.0.w1": torch.zeros(3, 4)}), 0.01)
    with pytest.raises(ShapeError):
        wire.decode(blob, SPEC)


def test_dtype_not_allowed_by_spec():
    spec = wire.spec_from_state(_state(), dtypes=frozenset({"float32"}))
    blob = wire.encode(_update(), 0.01, wire.WireConfig(dtype="float16"))
    with pytest.raises(ShapeError):
        wire.decode(blob, spec)


def test_dtype_header_lies():
    blob = wire.encode(_update(), 0.01)
    bad = _resave(blob, lambda h: h.update(dtype="float16"))
    with pytest.raises(ShapeError):
        wire.decode(bad, SPEC)


def test_non_finite_rejected_both_ways():
    deltas = {"layers.0.experts.0.w1": torch.full((4, 3), float("nan"))}
    with pytest.raises(NonFiniteError):
        wire.encode(_update(deltas=deltas), 0.01)
    with pytest.raises(NonFiniteError):  # overflows fp16
        wire.encode(_update(deltas={"layers.0.experts.0.w1": torch.full((4, 3), 1e6)}), 0.01,
                    wire.WireConfig(dtype="float16"))
    raw = st_save({"layers.0.experts.0.w1": torch.full((4, 3), float("inf"))},
                  metadata={"hfedmoe": json.dumps(_header_dict())})
    with pytest.raises(NonFiniteError):
        wire.decode(raw, SPEC)


def _header_dict() -> dict:
    n = struct.unpack("<Q", wire.encode(_update(), 0.01)[:8])[0]
    blob = wire.encode(_update(), 0.01)
    return json.loads(json.loads(blob[8:8 + n])["__metadata__"]["hfedmoe"])


@pytest.mark.parametrize("mutate", [
    lambda h: h.update(schema=2),
    lambda h: h.pop("run_id"),
    lambda h: h.update(round="3"),
    lambda h: h.update(round=-1),
    lambda h: h.update(num_examples=0),
    lambda h: h.update(num_examples=True),
    lambda h: h.update(usage={"0:0": 1.5}),
    lambda h: h.update(usage={"0:0": "x"}),
    lambda h: h.update(importance={"0:0": -0.5}),
    lambda h: h.update(routed=["nope"]),
    lambda h: h.update(routed=[3]),
    lambda h: h.update(aggregated=["1:0"]),
    lambda h: h.update(dtype="int8"),
    lambda h: h.update(tau=2.0),
    lambda h: h.update(extra=1),
    lambda h: h.update(meta=[]),
])
def test_header_violations(mutate):
    bad = _resave(wire.encode(_update(), 0.01), mutate)
    with pytest.raises(SchemaError):
        wire.decode(bad, SPEC)


def test_expert_id_out_of_range():
    bad = _resave(wire.encode(_update(), 0.01), lambda h: h.update(routed=["5:0"]))
    with pytest.raises(UnknownKeyError):
        wire.decode(bad, SPEC)


def test_size_limits():
    cfg = wire.WireConfig(max_payload_bytes=1024)
    big = _update(deltas={"shared.head.weight": torch.zeros(5, 3)}, meta={"pad": "x" * 2000})
    with pytest.raises(PayloadTooLarge):
        wire.encode(big, 0.01, cfg)
    blob = wire.encode(big, 0.01)
    with pytest.raises(PayloadTooLarge):
        wire.decode(blob, SPEC, cfg)
    # a zstd bomb: small on the wire, large once decompressed
    bomb = wire.ZSTD_MAGIC + __import__("zstandard").ZstdCompressor().compress(b"\0" * 100_000)
    with pytest.raises(PayloadTooLarge):
        wire.decode(bomb, SPEC, wire.WireConfig(max_payload_bytes=4096))


def test_header_length_checked_before_safetensors():
    for n in (0, 1, 1 << 40, 2**64 - 1, 100):
        with pytest.raises(WireError):
            wire.decode(struct.pack("<Q", n) + b"{}" * 10, SPEC)
    with pytest.raises(SchemaError):
        wire.decode(b"", SPEC)
    with pytest.raises(SchemaError):
        wire.decode(wire.ZSTD_MAGIC + b"garbage", SPEC)


# ---------------------------------------------------------------------------------------------
# Fuzzing: the decoder never raises anything but a WireError, and never returns junk

REAL = [wire.encode(_update(), 0.01), wire.encode(_update(), 0.01, wire.WireConfig(compress=True)),
        wire.encode(_update(), 0.01, wire.WireConfig(dtype="bfloat16"))]


def _decode_or_wire_error(data: bytes) -> None:
    try:
        out = wire.decode(data, SPEC)
    except WireError:
        return
    for k, v in out.deltas.items():  # a flip inside tensor data: still a valid update
        assert v.dtype == torch.float32 and bool(torch.isfinite(v).all())
        assert tuple(v.shape) == SPEC.params[k].shape


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _decode_or_wire_error(data)


@FUZZ
@given(st.sampled_from(REAL), st.binary(min_size=1, max_size=64), st.integers(0, 10_000))
def test_fuzz_spliced_bytes(blob, junk, pos):
    pos %= len(blob)
    _decode_or_wire_error(blob[:pos] + junk + blob[pos + len(junk):])


@FUZZ
@given(st.sampled_from(REAL), st.integers(0, 10**9))
def test_fuzz_bit_flips(blob, where):
    bit = where % (len(blob) * 8)
    data = bytearray(blob)
    data[bit // 8] ^= 1 << (bit % 8)
    _decode_or_wire_error(bytes(data))


@pytest.mark.parametrize("blob", REAL, ids=["f32", "zstd", "bf16"])
def test_every_truncation(blob):
    for end in range(0, len(blob), max(1, len(blob) // 400)):
        _decode_or_wire_error(blob[:end])


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                        max_size=4),
                    max_leaves=12),
       st.sampled_from(sorted(wire._HEADER_FIELDS)))
def test_fuzz_header_field_values(value, name):
    header = _header_dict()
    header[name] = value
    try:
        text = json.dumps(header)
    except ValueError:
        return
    raw = st_save({"layers.0.experts.0.w1": torch.zeros(4, 3)}, metadata={"hfedmoe": text})
    _decode_or_wire_error(raw)


@FUZZ
@given(st.dictionaries(st.text(max_size=30), st.recursive(
    st.none() | st.integers(-2**70, 2**70) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8), max_size=4))
def test_fuzz_safetensors_table(table):
    text = json.dumps(table).encode()
    _decode_or_wire_error(struct.pack("<Q", len(text)) + text + b"\0" * 64)


def test_withheld_usage_round_trips_and_every_updated_expert_is_aggregated():
    blob = wire.encode(_update(usage={}, importance={}, routed=frozenset({E00, E10}),
                               meta={"steps": 4, "withheld": ["importance", "loss", "usage"]}),
                       0.01)
    got = wire.decode(blob, SPEC)
    assert got.usage == {} and got.importance == {} and got.meta.loss is None
    assert got.withholds("usage") and got.aggregated(0.01) == {E00, E10}  # E10 under tau too
    lying = _resave(blob, lambda h: h.update(usage={"0:0": 0.5}))  # withheld, yet sent
    with pytest.raises(SchemaError):
        wire.decode(lying, SPEC)
    short = _resave(blob, lambda h: h.update(aggregated=["0:0"]))
    with pytest.raises(SchemaError):
        wire.decode(short, SPEC)
