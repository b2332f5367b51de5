"""The server's side of expert-level secure aggregation (:mod:`hfedmoe.secagg`).

:class:`SecAggServer` runs one round's phases over typed messages (bytes in, bytes out, no
I/O): ``advertise`` -> ``roster()`` -> ``share_keys`` -> ``relays()`` -> ``masked_input`` ->
``unmask_request()`` -> ``unmask_response`` -> ``finalize(global_state)``. Every message is
checked in full before it changes anything, so a bad one raises a typed error
(:class:`~hfedmoe.errors.SecAggError`, :class:`~hfedmoe.errors.ReplayError`) and the round goes
on as if it had not arrived. Masked vectors are summed on arrival (memory per unit, not per
client).

What this object ever holds: each client's public keys and declared units (which experts it
trained and qualified for), sealed bundles it cannot open, masked vectors, and after unmasking
the sums of the revealed units, each unit's summed weight, the mask keys of the dropped clients
and the seeds of the revealed units. Units with fewer than k contributors are never asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hfedmoe.aggregation import AggregationRule
from hfedmoe.errors import ReplayError, SecAggError
from hfedmoe.secagg import SecAggConfig, agree, public_of, recover_secret, seed_commitment
from hfedmoe.secagg_messages import (
    AdvertiseKeys,
    ClientKeys,
    MaskedInput,
    Roster,
    Sealed,
    ShareKeys,
    ShareRelay,
    UnitDecl,
    UnmaskRequest,
    UnmaskResponse,
)
from hfedmoe.secagg_units import decode_mean, has_fallback, unmask, vector_length


@dataclass
class SecAggOutcome:
    """A closed round: the new global state and what was and was not revealed.

    ``revealed``: unit -> contributors whose inputs it sums; ``withheld``: unit -> why it was
    not aggregated (``"below-k"``, ``"below-k-after-dropout"``, ``"unrecoverable"``,
    ``"no-weight"``).
    """

    state: dict[str, torch.Tensor]
    revealed: dict[str, int] = field(default_factory=dict)
    withheld: dict[str, str] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


def _parse(cls: Any, data: Any) -> Any:
    return data if isinstance(data, cls) else cls.from_bytes(data)


class SecAggServer:
    """One secure-aggregation round on the server.

    Args:
        cfg: the settings (k, dropout fraction, quantization).
        rule: the aggregation rule the clients weigh by.
        round_key: this round's fresh nonce (``os.urandom(16)``).
        shapes: canonical key -> shape of the global state.
        seen_keys: public keys of earlier rounds (shared between rounds); a reused one is
            refused as a replay, and this round's are added.
    """

    def __init__(self, cfg: SecAggConfig, rule: AggregationRule, round_key: bytes,
                 shapes: Mapping[str, Sequence[int]], seen_keys: set[bytes] | None = None) -> None:
        self.cfg, self.rule, self.round_key = cfg, rule, round_key
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.seen_keys = seen_keys if seen_keys is not None else set()
        self.phase = "advertise"
        self._ads: dict[str, AdvertiseKeys] = {}
        self._unit_keys: dict[str, tuple[str, ...]] = {}
        self._roster: Roster | None = None
        self._members: dict[str, tuple[str, ...]] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._commits: dict[str, dict[str, bytes]] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._senders: dict[str, list[str]] = {}
        self._masked: set[str] = set()
        self._plain: set[str] = set()
        self._request: UnmaskRequest | None = None
        self._responses: dict[str, UnmaskResponse] = {}
        self.withheld: dict[str, str] = {}

    # --- checks shared by every phase ---------------------------------------------------
    def _check(self, phase: str, round_key: bytes, client: str, seen: Any,
               allowed: Any) -> None:
        if round_key != self.round_key:
            raise ReplayError(f"{client}: round key is not this round's")
        if client in seen:
            raise ReplayError(f"{client}: second {phase} message")
        if self.phase != phase:
            raise SecAggError(f"{client}: {phase} message while the round is in {self.phase}")
        if allowed is not None and client not in allowed:
            raise SecAggError(f"{client}: not in this phase's set of clients")

    def refuse_plain(self, client: str) -> None:
        """Called for a plain (unmasked) update during a secure round: refused, and the
        client may not send a masked input afterwards.

        Raises:
            SecAggError: always (a secure round takes no plain update).
        """
        self._plain.add(client)
        raise SecAggError(f"{client}: a plain update in a secure-aggregation round")

    # --- phase 0 ------------------------------------------------------------------------
    def advertise(self, data: Any) -> None:
        """Take a client's AdvertiseKeys (bytes or value)."""
        msg: AdvertiseKeys = _parse(AdvertiseKeys, data)
        self._check("advertise", msg.round_key, msg.client, self._ads, None)
        if len(self._ads) >= self.cfg.max_clients:  # more could wrap the 64-bit sums
            raise SecAggError(f"{msg.client}: the round has secagg.max_clients already")
        if msg.enc_public == msg.mask_public or {msg.enc_public, msg.mask_public} & self.seen_keys:
            raise ReplayError(f"{msg.client}: a public key used before")
        for u in msg.units:
            if any(k not in self.shapes for k in u.keys):
                raise SecAggError(f"{msg.client}: {u.unit} names a key the model lacks")
            known = self._unit_keys.get(u.unit)
            if known is not None and known != u.keys:
                raise SecAggError(f"{msg.client}: {u.unit} with other keys than its peers")
        for u in msg.units:
            self._unit_keys.setdefault(u.unit, u.keys)
        self.seen_keys |= {msg.enc_public, msg.mask_public}
        self._ads[msg.client] = msg

    def roster(self) -> Roster:
        """Close phase 0: U1, and the units declared by at least k clients with their groups."""
        self._check("advertise", self.round_key, "server", (), None)
        groups: dict[str, list[str]] = {}
        for client in sorted(self._ads):
            for u in self._ads[client].units:
                groups.setdefault(u.unit, []).append(client)
        units = []
        for unit, members in sorted(groups.items()):
            if len(members) >= self.cfg.min_contributors:
                units.append(UnitDecl(unit, self._unit_keys[unit], tuple(members)))
                self._members[unit] = tuple(members)
            else:
                self.withheld[unit] = "below-k"
        clients = tuple(ClientKeys(c, a.enc_public, a.mask_public)
                        for c, a in sorted(self._ads.items()))
        self._roster = Roster(self.round_key, clients, tuple(units))
        self.phase = "share"
        return self._roster

    # --- phase 1 ------------------------------------------------------------------------
    def share_keys(self, data: Any) -> None:
        """Take a client's ShareKeys: one sealed bundle for every other client of U1 and a
        commitment to each of its units' seeds."""
        msg: ShareKeys = _parse(ShareKeys, data)
        self._check("share", msg.round_key, msg.client, self._shares, self._ads)
        if {s.peer for s in msg.shares} != set(self._ads) - {msg.client}:
            raise SecAggError(f"{msg.client}: sealed bundles must go to every other client")
        mine = {u for u, m in self._members.items() if msg.client in m}
        if {u for u, _ in msg.commitments} != mine or len(msg.commitments) != len(mine):
            raise SecAggError(f"{msg.client}: commitments must cover exactly its units")
        self._shares[msg.client] = msg
        self._commits[msg.client] = dict(msg.commitments)

    def relays(self) -> dict[str, ShareRelay]:
        """Close phase 1: each client of U2 gets the bundles U2's other members sealed for it."""
        self._check("share", self.round_key, "server", (), None)
        out = {}
        for client in sorted(self._shares):
            sealed = tuple(Sealed(sender, s.blob) for sender, msg in sorted(self._shares.items())
                           for s in msg.shares if s.peer == client)
            out[client] = ShareRelay(self.round_key, client, sealed)
        self.phase = "masked"
        return out

    # --- phase 2 ------------------------------------------------------------------------
    def expected_units(self, client: str) -> dict[str, int]:
        """unit -> vector length of what ``client`` must send: its units whose members in
        U2 number at least k."""
        out = {}
        for unit, members in self._members.items():
            alive = [m for m in members if m in self._shares]
            if client in alive and len(alive) >= self.cfg.min_contributors:
                out[unit] = vector_length(self._unit_keys[unit], self.shapes,
                                          has_fallback(unit, self.rule))
        return out

    def masked_input(self, data: Any) -> None:
        """Take a client's masked vectors and add them into the per-unit sums."""
        msg: MaskedInput = _parse(MaskedInput, data)
        self._check("masked", msg.round_key, msg.client, self._masked, self._shares)
        if msg.client in self._plain:
            raise SecAggError(f"{msg.client}: sent a plain update this round")
        want = self.expected_units(msg.client)
        got = {u: len(v) for u, v in msg.vectors}
        if got != want:
            raise SecAggError(f"{msg.client}: masked units or lengths differ from the roster's")
        for unit, vec in msg.vectors:
            total = self._sums.get(unit)
            self._sums[unit] = vec.copy() if total is None else total + vec
            self._senders.setdefault(unit, []).append(msg.client)
        self._masked.add(msg.client)

    def unmask_request(self) -> UnmaskRequest:
        """Close phase 2: U3, the dropped (U2 - U3) and the units to reveal (>= k in U3)."""
        self._check("masked", self.round_key, "server", (), None)
        survivors = tuple(sorted(self._masked))
        dropped = tuple(sorted(set(self._shares) - self._masked))
        units = []
        for unit, members in sorted(self._members.items()):
            alive = [m for m in members if m in self._masked]
            if len(alive) >= self.cfg.min_contributors:
                units.append(unit)
            else:
                self.withheld[unit] = "below-k-after-dropout"
        self._request = UnmaskRequest(self.round_key, survivors, dropped, tuple(units))
        self.phase = "unmask"
        return self._request

    # --- phase 3 ------------------------------------------------------------------------
    def unmask_response(self, data: Any) -> None:
        """Take a survivor's shares; only shares the request asked for are accepted."""
        msg: UnmaskResponse = _parse(UnmaskResponse, data)
        req = self._request
        self._check("unmask", msg.round_key, msg.client, self._responses,
                    req.survivors if req else ())
        assert req is not None
        if any(o not in req.dropped for o, _ in msg.key_shares):
            raise SecAggError(f"{msg.client}: a key share of a client that did not drop")
        for owner, unit, _ in msg.seed_shares:
            if (unit not in req.units or owner == msg.client or owner not in req.survivors
                    or owner not in self._members[unit]):
                raise SecAggError(f"{msg.client}: a seed share that was not asked for")
        for unit, _ in msg.own_seeds:
            if unit not in req.units or msg.client not in self._members[unit]:
                raise SecAggError(f"{msg.client}: an own seed that was not asked for")
        self._responses[msg.client] = msg

    def finalize(self, global_state: Mapping[str, torch.Tensor]) -> SecAggOutcome:
        """Close the round: rebuild the dropped clients' mask keys and the revealed units'
        seeds, unmask, and apply each revealed unit's weighted mean delta to a copy of
        ``global_state``. A unit that cannot be rebuilt is withheld, the round still closes."""
        self._check("unmask", self.round_key, "server", (), None)
        assert self._request is not None and self._roster is not None
        state, revealed = reveal_units(self, global_state)
        self.phase = "done"
        return SecAggOutcome(state, revealed, dict(self.withheld), self._request.survivors,
                             self._request.dropped)

    # --- read-only views for the unmasking step -------------------------------------------
    @property
    def request(self) -> UnmaskRequest:
        assert self._request is not None
        return self._request

    @property
    def roster_value(self) -> Roster:
        assert self._roster is not None
        return self._roster



