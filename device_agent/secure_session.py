"""A device's secure round over its :class:`~device_agent.link.ServerLink`.

When a round announcement carries a ``secagg`` table, the device does not send its update:
it runs :class:`device_agent.secagg.SecAggClient`'s four phases with the server. Each message
it sends goes as an update transfer (chunked, re-announced until acknowledged); each message it
waits for arrives on ``ack/{device}/secagg``. The device gives up on a phase whose message does
not come by the round's deadline plus four phase timeouts (it then counts as dropped on the
server's side).
"""

from __future__ import annotations

from typing import Any

from device_agent.link import ServerLink
from device_agent.secagg import SecAggClient
from hfedmoe.aggregation import AggregationRule
from hfedmoe.config import from_dict
from hfedmoe.errors import ConfigError, SecAggError, TransportError
from hfedmoe.protocol import RoundAnnouncement
from hfedmoe.secagg import ROUND_KEY_BYTES
from hfedmoe.secagg_config import SecAggConfig
from hfedmoe.secagg_messages import Roster, ShareRelay, UnmaskRequest
from hfedmoe.update import SparseUpdate


def announced_secagg(table: dict[str, Any]) -> tuple[SecAggConfig, bytes]:
    """The settings and round key of an announcement's ``secagg`` table.

    Raises:
        SecAggError: a missing or malformed round key, or settings the config refuses.
    """
    fields = {k: v for k, v in table.items() if k != "round_key"}
    try:
        key = bytes.fromhex(table.get("round_key", ""))
        cfg = from_dict(SecAggConfig, fields)
    except (ValueError, TypeError, ConfigError) as exc:
        raise SecAggError(f"announced secagg settings: {exc}") from exc
    if len(key) != ROUND_KEY_BYTES or not cfg.enabled:
        raise SecAggError("announced secagg settings: no round key, or not enabled")
    return cfg, key


class SecureSession:
    """One device's secure round: call :meth:`run`, or the phases in order.

    Args:
        link: the device's connected link.
        ann: the round's announcement (with its ``secagg`` table).
        update: the device's trained update (after its privacy settings were applied).
        rule: the round's aggregation rule (the strategy's).
    """

    def __init__(self, link: ServerLink, ann: RoundAnnouncement, update: SparseUpdate,
                 rule: AggregationRule) -> None:
        cfg, key = announced_secagg(dict(ann.secagg))
        self.link, self.round_idx = link, ann.round_idx
        self.client = SecAggClient(update, rule, cfg, key)
        self.give_up = float(ann.deadline) + 4 * cfg.phase_timeout_s
        self.bytes_up = 0
        link.secagg.clear()  # what an earlier round left

    def _send(self, data: bytes) -> None:
        status = self.link.send_update(self.round_idx, data, self.give_up)
        self.bytes_up += len(data)
        if status != "accepted":
            raise SecAggError(f"round {self.round_idx}: the server answered {status}")

    def _wait(self, cls: Any) -> Any:
        if not self.link.pump_until(lambda: cls.KIND in self.link.secagg, self.give_up):
            raise TransportError(f"round {self.round_idx}: no {cls.__name__} in time")
        return cls.from_bytes(self.link.secagg.pop(cls.KIND))

    def advertise(self) -> None:
        self._send(self.client.advertise().to_bytes())

    def share(self) -> None:
        self._send(self.client.share_keys(self._wait(Roster)).to_bytes())

    def mask(self) -> None:
        self._send(self.client.masked_input(self._wait(ShareRelay)).to_bytes())

    def unmask(self) -> None:
        self._send(self.client.unmask(self._wait(UnmaskRequest)).to_bytes())

    def run(self) -> str:
        """All four phases; ``"accepted"`` when the last was acknowledged.

        Raises:
            SecAggError: the server refused a message, or sent one the device refuses.
            TransportError: a phase's message did not come in time.
        """
        for phase in (self.advertise, self.share, self.mask, self.unmask):
            phase()
        return "accepted"
