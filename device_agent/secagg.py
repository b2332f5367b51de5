"""The device's side of expert-level secure aggregation (:mod:`hfedmoe.secagg`).

One :class:`SecAggClient` per round wraps the device's :class:`~hfedmoe.update.SparseUpdate`
and answers the server's phases in order: ``advertise()`` -> ``share_keys(roster)`` ->
``masked_input(relay)`` -> ``unmask(request)``. Its protections do not rely on the server
following the protocol for the checks it can make itself: it contributes a unit only if its
group has at least k members, never reveals a seed share for a unit whose surviving group is
below k, and never reveals both kinds of share for one client. Key pairs and seeds come from
the OS's randomness and live only in this object.
"""

from __future__ import annotations

from collections.abc import Mapping

from hfedmoe.aggregation import AggregationRule
from hfedmoe.errors import SecAggError
from hfedmoe.secagg import (
    SecAggConfig,
    agree,
    new_keypair,
    new_seed,
    open_sealed,
    seal,
    seed_commitment,
    split_secret,
)
from hfedmoe.secagg_messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    Sealed,
    ShareBundle,
    ShareKeys,
    ShareRelay,
    UnitDecl,
    UnmaskRequest,
    UnmaskResponse,
)
from hfedmoe.secagg_units import contributions, encode, mask
from hfedmoe.update import SparseUpdate

PHASES = ("advertise", "share", "masked", "unmask", "done")


def sealing_aad(round_key: bytes, owner: str, holder: str) -> bytes:
    """Associated data of a sealed bundle: binds it to the round and both ends."""
    return round_key + b"|" + owner.encode() + b"|" + holder.encode()