def _recover_key(srv: SecAggServer, dropped: str) -> bytes | None:
    """The dropped client's mask private key from the survivors' shares (checked against its
    public key), or None when too few good shares came back."""
    roster, t = srv.roster_value, srv.cfg.threshold(len(srv.roster_value.clients) - 1)
    shares = {roster.index(c): dict(r.key_shares)[dropped] for c, r in srv._responses.items()
              if dropped in dict(r.key_shares)}
    public = srv._ads[dropped].mask_public
    try:
        return recover_secret(shares, t, lambda sk: public_of(sk) == public)
    except SecAggError:
        return None


def _recover_seed(srv: SecAggServer, owner: str, unit: str) -> bytes | None:
    """A survivor's self-mask seed of ``unit`` (checked against its commitment): the one it
    revealed itself, else rebuilt from the others' shares; None when neither works."""
    commit = srv._commits[owner][unit]
    own = dict(srv._responses[owner].own_seeds).get(unit) if owner in srv._responses else None
    if own is not None and seed_commitment(own, srv.round_key, unit) == commit:
        return own
    roster, t = srv.roster_value, srv.cfg.threshold(len(srv.roster_value.clients) - 1)
    shares = {}
    for c, r in srv._responses.items():
        for o, u, share in r.seed_shares:
            if (o, u) == (owner, unit):
                shares[roster.index(c)] = share
    try:
        return recover_secret(shares, t,
                              lambda s: seed_commitment(s, srv.round_key, unit) == commit)
    except SecAggError:
        return None


