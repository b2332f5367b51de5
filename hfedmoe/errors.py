"""The kit's one exception tree.

Every error the kit raises on purpose derives from :class:`HFedMoEError`, so a CLI or a
server loop can catch the whole family in one place and map it to an exit code or an
error message on the wire::

    HFedMoEError
    ├── ConfigError              bad or unknown configuration keys/values
    │   └── ReservedIdError      a device id that is a reserved account name (``server``)
    ├── ModelError               unsupported model, bad expert/layer index, bad parameter name
    ├── DataError                unreadable dataset file, missing column, bad label
    ├── AlgorithmError           inconsistent inputs to the paper's equations (shapes, budgets)
    ├── WireError                a payload that fails validation (never unpickled)
    │   ├── SchemaError          wrong schema version / missing or malformed header fields
    │   │   └── ProtocolError    a control message (hfedmoe.protocol) that fails validation
    │   ├── PayloadTooLarge      over the configured size limit
    │   ├── UnknownKeyError      a tensor key the model does not have
    │   ├── ShapeError           shape or dtype does not match the model
    │   ├── NonFiniteError       NaN or Inf in a tensor
    │   ├── MismatchError        wrong run/round/client/base-model hash
    │   ├── BudgetExceededError  more experts than the device's registered budget
    │   ├── PolicyError         self-reported weights outside the server's policy
    │   └── SecAggError          a secure-aggregation message that fails validation or
    │       │                    arrives out of phase (hfedmoe.secagg_messages)
    │       └── ReplayError      a round key, public key or message seen before
    ├── TransportError           broker unreachable, transfer failed or timed out
    │   └── TransferError        chunk manifest/hash verification failed
    ├── DeviceError              probing or budgeting the device failed
    ├── PrivacyRefused           a device declines a round its privacy settings forbid
    ├── StoreError               durable state is unreadable or inconsistent
    │   └── StoreUnavailableError  the store kept failing past ``store.outage_limit_s``
    └── ExportError              ExecuTorch/ONNX export or parity failure
"""

from __future__ import annotations


class HFedMoEError(Exception):
    """Base class of every error raised on purpose by the kit."""

    exit_code = 1


class ConfigError(HFedMoEError, ValueError):
    """A configuration value or key is invalid."""

    exit_code = 2


class ReservedIdError(ConfigError):
    """A device id is a reserved account name (the coordinator's ``server`` account)."""


class ModelError(HFedMoEError):
    """A model is unsupported, or an expert/layer/parameter reference is invalid."""

    exit_code = 3


class DataError(HFedMoEError):
    """A dataset file cannot be used; the message names the file and row."""

    exit_code = 4


class AlgorithmError(HFedMoEError, ValueError):
    """Inputs to the method's equations are inconsistent (shapes, budgets, empty sets)."""


class WireError(HFedMoEError):
    """A payload from the network failed validation."""

    exit_code = 5


class SchemaError(WireError):
    """Schema version unknown, or a header field missing/malformed."""


class ProtocolError(SchemaError):
    """A control message (:mod:`hfedmoe.protocol`) is not JSON, lacks a field, has a field of
    the wrong type or out of range, or is too large."""


class PayloadTooLarge(WireError):
    """A payload exceeds the configured size limit."""


class UnknownKeyError(WireError):
    """A tensor key does not exist in the model."""


class ShapeError(WireError):
    """A tensor's shape or dtype does not match the model."""


class NonFiniteError(WireError):
    """A tensor holds NaN or Inf."""


class MismatchError(WireError):
    """A header names the wrong run, round, client or base model."""


class TransportError(HFedMoEError):
    """The broker cannot be reached or a transfer failed."""

    exit_code = 6


class TransferError(TransportError):
    """A chunked transfer failed verification or timed out."""


class DeviceError(HFedMoEError):
    """Probing the device or deriving its budget failed."""


class DiskFullError(HFedMoEError):
    """The server's disk (or the run directory's quota) has no room for another update."""


class StoreError(HFedMoEError):
    """Durable state is unreadable or inconsistent."""


class StoreUnavailableError(StoreError):
    """The store (a database gone away, a failing disk) kept failing a write the coordinator
    cannot do without (opening or closing a round) for longer than ``store.outage_limit_s``;
    the server stops, and a restart resumes from what is stored."""

    exit_code = 7


class ExportError(HFedMoEError):
    """ExecuTorch/ONNX export failed or did not match PyTorch."""


class BudgetExceededError(WireError):
    """An update carries more experts than the sending device's registered C_budget."""


class PolicyError(WireError):
    """An update's self-reported weights (examples, usage) are outside the server's policy."""


class SecAggError(WireError):
    """A secure-aggregation message (:mod:`hfedmoe.secagg_messages`) is malformed, names the
    wrong round, comes from a client outside the phase's set, or cannot be used (a share that
    does not reconstruct, a masked vector of the wrong length, a client that sends both a
    masked and a plain update)."""


class ReplayError(SecAggError):
    """A secure-aggregation message repeats what was seen before: an old round key, a public
    key already used, or a second message of the same phase from one client."""


class PrivacyRefused(HFedMoEError):
    """A device declines a round: taking part would pass its privacy budget or could not be
    made as private as its own settings demand. ``reason`` is a short code
    (``"epsilon-budget"``, ``"no-clip-bound"``) the device also puts on its status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