class SecAggClient:
    """One device's secure-aggregation state for one round.

    Args:
        update: the device's update (unmasked; it never leaves this object in the clear).
        rule: the round's aggregation rule (weights are computed here, Eq. 17 and Eq. 20-21).
        cfg: the secure-aggregation settings the server announced.
        round_key: the server's fresh nonce for this round.
    """

    def __init__(self, update: SparseUpdate, rule: AggregationRule, cfg: SecAggConfig,
                 round_key: bytes) -> None:
        self.client = update.client_id
        self.cfg, self.round_key = cfg, round_key
        self._deltas = update.deltas
        self._contrib = contributions(update, rule, cfg)
        self._enc, self._mask = new_keypair(), new_keypair()
        self._phase = "advertise"
        self._roster: Roster | None = None
        self._units: dict[str, UnitDecl] = {}
        self._seeds: dict[str, bytes] = {}
        self._held: dict[str, ShareBundle] = {}
        self._u2: frozenset[str] = frozenset()

    def _enter(self, phase: str, round_key: bytes) -> None:
        if round_key != self.round_key:
            raise SecAggError(f"{self.client}: message for another round")
        if self._phase != phase:
            raise SecAggError(f"{self.client}: {phase} message in phase {self._phase}")

    def _next(self) -> None:
        self._phase = PHASES[PHASES.index(self._phase) + 1]

    def advertise(self) -> AdvertiseKeys:
        """Phase 0: the public keys and the units (with their keys) this device contributes."""
        self._enter("advertise", self.round_key)
        units = tuple(UnitDecl(c.unit, c.keys) for c in self._contrib.values())
        self._next()
        return AdvertiseKeys(self.round_key, self.client, self._enc.public, self._mask.public,
                             units)

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Phase 1: Shamir-share the mask private key and one seed per unit among the other
        clients of the roster, each holder's shares sealed under a key only it can derive.

        Raises:
            SecAggError: wrong round or phase, this device missing or misrepresented in the
                roster, a unit of it with fewer than k members or other keys.
        """
        self._enter("share", roster.round_key)
        mine = [c for c in roster.clients if c.client == self.client]
        if len(mine) != 1 or (mine[0].enc_public, mine[0].mask_public) != (
                self._enc.public, self._mask.public):
            raise SecAggError(f"{self.client}: the roster misstates this device's keys")
        units = {u.unit: u for u in roster.units if self.client in u.members}
        for u in units.values():
            if len(u.members) < self.cfg.min_contributors or u.keys != self._contrib[u.unit].keys:
                raise SecAggError(f"{self.client}: roster unit {u.unit} has "
                                  f"{len(u.members)} members or other keys")
        n = len(roster.clients)
        t = self.cfg.threshold(n - 1)
        self._seeds = {u: new_seed() for u in sorted(units)}
        key_shares = split_secret(self._mask.private, t, n)
        seed_shares = {u: split_secret(s, t, n) for u, s in self._seeds.items()}
        sealed = []
        for peer in roster.clients:
            if peer.client == self.client:
                continue
            i = roster.index(peer.client)
            bundle = ShareBundle(self.round_key, self.client, peer.client, key_shares[i],
                                 tuple((u, seed_shares[u][i]) for u in sorted(units)))
            key = agree(self._enc.private, peer.enc_public, self.round_key, b"enc")
            sealed.append(Sealed(peer.client, seal(key, bundle.to_bytes(), sealing_aad(
                self.round_key, self.client, peer.client))))
        self._roster, self._units = roster, units
        self._next()
        commits = tuple((u, seed_commitment(s, self.round_key, u)) for u, s in self._seeds.items())
        return ShareKeys(self.round_key, self.client, tuple(sealed), commits)

    def _open(self, sealed: Sealed) -> ShareBundle:
        assert self._roster is not None
        peers = {c.client: c for c in self._roster.clients}
        if sealed.peer not in peers or sealed.peer == self.client:
            raise SecAggError(f"{self.client}: a bundle from {sealed.peer}, not a peer")
        key = agree(self._enc.private, peers[sealed.peer].enc_public, self.round_key, b"enc")
        plain = open_sealed(key, sealed.blob, sealing_aad(self.round_key, sealed.peer,
                                                          self.client))
        bundle = ShareBundle.from_bytes(plain)
        if (bundle.owner, bundle.holder, bundle.round_key) != (
                sealed.peer, self.client, self.round_key):
            raise SecAggError(f"{self.client}: a bundle names the wrong owner, holder or round")
        return bundle

    def masked_input(self, relay: ShareRelay) -> MaskedInput:
        """Phase 2: keep the shares addressed here; send each unit's masked vector, masked
        with the members that shared keys (the relay's senders). A unit left with fewer than k
        such members is not sent.

        Raises:
            SecAggError: wrong round, phase or recipient; a bundle that fails authentication.
        """
        self._enter("masked", relay.round_key)
        if relay.client != self.client:
            raise SecAggError(f"{self.client}: a relay for {relay.client}")
        held = {s.peer: self._open(s) for s in relay.shares}
        assert self._roster is not None
        self._held, self._u2 = held, frozenset(held) | {self.client}
        peers = {c.client: c for c in self._roster.clients}
        vectors = []
        for unit, decl in sorted(self._units.items()):
            members = [m for m in decl.members if m in self._u2]
            if len(members) < self.cfg.min_contributors:
                continue
            pairs = {m: agree(self._mask.private, peers[m].mask_public, self.round_key, b"mask")
                     for m in members if m != self.client}
            vec = encode(self._deltas, self._contrib[unit], self.cfg)
            vectors.append((unit, mask(vec, unit, self.round_key, self._seeds[unit],
                                       self.client, pairs)))
        self._next()
        return MaskedInput(self.round_key, self.client, tuple(vectors))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 3: shares of the dropped clients' mask keys and of the survivors' seeds of
        the units to reveal.

        Raises:
            SecAggError: wrong round or phase; survivors and dropped that are not a split of
                the clients that shared keys; a unit to reveal with fewer than k survivors.
        """
        self._enter("unmask", request.round_key)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if self.client not in survivors or survivors | dropped != self._u2:
            raise SecAggError(f"{self.client}: survivors and dropped do not split the round")
        seeds: list[tuple[str, str, bytes]] = []
        own = []
        for unit in request.units:
            decl = self._units_any(unit)
            alive = [m for m in decl.members if m in survivors]
            if len(alive) < self.cfg.min_contributors:
                raise SecAggError(f"{self.client}: asked to reveal {unit} with {len(alive)} "
                                  f"contributors (< k)")
            seeds += [(m, unit, dict(self._held[m].seed_shares)[unit]) for m in alive
                      if m != self.client and unit in dict(self._held[m].seed_shares)]
            if self.client in alive:
                own.append((unit, self._seeds[unit]))
        keys = tuple((d, self._held[d].key_share) for d in sorted(dropped) if d in self._held)
        self._next()
        return UnmaskResponse(self.round_key, self.client, keys, tuple(seeds), tuple(own))

    def _units_any(self, unit: str) -> UnitDecl:
        assert self._roster is not None
        for u in self._roster.units:
            if u.unit == unit:
                return u
        raise SecAggError(f"{self.client}: {unit} is not a unit of the roster")

    @property
    def units(self) -> Mapping[str, UnitDecl]:
        """The roster units this device contributes to."""
        return dict(self._units)