def _unmask_unit(srv: SecAggServer, unit: str, keys: dict[str, bytes | None]) -> np.ndarray | None:
    """The unit's unmasked sum, or None when a seed or a dropped member's key is missing."""
    req, members = srv.request, srv._members[unit]
    alive = [m for m in members if m in req.survivors]
    gone = [m for m in members if m in req.dropped]
    seeds = [_recover_seed(srv, m, unit) for m in alive]
    if any(s is None for s in seeds) or any(keys.get(d) is None for d in gone):
        return None
    pairs = [(u, d, agree(keys[d], srv._ads[u].mask_public, srv.round_key, b"mask"))  # type: ignore[arg-type]
             for u in alive for d in gone]
    return unmask(srv._sums[unit], unit, srv.round_key, seeds, pairs)  # type: ignore[arg-type]


def reveal_units(srv: SecAggServer, global_state: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Unmask every requested unit and apply its weighted mean delta to a copy of the state;
    the new state and unit -> contributors. Withheld units are written to ``srv.withheld``."""
    req = srv.request
    keys = {d: _recover_key(srv, d) for d in req.dropped}
    state, revealed = dict(global_state), {}
    for unit in req.units:
        total = _unmask_unit(srv, unit, keys)
        if total is None:
            srv.withheld[unit] = "unrecoverable"
            continue
        mean = decode_mean(total, srv._unit_keys[unit], srv.shapes, has_fallback(unit, srv.rule),
                           srv.cfg)
        if mean is None:
            srv.withheld[unit] = "no-weight"
            continue
        for key, delta in mean.items():
            ref = global_state[key]
            state[key] = (ref.detach().to(torch.float64) + delta.to(ref.device)).to(ref.dtype)
        revealed[unit] = len(srv._senders[unit])
    return state, revealed
