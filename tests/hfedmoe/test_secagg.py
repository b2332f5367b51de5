"""The secure-aggregation building blocks: quantization, masks, Shamir, messages, config."""

from __future__ import annotations

import numpy as np
import pytest

from hfedmoe.errors import ConfigError, SecAggError
from hfedmoe.secagg import (
    SecAggConfig,
    agree,
    combine_secret,
    dequantize,
    new_keypair,
    new_seed,
    open_sealed,
    quantize,
    recover_secret,
    seal,
    split_secret,
    unit_of,
)
from hfedmoe.secagg_messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    UnitDecl,
    UnmaskRequest,
    UnmaskResponse,
)

RK = bytes(range(16))


def test_quantize_round_trip_error_is_half_an_lsb() -> None:
    x = np.array([0.0, 1e-3, -2.5, 3.999999, -1e-9])

    back = dequantize(quantize(x, 32), 32)

    assert np.max(np.abs(back - x)) <= 2.0 ** -33


def test_sum_in_the_ring_wraps_back_to_signed_values() -> None:
    a, b = quantize(np.array([-3.0, 2.0]), 24), quantize(np.array([1.0, -5.0]), 24)

    assert dequantize(a + b, 24).tolist() == [-2.0, -3.0]


def test_pairwise_keys_agree_and_differ_by_label() -> None:
    u, v = new_keypair(), new_keypair()

    assert agree(u.private, v.public, RK, b"mask") == agree(v.private, u.public, RK, b"mask")
    assert agree(u.private, v.public, RK, b"mask") != agree(u.private, v.public, RK, b"enc")


def test_bad_public_key_is_a_typed_error() -> None:
    with pytest.raises(SecAggError):
        agree(new_keypair().private, b"\x01" * 31, RK, b"mask")
    with pytest.raises(SecAggError):  # the all-zero point: a low-order key
        agree(new_keypair().private, bytes(32), RK, b"mask")


def test_sealed_bundle_detects_tampering_and_wrong_aad() -> None:
    key = new_seed()
    blob = seal(key, b"share", b"aad")

    assert open_sealed(key, blob, b"aad") == b"share"
    with pytest.raises(SecAggError):
        open_sealed(key, blob[:-1] + bytes([blob[-1] ^ 1]), b"aad")
    with pytest.raises(SecAggError):
        open_sealed(key, blob, b"other")


def test_shamir_any_t_shares_rebuild_and_a_wrong_share_is_outvoted() -> None:
    secret = new_seed()
    shares = split_secret(secret, 3, 5)

    assert combine_secret({i: shares[i] for i in (2, 4, 5)}) == secret
    assert combine_secret({i: shares[i] for i in (1, 2)}) != secret
    shares[1] = bytes(32)  # a malformed share from one holder
    assert recover_secret(shares, 3, lambda s: s == secret) == secret
    with pytest.raises(SecAggError):
        recover_secret({1: shares[1], 2: shares[2]}, 3, lambda s: s == secret)


def test_units_group_an_experts_keys() -> None:
    assert unit_of("layers.1.experts.7.w1") == unit_of("layers.1.experts.7.w2") == "e:1:7"
    assert unit_of("layers.0.gate.weight") == "k:layers.0.gate.weight"


def test_config_refuses_a_ring_that_could_wrap_and_a_minority_threshold() -> None:
    with pytest.raises(ConfigError, match="bits"):
        SecAggConfig(frac_bits=40)
    with pytest.raises(ConfigError, match="dropout_fraction"):
        SecAggConfig(dropout_fraction=0.5)
    with pytest.raises(ConfigError, match="min_contributors"):
        SecAggConfig(min_contributors=1)
    assert SecAggConfig().threshold(9) == 7


def _advert() -> AdvertiseKeys:
    keys = ("layers.0.experts.1.w1", "layers.0.experts.1.w2")
    return AdvertiseKeys(RK, "dev1", new_keypair().public, new_keypair().public,
                         (UnitDecl("e:0:1", keys),))


def test_messages_round_trip() -> None:
    ad = _advert()
    masked = MaskedInput(RK, "dev1", (("e:0:1", np.arange(5, dtype=np.uint64)),))
    req = UnmaskRequest(RK, ("a", "b"), ("c",), ("e:0:1",))
    resp = UnmaskResponse(RK, "a", (("c", new_seed()),), (("b", "e:0:1", new_seed()),))

    assert AdvertiseKeys.from_bytes(ad.to_bytes()) == ad
    back = MaskedInput.from_bytes(masked.to_bytes())
    assert back.vectors[0][0] == "e:0:1" and back.vectors[0][1].tolist() == [0, 1, 2, 3, 4]
    assert UnmaskRequest.from_bytes(req.to_bytes()) == req
    assert UnmaskResponse.from_bytes(resp.to_bytes()) == resp


@pytest.mark.parametrize("mangle", [
    lambda b: b[:20],  # truncated
    lambda b: b"XXXX" + b[4:],  # not ours
    lambda b: b.replace(b'"enc":"', b'"enc":"zz'),  # not hex
    lambda b: b.replace(b"e:0:1", b"e:0:2", 1),  # keys outside their unit
    lambda b: b[:4] + bytes([6]) + b[5:],  # another message kind
    lambda b: "text",
])
def test_malformed_advertisement_is_a_typed_error(mangle) -> None:
    with pytest.raises(SecAggError):
        AdvertiseKeys.from_bytes(mangle(_advert().to_bytes()))


def test_masked_input_with_a_payload_of_the_wrong_length_is_refused() -> None:
    data = MaskedInput(RK, "dev1", (("e:0:1", np.arange(5, dtype=np.uint64)),)).to_bytes()

    with pytest.raises(SecAggError, match="payload"):
        MaskedInput.from_bytes(data[:-8])


def test_roster_members_must_be_in_the_roster() -> None:
    roster = Roster(RK, (), (UnitDecl("e:0:1", ("layers.0.experts.1.w1",), ("ghost",)),))

    with pytest.raises(SecAggError, match="not in the roster"):
        Roster.from_bytes(roster.to_bytes())
