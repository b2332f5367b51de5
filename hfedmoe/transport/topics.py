"""Every MQTT topic of the kit, built and parsed in one place; versioned and namespaced by run.

::

    hfedmoe/v1/{run}/register/{device}              device -> server: hello, capabilities, budget
    hfedmoe/v1/{run}/status/{device}                retained; last will publishes "offline"
    hfedmoe/v1/{run}/round                          server -> all: round announcements (retained)
    hfedmoe/v1/{run}/model/{sha}/manifest|chunk/{i} server -> all: global model blobs
    hfedmoe/v1/{run}/update/{device}/{sha}/...      device -> server: an update's manifest/chunks
    hfedmoe/v1/{run}/update/{device}/fetch/{sha}    device -> server: resend model chunks
    hfedmoe/v1/{run}/ack/{device}                   server -> device: acks and errors
    hfedmoe/v1/{run}/ack/{device}/resend/{sha}      server -> device: resend update chunks
    hfedmoe/v1/{run}/ack/{device}/secagg            server -> device: secure-aggregation
                                                    roster, share relay, unmask request
    hfedmoe/v1/{run}/ingest/...                     coordinator <-> ingest workers (server only)

A device's write set is its own register/status/update tree; its read set is its own ack tree
plus the broadcast ``round`` and ``model`` topics (see :mod:`hfedmoe.transport.broker_config`).

Account names are device ids; the broker takes them from the client certificate's CN. The
coordinator's account (:data:`SERVER_ACCOUNT`) reads and writes everything, so it and every
other name in :data:`RESERVED_IDS` can never be a device id (:func:`check_device_id`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hfedmoe.errors import ConfigError, ReservedIdError, TransportError

ROOT = "hfedmoe"
VERSION = "v1"
_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SHA = re.compile(r"[0-9a-f]{64}")

SERVER_ACCOUNT = "server"
# Names no device may take: the coordinator's account (the ACL gives it every topic). Compared
# case-insensitively, so no device looks like the server in logs or the run database either.
RESERVED_IDS = frozenset({SERVER_ACCOUNT})


def check_id(value: str, what: str = "id") -> str:
    """Validate a run/device id: 1-64 of ``[A-Za-z0-9_.-]`` (so never ``/``, ``+``, ``#``)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ConfigError(f"invalid {what} {value!r}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def check_device_id(value: str, what: str = "device id") -> str:
    """:func:`check_id`, and refuse the reserved account names (:data:`RESERVED_IDS`).

    Raises:
        ReservedIdError: ``value`` is a reserved account name (e.g. ``server``).
        ConfigError: ``value`` is not a valid id at all.
    """
    check_id(value, what)
    if value.lower() in RESERVED_IDS:
        raise ReservedIdError(f"{what} {value!r} is reserved (reserved account names: "
                              f"{', '.join(sorted(RESERVED_IDS))}); choose another name")
    return value


def check_sha(value: str) -> str:
    if not isinstance(value, str) or not _SHA.fullmatch(value):
        raise ConfigError(f"not a lowercase hex sha256: {value!r}")
    return value


@dataclass(frozen=True)
class TransferTopics:
    """Where one chunked transfer lives: ``{prefix}/manifest``, ``{prefix}/chunk/{i}``, and the
    topic its receiver publishes resend requests to."""

    prefix: str
    request: str


@dataclass(frozen=True)
class Topics:
    """Topic builder for one run."""

    run_id: str

    def __post_init__(self) -> None:
        check_id(self.run_id, "run id")

    @property
    def base(self) -> str:
        return f"{ROOT}/{VERSION}/{self.run_id}"

    def register(self, device: str) -> str:
        return f"{self.base}/register/{check_id(device, 'device id')}"

    def status(self, device: str) -> str:
        return f"{self.base}/status/{check_id(device, 'device id')}"

    def round(self) -> str:
        return f"{self.base}/round"

    def ack(self, device: str) -> str:
        return f"{self.base}/ack/{check_id(device, 'device id')}"

    def secagg(self, device: str) -> str:
        """Server -> device messages of a secure-aggregation round (the device's messages go
        up as update transfers)."""
        return f"{self.ack(device)}/secagg"

    def model(self, sha: str) -> TransferTopics:
        """A global-model blob; devices ask for missing chunks on their own fetch topic."""
        return TransferTopics(f"{self.base}/model/{check_sha(sha)}", "")

    def model_fetch(self, device: str, sha: str) -> str:
        return f"{self.base}/update/{check_id(device, 'device id')}/fetch/{check_sha(sha)}"

    def model_for(self, device: str, sha: str) -> TransferTopics:
        """The model transfer as seen by ``device`` (request topic = its fetch topic)."""
        return TransferTopics(self.model(sha).prefix, self.model_fetch(device, sha))

    def update(self, device: str, sha: str) -> TransferTopics:
        """A device's update blob; the server asks for missing chunks on the device's ack tree."""
        check_id(device, "device id")
        return TransferTopics(f"{self.base}/update/{device}/{check_sha(sha)}",
                              f"{self.ack(device)}/resend/{sha}")

    # sharded ingestion: workers <-> coordinator
    def ingest_status(self, worker: str) -> str:
        """Retained ``online``/``offline`` of an ingest worker (its last will)."""
        return f"{self.base}/ingest/status/{check_id(worker, 'worker id')}"

    def ingest_event(self, worker: str) -> str:
        """A worker's accepted/rejected/late notices to the coordinator."""
        return f"{self.base}/ingest/event/{check_id(worker, 'worker id')}"

    def ingest_partial(self, worker: str) -> str:
        """Where a worker says its partial aggregate of a closed round is written."""
        return f"{self.base}/ingest/partial/{check_id(worker, 'worker id')}"

    def ingest_control(self) -> str:
        """Coordinator -> workers: close a round (write your partial aggregate)."""
        return f"{self.base}/ingest/control"

    def all_ingest(self, kind: str) -> str:
        return f"{self.base}/ingest/{kind}/+"

    # filters used by subscribers
    def all_updates(self) -> str:
        return f"{self.base}/update/+/+/#"

    def all_update_pieces(self) -> list[str]:
        """Manifests and chunks of every update transfer, not the one-message ``whole`` ones
        (what the coordinator takes when workers share the rest)."""
        return [f"{self.base}/update/+/+/manifest", f"{self.base}/update/+/+/chunk/+"]

    def shared_whole_updates(self, group: str) -> str:
        """Every one-message update, dealt among the members of ``group``."""
        return f"$share/{check_id(group, 'group')}/{self.base}/update/+/+/whole"

    def all_fetches(self) -> str:
        return f"{self.base}/update/+/fetch/+"

    def all_models(self) -> str:
        return f"{self.base}/model/#"

    def all_status(self) -> str:
        return f"{self.base}/status/+"

    def all_register(self) -> str:
        return f"{self.base}/register/+"

    def ack_tree(self, device: str) -> str:
        return f"{self.ack(device)}/#"

    def update_request_for(self, prefix: str) -> str:
        """Map an update transfer prefix to its resend topic (the server's receiver uses this)."""
        device, sha = self.parse_update_prefix(prefix)
        return self.update(device, sha).request

    def parse_update_prefix(self, prefix: str) -> tuple[str, str]:
        parts = self.parse(prefix)
        if parts[0] != "update" or len(parts) != 3:
            raise TransportError(f"not an update transfer prefix: {prefix!r}")
        return parts[1], parts[2]

    def parse(self, topic: str) -> tuple[str, ...]:
        """Split ``topic`` under this run into its levels after ``hfedmoe/v1/{run}/``."""
        head = self.base + "/"
        if not topic.startswith(head):
            raise TransportError(f"topic {topic!r} is not under {self.base}")
        parts = tuple(topic[len(head):].split("/"))
        if not parts[0] or any(p == "" for p in parts):
            raise TransportError(f"malformed topic {topic!r}")
        return parts
