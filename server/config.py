"""Server configuration: the kit's sections plus rounds, transport and wire limits."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from hfedmoe.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    check_quantize_adapter,
    resolve_adapter,
)
from hfedmoe.eligibility import EligibilityConfig
from hfedmoe.errors import ConfigError
from hfedmoe.secagg_config import SecAggConfig
from hfedmoe.transport.config import TransportConfig
from hfedmoe.transport.topics import Topics, check_id
from hfedmoe.wire import WireConfig

DASHBOARD_TOKEN_ENV = "HFEDMOE_DASHBOARD_TOKEN"  # the dashboard's token, kept out of config files


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RoundConfig:
    """How rounds run.

    Attributes:
        rounds: federated rounds to run.
        deadline_s: seconds a round stays open for updates (devices also train within it).
        train_time_s: local compute window each device budgets its experts for (0: the
            deadline minus the device's upload margin).
        min_updates: close the round early once this many updates are in (k of n; 0: all).
        fraction: fraction of online devices chosen each round.
        over_select: extra fraction chosen on top, so that k of n can close without stragglers.
        min_devices: devices that must be registered before the first round starts.
        registration_timeout_s: how long to wait for ``min_devices``.
        late_policy: an update that arrives after its round closed is dropped, or folded into
            the next round's aggregation.
        allowed_devices: if set, only these device ids may register.
        seed: participant sampling seed.
        budget_share: the simulator's budgets (0: planned from each profile's memory and
            rates at the emulation scale, ``emulate_reference``): each emulated device trains
            at most this share of the model's experts x its profile's available memory over
            the largest of the run's profiles, at least 1 (:func:`lab.simulate.share_cap`).
        emulate_reference: the simulator's emulation scale (with ``budget_share = 0``): the
            model whose size the profiles' memory and rates are scaled to, a shipped example's
            name (``"olmoe-1b-7b-0924"``, as ``examples/simulate.toml`` sets) or a directory
            with a ``config.json`` (``device_agent.emulation``); "" (the default): the model is
            planned at its own size.
    """

    rounds: int = 3
    deadline_s: float = 120.0
    train_time_s: float = 0.0
    min_updates: int = 0
    fraction: float = 1.0
    over_select: float = 0.0
    min_devices: int = 1
    registration_timeout_s: float = 120.0
    late_policy: Literal["drop", "fold"] = "drop"
    allowed_devices: tuple[str, ...] = ()
    seed: int = 0
    budget_share: float = 0.0
    emulate_reference: str = ""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("rounds.rounds must be >= 1")
        if self.train_time_s < 0 or self.train_time_s > self.deadline_s:
            raise ConfigError("rounds.train_time_s must be in [0, deadline_s]")
        if self.deadline_s <= 0 or self.registration_timeout_s < 0:
            raise ConfigError("rounds.deadline_s must be > 0 and registration_timeout_s >= 0")
        if self.min_updates < 0 or self.min_devices < 1:
            raise ConfigError("rounds.min_updates must be >= 0 and min_devices >= 1")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"rounds.fraction (the share of online devices chosen each "
                              f"round) must be in (0, 1], got {self.fraction}")
        if self.over_select < 0:
            raise ConfigError(f"rounds.over_select must be >= 0, got {self.over_select}")
        if self.seed < 0:
            raise ConfigError(f"rounds.seed must be >= 0, got {self.seed}")
        if not 0 <= self.budget_share <= 1:
            raise ConfigError(f"rounds.budget_share must be in [0, 1] (0: the cost model), "
                              f"got {self.budget_share}")
        for d in self.allowed_devices:
            check_id(d, "device id")


@dataclass(frozen=True)
class PolicyConfig:
    """What the server accepts of a device's self-reported weights.

    ``num_examples`` (|D_c|, the data-size weight of Eq. 17 and FedAvg) comes from the device,
    so one device could claim 1e9 examples and dominate the average. An update's count may not
    exceed ``examples_vs_registered`` x the local examples the device declared when it
    registered, ``examples_vs_median`` x the median of what the registered devices declared
    (so a device cannot inflate its registration either), nor ``max_examples``; each rule is
    off at 0 and a rule without declared counts does not apply. Usage and importance are
    range-checked on decode (every value in [0, 1], a layer's usage summing to at most 1).

    Bounded updates (docs/deployment.md, "Bounded updates"; every rule off by default):
    ``class_caps`` caps the experts one update of a device class may carry whatever budget
    the device registered (a device's class is the ``platform`` its registration reports:
    ``jetson``, ``android``, ``linux``, ``macos``, ``windows``, else ``unknown``;
    :func:`server.bounds.device_class`). The class is self-reported, so against a lying device
    the cap that holds is the largest in the table (or ``default_class_cap``). An update over
    its cap is refused (BudgetExceededError). ``max_update_norm`` bounds the L2 norm of the
    whole update (every delta), ``max_expert_norm`` that of each expert's deltas; an update
    over either is refused (PolicyError) or scaled into them, by ``on_norm_violation``.

    Attributes:
        examples_vs_registered: cap as a multiple of the device's registered local examples.
        examples_vs_median: cap as a multiple of the median registered local examples.
        max_examples: absolute cap (0: none).
        on_violation: ``"reject"`` the update (PolicyError, nothing of it is kept) or
            ``"clip"`` its count to the cap and accept it.
        max_registered_examples: a registration declaring more local examples is refused.
        class_caps: device class -> the most experts one update may carry (0: no cap).
        default_class_cap: the cap of a class not in ``class_caps`` (0: no cap).
        max_update_norm: bound on the L2 norm of an update's deltas together (0: off).
        max_expert_norm: bound on the L2 norm of each expert's deltas (0: off).
        on_norm_violation: ``"reject"`` the update (PolicyError) or ``"clip"`` it into the
            bounds (:func:`hfedmoe.robust.clip_update`) and accept it.
    """

    examples_vs_registered: float = 1.0
    examples_vs_median: float = 10.0
    max_examples: int = 0
    on_violation: Literal["reject", "clip"] = "reject"
    max_registered_examples: int = 10_000_000
    class_caps: dict[str, int] = field(default_factory=dict)
    default_class_cap: int = 0
    max_update_norm: float = 0.0
    max_expert_norm: float = 0.0
    on_norm_violation: Literal["reject", "clip"] = "reject"

    def __post_init__(self) -> None:
        for name, cap in self.class_caps.items():
            if not isinstance(name, str) or not name or type(cap) is not int or cap < 0:
                raise ConfigError(f"policy.class_caps.{name}: a class name and an integer "
                                  f">= 0 (0: no cap), got {cap!r}")
        if type(self.default_class_cap) is not int or self.default_class_cap < 0:
            raise ConfigError(f"policy.default_class_cap must be an integer >= 0 (0: no cap), "
                              f"got {self.default_class_cap!r}")
        for name in ("max_update_norm", "max_expert_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"policy.{name} must be a finite number >= 0 (0: off), "
                                  f"got {value}")
        if self.on_norm_violation not in ("reject", "clip"):
            raise ConfigError(f"policy.on_norm_violation must be 'reject' or 'clip', got "
                              f"{self.on_norm_violation!r}")
        if min(self.examples_vs_registered, self.examples_vs_median) < 0 \
                or self.max_examples < 0 or self.max_registered_examples < 1:
            raise ConfigError("policy: caps must be >= 0 (0: off), max_registered_examples >= 1")
        if self.examples_vs_registered and self.examples_vs_registered < 1:
            raise ConfigError("policy.examples_vs_registered must be 0 (off) or >= 1")
        if self.on_violation not in ("reject", "clip"):
            raise ConfigError("policy.on_violation must be 'reject' or 'clip'")

    def examples_cap(self, registered: int | None, declared: list[int]) -> int | None:
        """The most examples an update may claim (None: no rule applies)."""
        import statistics

        caps = []
        if self.max_examples:
            caps.append(self.max_examples)
        if self.examples_vs_registered and registered:
            caps.append(int(self.examples_vs_registered * registered))
        if self.examples_vs_median and declared:
            caps.append(int(self.examples_vs_median * statistics.median(declared)))
        return max(1, min(caps)) if caps else None


@dataclass(frozen=True)
class AggregationConfig:
    """The server's robust option for aggregation (:mod:`hfedmoe.robust`), next to the
    strategy's weighting (Eq. 17-21).

    Attributes:
        robust: ``"none"`` (the strategy's weighted means, today's behaviour),
            ``"trimmed-mean"`` (per key, the coordinate-wise mean over its qualifying senders
            after dropping the ``trim_fraction`` largest and smallest values per element) or
            ``"norm-bounded"`` (each sender's delta of a key clipped to the median norm among
            the key's senders, then the weighted mean). Either buffers the round's updates in
            memory until it closes, and needs ``ingest.workers = 0``.
        trim_fraction: share of a key's senders dropped at each end (``"trimmed-mean"``).
        kinds: the key kinds the option applies to (``expert``, ``gate``, ``shared``).
    """

    robust: Literal["none", "trimmed-mean", "norm-bounded"] = "none"
    trim_fraction: float = 0.1
    kinds: tuple[str, ...] = ("expert", "gate", "shared")

    def __post_init__(self) -> None:
        if self.robust not in ("none", "trimmed-mean", "norm-bounded"):
            raise ConfigError(f"aggregation.robust must be 'none', 'trimmed-mean' or "
                              f"'norm-bounded', got {self.robust!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"aggregation.trim_fraction must be in [0, 0.5), got "
                              f"{self.trim_fraction}")
        if not self.kinds or not set(self.kinds) <= {"expert", "gate", "shared"}:
            raise ConfigError(f"aggregation.kinds must be among expert, gate, shared, got "
                              f"{list(self.kinds)}")


@dataclass(frozen=True)
class RetentionConfig:
    """What the run directory keeps, and the room it must leave.

    Attributes:
        keep_updates: keep every spooled update after its round's checkpoint is durable
            (default: delete them then; an interrupted round's updates are always kept).
        keep_checkpoints: the last K global checkpoints kept (>= 1).
        keep_best: also keep the checkpoint with the best held-out accuracy (or loss).
        min_free_mb: an update that would leave less free disk than this is refused
            (DiskFullError) and nothing already accepted is touched.
        max_run_dir_mb: a quota on the run directory's size (0: none).
    """

    keep_updates: bool = False
    keep_checkpoints: int = 2
    keep_best: bool = True
    min_free_mb: float = 512.0
    max_run_dir_mb: float = 0.0

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise ConfigError("retention.keep_checkpoints must be >= 1")
        if self.min_free_mb < 0 or self.max_run_dir_mb < 0:
            raise ConfigError("retention.min_free_mb and max_run_dir_mb must be >= 0")


@dataclass(frozen=True)
class StoreConfig:
    """Where the server's durable state lives (:mod:`server.store`).

    Attributes:
        url: "" (the default): SQLite, ``run.db`` in the run directory. ``postgresql://...``:
            PostgreSQL through psycopg 3 (a libpq URL; keep the password out of it, in
            ``PGPASSWORD`` or ``~/.pgpass``, since the resolved config is logged and kept).
        schema: the PostgreSQL schema of this run's tables ("": ``hfedmoe_{run_id}``, lower
            case, so runs sharing a database never mix).
        spool_dir: the directory of this run's spooled updates, checkpoints and partial
            aggregates ("": the run directory). Ingest workers on other hosts need it on a
            filesystem they all mount (NFS or similar: atomic rename and fsync required).
        connect_timeout_s: how long opening (or re-opening) the database may take.
        outage_limit_s: how long the coordinator keeps trying a write that opens or closes
            a round (the round row, the checkpoint) while the store fails, with a backoff of
            0.5 s doubling up to 10 s between tries (:mod:`server.store.outage`); past it the
            server stops with StoreUnavailableError (exit code 7), and a restart resumes the
            round. 0: keep trying for as long as it takes.
    """

    url: str = ""
    schema: str = ""
    spool_dir: str = ""
    connect_timeout_s: float = 10.0
    outage_limit_s: float = 600.0

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"store.url must be empty (SQLite in the run directory) or a "
                              f"postgresql:// URL, got {self.url.split('://')[0]!r}://...")
        if self.schema and not _SCHEMA.fullmatch(self.schema):
            raise ConfigError(f"store.schema must be 1-63 of a-z 0-9 _ (starting with a "
                              f"letter or _), got {self.schema!r}")
        if not 0 < self.connect_timeout_s <= 600:
            raise ConfigError("store.connect_timeout_s must be in (0, 600]")
        if not 0 <= self.outage_limit_s <= 7 * 86400:
            raise ConfigError("store.outage_limit_s must be in [0, 604800] (0: no limit)")

    def schema_for(self, run_id: str) -> str:
        """The PostgreSQL schema of run ``run_id``'s tables."""
        return self.schema or ("hfedmoe_" + re.sub(r"[^a-z0-9_]", "_", run_id.lower()))[:63]


_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and the kept config)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


@dataclass(frozen=True)
class IngestConfig:
    """Sharded ingestion: update validation and spooling in worker processes.

    Attributes:
        workers: ingest worker processes ``hfedmoe server`` starts and restarts (0: the
            coordinator ingests every update itself). Workers share the updates through an MQTT
            5 shared subscription (``$share/{group}/...``); an update of at most
            ``transport.chunk_size`` bytes travels as one message, so it lands on one worker.
            Larger (multi-chunk) updates are still ingested by the coordinator. Needs
            ``transport.protocol = "5"`` (:class:`ServerConfig` refuses 3.1.1).
        group: the shared-subscription group name.
        partial_timeout_s: at round close, how long the coordinator waits for the live
            workers' partial aggregates; what a missing one acknowledged is read back from the
            spool instead (an acknowledged update is never lost).
        spawn: ``hfedmoe server`` starts the ``workers`` itself (on its host, in its run
            directory). False: it runs sharded but starts none; start ``hfedmoe ingest
            --worker wN --work-dir DIR`` on other hosts (needs ``store.url`` and
            ``store.spool_dir``: docs/deployment.md).
    """

    workers: int = 0
    group: str = "hfedmoe-ingest"
    partial_timeout_s: float = 60.0
    spawn: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.workers <= 64:
            raise ConfigError("ingest.workers must be in [0, 64]")
        check_id(self.group, "ingest.group")
        if self.partial_timeout_s <= 0:
            raise ConfigError("ingest.partial_timeout_s must be > 0")


def ingestion_mode(cfg: ServerConfig) -> dict[str, Any]:
    """Who takes in the updates, as the server logs it at start and the dashboard shows it:
    ``mode`` ("coordinator" or "workers"), ``workers``, ``protocol`` and a one-line ``text``."""
    protocol, ingest = cfg.transport.protocol, cfg.ingest
    if ingest.workers == 0:
        why = "no shared subscriptions" if protocol != "5" else "ingest.workers = 0"
        return {"mode": "coordinator", "workers": 0, "protocol": protocol,
                "text": f"ingestion: coordinator only (transport.protocol {protocol}: {why})"}
    topic = Topics(cfg.run_id).shared_whole_updates(ingest.group)
    where = "" if ingest.spawn else ", started outside the server (ingest.spawn = false)"
    return {"mode": "workers", "workers": ingest.workers, "protocol": protocol,
            "text": f"ingestion: {ingest.workers} workers on {topic} (MQTT 5){where}; "
                    f"multi-chunk updates to the coordinator"}


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``hfedmoe server`` needs.

    The live dashboard (:mod:`server.dashboard`) listens on ``dashboard_host:dashboard_port``
    (port 0: off). On a non-loopback host it needs a token: ``dashboard_token``, or the
    environment variable ``HFEDMOE_DASHBOARD_TOKEN`` (so the secret stays out of config files);
    every request must then carry it (``?token=...`` or ``Authorization: Bearer ...``).
    Every request's ``Host`` must name the dashboard: an IP literal, ``localhost``, the bind
    address, or one of ``dashboard_hostnames`` (else 421), so a page on another DNS name that
    was rebound to this address cannot read it.
    """

    run_id: str = "hfedmoe"
    run_dir: str = "runs/hfedmoe"
    eval_batch_size: int = 32
    max_eval_examples: int = 0  # 0: the whole held-out split
    # causal LM: ROUGE-L of the greedy continuations of this many held-out prompts (taken
    # domain by domain in turn; 0: no generation), each at most eval_max_new_tokens tokens
    eval_generate_examples: int = 32
    eval_max_new_tokens: int = 32
    # evaluate after every eval_every-th round and after each of the last EVAL_TAIL rounds
    # (server.rounds.evaluates); 1: every round
    eval_every: int = 1
    prometheus_port: int = 0  # 0: no endpoint
    dashboard_port: int = 0  # 0: no dashboard
    dashboard_host: str = "127.0.0.1"
    dashboard_token: str = ""  # or $HFEDMOE_DASHBOARD_TOKEN; required off loopback
    # DNS names the dashboard is reached by besides its bind address, localhost and IP literals
    # (a request with any other Host header is refused: DNS rebinding)
    dashboard_hostnames: tuple[str, ...] = ()
    max_register_bytes: int = 1 << 20
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    # expert-level secure aggregation (off by default; docs/security.md)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        check_id(self.run_id, "run id")
        if self.secagg.enabled and self.ingest.workers:
            raise ConfigError("secagg.enabled needs ingest.workers = 0: the coordinator takes "
                              "every message of a secure round itself")
        if self.eval_batch_size < 1 or self.max_eval_examples < 0:
            raise ConfigError("eval_batch_size must be >= 1 and max_eval_examples >= 0")
        if self.eval_generate_examples < 0 or not 1 <= self.eval_max_new_tokens <= 4096:
            raise ConfigError(f"eval_generate_examples must be >= 0 (0: no ROUGE-L) and "
                              f"eval_max_new_tokens in [1, 4096], got "
                              f"{self.eval_generate_examples} and {self.eval_max_new_tokens}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1 (1: every round), got {self.eval_every}")
        object.__setattr__(self, "train", resolve_adapter(self.train, self.data.task))
        check_quantize_adapter(self.model, self.train)  # devices quantize, LoRA trains
        pol = self.policy
        if self.secagg.enabled and (self.aggregation.robust != "none" or pol.max_update_norm
                                    or pol.max_expert_norm or pol.class_caps
                                    or pol.default_class_cap):
            raise ConfigError("secagg.enabled hides each update from the server, and a secure "
                              "round's intake does not check them: aggregation.robust, "
                              "policy.max_update_norm, policy.max_expert_norm and the class "
                              "caps need plain rounds (set them to 'none' / 0 / {}, or turn "
                              "secure aggregation off)")
        if self.aggregation.robust != "none" and self.ingest.workers > 0:
            raise ConfigError(f"aggregation.robust = {self.aggregation.robust!r} buffers the "
                              f"round's updates in the coordinator, so it needs "
                              f"ingest.workers = 0 (partial aggregates are sums)")
        if self.ingest.workers > 0 and self.transport.protocol != "5":
            raise ConfigError(f"ingest.workers = {self.ingest.workers} needs transport.protocol "
                              f"= \"5\": the workers share the updates through an MQTT 5 shared "
                              f"subscription ($share/...), and transport.protocol is "
                              f"\"{self.transport.protocol}\". Set transport.protocol = \"5\" "
                              f"(Mosquitto >= 2, EMQX) or ingest.workers = 0 (the coordinator "
                              f"ingests every update; what an MQTT 3.1.1 broker such as NATS "
                              f"or RabbitMQ needs)")
        if not 0 <= self.dashboard_port <= 65535:
            raise ConfigError("dashboard_port must be in [0, 65535] (0: off)")
        if self.dashboard_port and not is_loopback(self.dashboard_host) \
                and not self.dashboard_secret:
            raise ConfigError(f"dashboard_host {self.dashboard_host!r} is not loopback: set "
                              f"dashboard_token (or the environment variable "
                              f"{DASHBOARD_TOKEN_ENV}) so that only holders of the token see "
                              f"the fleet")

    @property
    def dashboard_secret(self) -> str:
        """The dashboard's token: ``dashboard_token``, else ``$HFEDMOE_DASHBOARD_TOKEN``."""
        return self.dashboard_token or os.environ.get(DASHBOARD_TOKEN_ENV, "").strip()
