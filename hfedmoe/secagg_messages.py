"""Secure aggregation's messages as typed values (no pickle), one frozen dataclass each.

A round's phases (Bonawitz et al. 2017, with one self-mask seed per unit)::

    client -> server   AdvertiseKeys    two X25519 public keys and the units it will contribute
    server -> clients  Roster           U1: everyone's public keys, the units and their groups
    client -> server   ShareKeys        sealed ShareBundles, one per other client in U1
    server -> client   ShareRelay       the bundles addressed to it (their senders are U2)
    client -> server   MaskedInput      one masked uint64 vector per unit (U3: who sent one)
    server -> clients  UnmaskRequest    U3, the dropped (U2 - U3), the units to reveal
    client -> server   UnmaskResponse   mask-key shares of the dropped, seed shares of U3

Encoding: ``b"HSA1"``, one kind byte, a 4-byte little-endian header length, a JSON header
(bytes as hex), then a binary payload (MaskedInput's vectors, little-endian uint64).
``from_bytes`` takes untrusted bytes and returns a validated value or raises
:class:`~hfedmoe.errors.SecAggError` (nothing else).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from hfedmoe.errors import HFedMoEError, SecAggError
from hfedmoe.secagg import KEY_BYTES, ROUND_KEY_BYTES, unit_of

MAGIC = b"HSA1"
MAX_MESSAGE_BYTES = 1 << 30
MAX_ITEMS = 1 << 20
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_UNIT = re.compile(r"(e:\d{1,6}:\d{1,6})|(k:[A-Za-z0-9_.]{1,300})")


def _frame(kind: int, header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + bytes([kind]) + len(head).to_bytes(4, "little") + head + payload


def _unframe(data: Any, kind: int) -> tuple[dict[str, Any], bytes]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggError(f"message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_MESSAGE_BYTES or len(data) < 9 or data[:4] != MAGIC:
        raise SecAggError("not a secure-aggregation message")
    if data[4] != kind:
        raise SecAggError(f"message kind {data[4]}, want {kind}")
    n = int.from_bytes(data[5:9], "little")
    try:
        head = json.loads(data[9:9 + n])
    except (UnicodeDecodeError, ValueError) as exc:
        raise SecAggError(f"header is not JSON: {exc}") from exc
    if not isinstance(head, dict) or len(data) < 9 + n:
        raise SecAggError("header is not a JSON object")
    return head, data[9 + n:]


def _get(h: dict[str, Any], name: str, typ: type) -> Any:
    if name not in h or not isinstance(h[name], typ) or isinstance(h[name], bool):
        raise SecAggError(f"field {name!r} missing or not {typ.__name__}")
    if isinstance(h[name], list) and len(h[name]) > MAX_ITEMS:
        raise SecAggError(f"field {name!r} has too many items")
    return h[name]


def _hex(value: Any, length: int, what: str) -> bytes:
    try:
        out = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        out = None
    if out is None or len(out) != length:
        raise SecAggError(f"{what} must be {length} bytes as hex")
    return out


def _blob(value: Any, what: str) -> bytes:
    try:
        return bytes.fromhex(value) if isinstance(value, str) else _bad(what)
    except ValueError:
        return _bad(what)


def _bad(what: str) -> bytes:
    raise SecAggError(f"{what} is not hex")


def check_client(value: Any) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise SecAggError(f"not a client id: {value!r}"[:200])
    return value


def check_unit(value: Any) -> str:
    if not isinstance(value, str) or not _UNIT.fullmatch(value):
        raise SecAggError(f"not a unit: {value!r}"[:200])
    return value


def _keys_of(unit: str, keys: Any) -> tuple[str, ...]:
    if not isinstance(keys, list) or not keys or keys != sorted(set(keys)):
        raise SecAggError(f"{unit}: keys must be a sorted list without repeats")
    try:
        if any(not isinstance(k, str) or unit_of(k) != unit for k in keys):
            raise SecAggError(f"{unit}: a key outside the unit")
    except HFedMoEError as exc:
        raise SecAggError(f"{unit}: {exc}") from exc
    return tuple(keys)


def _ids(values: Any, what: str) -> tuple[str, ...]:
    if not isinstance(values, list) or len(values) > MAX_ITEMS:
        raise SecAggError(f"{what} must be a list")
    out = tuple(check_client(v) for v in values)
    if len(set(out)) != len(out):
        raise SecAggError(f"{what} repeats a client")
    return out


def _common(h: dict[str, Any]) -> tuple[bytes, str]:
    return (_hex(h.get("round_key"), ROUND_KEY_BYTES, "round_key"),
            check_client(h.get("client")))


@dataclass(frozen=True)
class UnitDecl:
    """A unit and its parameter keys (sorted), with its members in a :class:`Roster`."""

    unit: str
    keys: tuple[str, ...]
    members: tuple[str, ...] = ()

    def to_json(self) -> list[Any]:
        return [self.unit, list(self.keys), list(self.members)]

    @classmethod
    def from_json(cls, v: Any) -> UnitDecl:
        if not isinstance(v, list) or len(v) != 3:
            raise SecAggError("a unit must be [unit, keys, members]")
        unit = check_unit(v[0])
        return cls(unit, _keys_of(unit, v[1]), _ids(v[2], f"{unit} members"))


@dataclass(frozen=True)
class AdvertiseKeys:
    round_key: bytes
    client: str
    enc_public: bytes
    mask_public: bytes
    units: tuple[UnitDecl, ...]
    KIND = 1

    def to_bytes(self) -> bytes:
        return _frame(self.KIND, {"round_key": self.round_key.hex(), "client": self.client,
                                  "enc": self.enc_public.hex(), "mask": self.mask_public.hex(),
                                  "units": [u.to_json() for u in self.units]})

    @classmethod
    def from_bytes(cls, data: Any) -> AdvertiseKeys:
        h, _ = _unframe(data, cls.KIND)
        rk, client = _common(h)
        units = tuple(UnitDecl.from_json(u) for u in _get(h, "units", list))
        if len({u.unit for u in units}) != len(units) or any(u.members for u in units):
            raise SecAggError("units repeat, or name members")
        return cls(rk, client, _hex(h.get("enc"), KEY_BYTES, "enc"),
                   _hex(h.get("mask"), KEY_BYTES, "mask"), units)


@dataclass(frozen=True)
class ClientKeys:
    client: str
    enc_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class Roster:
    round_key: bytes
    clients: tuple[ClientKeys, ...]  # U1, sorted by id: a client's share index is 1 + position
    units: tuple[UnitDecl, ...]  # units with at least k members
    KIND = 2

    def to_bytes(self) -> bytes:
        return _frame(self.KIND, {
            "round_key": self.round_key.hex(), "client": "server",
            "clients": [[c.client, c.enc_public.hex(), c.mask_public.hex()] for c in self.clients],
            "units": [u.to_json() for u in self.units]})

    @classmethod
    def from_bytes(cls, data: Any) -> Roster:
        h, _ = _unframe(data, cls.KIND)
        rk, _ = _common(h)
        clients = []
        for c in _get(h, "clients", list):
            if not isinstance(c, list) or len(c) != 3:
                raise SecAggError("a roster entry must be [client, enc, mask]")
            clients.append(ClientKeys(check_client(c[0]), _hex(c[1], KEY_BYTES, "enc"),
                                      _hex(c[2], KEY_BYTES, "mask")))
        ids = [c.client for c in clients]
        if ids != sorted(set(ids)):
            raise SecAggError("roster clients must be sorted and unique")
        units = tuple(UnitDecl.from_json(u) for u in _get(h, "units", list))
        if any(not set(u.members) <= set(ids) for u in units):
            raise SecAggError("a unit member is not in the roster")
        return cls(rk, tuple(clients), units)

    def index(self, client: str) -> int:
        """The Shamir share index of ``client`` (1-based position in the roster)."""
        for i, c in enumerate(self.clients):
            if c.client == client:
                return i + 1
        raise SecAggError(f"{client} is not in the roster")


@dataclass(frozen=True)
class Sealed:
    """One sealed :class:`ShareBundle`; ``peer`` is the recipient in ShareKeys, the sender in
    ShareRelay."""

    peer: str
    blob: bytes


def _sealed(h: dict[str, Any]) -> tuple[Sealed, ...]:
    out = []
    for s in _get(h, "shares", list):
        if not isinstance(s, list) or len(s) != 2:
            raise SecAggError("a sealed share must be [peer, hex]")
        out.append(Sealed(check_client(s[0]), _blob(s[1], "sealed share")))
    if len({s.peer for s in out}) != len(out):
        raise SecAggError("two sealed shares for one peer")
    return tuple(out)


@dataclass(frozen=True)
class ShareKeys:
    round_key: bytes
    client: str
    shares: tuple[Sealed, ...]
    commitments: tuple[tuple[str, bytes], ...]  # (unit, SHA-256 of its self-mask seed)
    KIND = 3

    def to_bytes(self) -> bytes:
        return _frame(self.KIND, {
            "round_key": self.round_key.hex(), "client": self.client,
            "shares": [[s.peer, s.blob.hex()] for s in self.shares],
            "commitments": [[u, c.hex()] for u, c in self.commitments]})

    @classmethod
    def from_bytes(cls, data: Any) -> ShareKeys:
        h, _ = _unframe(data, cls.KIND)
        rk, client = _common(h)
        commits = []
        for c in _get(h, "commitments", list):
            if not isinstance(c, list) or len(c) != 2:
                raise SecAggError("a commitment must be [unit, hex]")
            commits.append((check_unit(c[0]), _hex(c[1], 32, "commitment")))
        return cls(rk, client, _sealed(h), tuple(commits))


@dataclass(frozen=True)
class ShareRelay:
    round_key: bytes
    client: str  # the recipient
    shares: tuple[Sealed, ...]
    KIND = 4

    def to_bytes(self) -> bytes:
        return _frame(self.KIND, {"round_key": self.round_key.hex(), "client": self.client,
                                  "shares": [[s.peer, s.blob.hex()] for s in self.shares]})

    @classmethod
    def from_bytes(cls, data: Any) -> ShareRelay:
        h, _ = _unframe(data, cls.KIND)
        rk, client = _common(h)
        return cls(rk, client, _sealed(h))


@dataclass(frozen=True, repr=False)
class ShareBundle:
    """What ``owner`` gives ``holder`` (sealed under their shared key): the holder's share of
    the owner's mask private key and of each of the owner's unit seeds."""

    round_key: bytes
    owner: str
    holder: str
    key_share: bytes
    seed_shares: tuple[tuple[str, bytes], ...]  # (unit, share)
    KIND = 5

    def __repr__(self) -> str:
        return f"ShareBundle({self.owner} -> {self.holder}, {len(self.seed_shares)} seeds)"

    def to_bytes(self) -> bytes:
        return _frame(self.KIND, {"round_key": self.round_key.hex(), "client": self.owner,
                                  "holder": self.holder, "key": self.key_share.hex(),
                                  "seeds": [[u, s.hex()] for u, s in self.seed_shares]})

    @classmethod
    def from_bytes(cls, data: Any) -> ShareBundle:
        h, _ = _unframe(data, cls.KIND)
        rk, owner = _common(h)
        seeds = _pairs(_get(h, "seeds", list), "seed share")
        return cls(rk, owner, check_client(h.get("holder")), _hex(h.get("key"), KEY_BYTES, "key"),
                   seeds)


def _pairs(items: list[Any], what: str) -> tuple[tuple[str, bytes], ...]:
    out = []
    for it in items:
        if not isinstance(it, list) or len(it) != 2:
            raise SecAggError(f"a {what} must be [unit, hex]")
        out.append((check_unit(it[0]), _hex(it[1], KEY_BYTES, what)))
    if len({u for u, _ in out}) != len(out):
        raise SecAggError(f"two {what}s for one unit")
    return tuple(out)


@dataclass(frozen=True)
class MaskedInput:
    round_key: bytes
    client: str
    vectors: tuple[tuple[str, np.ndarray], ...]  # (unit, masked uint64 vector)
    KIND = 6

    def to_bytes(self) -> bytes:
        head = {"round_key": self.round_key.hex(), "client": self.client,
                "units": [[u, len(v)] for u, v in self.vectors]}
        payload = b"".join(np.ascontiguousarray(v, dtype="<u8").tobytes() for _, v in self.vectors)
        return _frame(self.KIND, head, payload)

    @classmethod
    def from_bytes(cls, data: Any) -> MaskedInput:
        h, payload = _unframe(data, cls.KIND)
        rk, client = _common(h)
        units = _get(h, "units", list)
        if any(not isinstance(u, list) or len(u) != 2 or not isinstance(u[1], int)
               or isinstance(u[1], bool) or u[1] < 1 for u in units):
            raise SecAggError("units must be [unit, length >= 1]")
        if 8 * sum(u[1] for u in units) != len(payload):
            raise SecAggError(f"payload is {len(payload)} bytes, the units say "
                              f"{8 * sum(u[1] for u in units)}")
        words = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
        out, at = [], 0
        for unit, n in units:
            out.append((check_unit(unit), words[at:at + n]))
            at += n
        if len({u for u, _ in out}) != len(out):
            raise SecAggError("a unit appears twice")
        return cls(rk, client, tuple(out))


@dataclass(frozen=True)
class UnmaskRequest:
    round_key: bytes
    survivors: tuple[str, ...]  # U3: masked input received
    dropped: tuple[str, ...]  # U2 - U3: shared keys, sent no masked input
    units: tuple[str, ...]  # the units to reveal (at least k contributors in U3)
    KIND = 7

    def to_bytes(self) -> bytes:
        return _frame(self.KIND, {"round_key": self.round_key.hex(), "client": "server",
                                  "survivors": list(self.survivors),
                                  "dropped": list(self.dropped), "units": list(self.units)})

    @classmethod
    def from_bytes(cls, data: Any) -> UnmaskRequest:
        h, _ = _unframe(data, cls.KIND)
        rk, _ = _common(h)
        survivors = _ids(h.get("survivors"), "survivors")
        dropped = _ids(h.get("dropped"), "dropped")
        if set(survivors) & set(dropped):
            raise SecAggError("a client both survived and dropped")
        units = tuple(check_unit(u) for u in _get(h, "units", list))
        return cls(rk, survivors, dropped, units)


@dataclass(frozen=True, repr=False)
class UnmaskResponse:
    round_key: bytes
    client: str
    key_shares: tuple[tuple[str, bytes], ...]  # (dropped owner, share of its mask key)
    seed_shares: tuple[tuple[str, str, bytes], ...]  # (survivor owner, unit, share)
    # the responder's own seeds of the units to reveal: the server checks them against their
    # commitments and rebuilds from shares only the seeds of survivors that did not respond
    own_seeds: tuple[tuple[str, bytes], ...] = ()
    KIND = 8

    def __repr__(self) -> str:
        return (f"UnmaskResponse({self.client}: {len(self.key_shares)} key shares, "
                f"{len(self.seed_shares)} seed shares)")

    def to_bytes(self) -> bytes:
        return _frame(self.KIND, {
            "round_key": self.round_key.hex(), "client": self.client,
            "keys": [[o, s.hex()] for o, s in self.key_shares],
            "seeds": [[o, u, s.hex()] for o, u, s in self.seed_shares],
            "own": [[u, s.hex()] for u, s in self.own_seeds]})

    @classmethod
    def from_bytes(cls, data: Any) -> UnmaskResponse:
        h, _ = _unframe(data, cls.KIND)
        rk, client = _common(h)
        keys = []
        for it in _get(h, "keys", list):
            if not isinstance(it, list) or len(it) != 2:
                raise SecAggError("a key share must be [owner, hex]")
            keys.append((check_client(it[0]), _hex(it[1], KEY_BYTES, "key share")))
        seeds = []
        for it in _get(h, "seeds", list):
            if not isinstance(it, list) or len(it) != 3:
                raise SecAggError("a seed share must be [owner, unit, hex]")
            seeds.append((check_client(it[0]), check_unit(it[1]),
                          _hex(it[2], KEY_BYTES, "seed share")))
        if len({o for o, _ in keys}) != len(keys) or len({(o, u) for o, u, _ in seeds}) != len(seeds):
            raise SecAggError("a share repeats")
        own = _pairs(_get(h, "own", list), "own seed")
        return cls(rk, client, tuple(keys), tuple(seeds), own)
