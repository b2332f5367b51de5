"""Expert-level secure aggregation (SecAgg, Bonawitz et al. 2017, every client sharing with every
other as in the original, not SecAgg+'s sparse graph): the building blocks, pure (no I/O, no clock).

The server learns per *unit* (one expert, or one gate or shared parameter) only the sum of the
contributors' weighted, quantized deltas and the sum of their weights, and only when at least
``k = min_contributors`` clients contributed the unit. What each client uploads for a unit ``g``
in the ring Z_(2^64)::

    y_u(g) = q(w_u(g) * clip(x_u(g))) || q(w_u(g))                       (payload)
             + PRG(b_u(g), g)                                            (self mask)
             + sum_{v in G(g), v != u} sign(u, v) * PRG(s_uv, g)         (pairwise masks)

``G(g)`` is g's contributor group (the clients that declared g and are still in the round);
``s_uv`` comes from X25519 key agreement between u and v, so the pairwise masks cancel in the
sum over G(g). The self-mask seed ``b_u(g)`` is one per unit: revealing it for unit g tells the
server nothing about any other unit, which is what lets the server unmask exactly the units
that meet the threshold and no other. Dropout recovery: every client Shamir-shares its mask
private key and its seeds ``b_u(g)`` among the other clients (threshold t of the n - 1
holders); for a client that dropped before its masked input arrived the survivors reveal
shares of its mask key (so its pairwise masks can be removed), for a survivor shares of its
seeds of the units being revealed, never both for one client.

Quantization: ``q(v) = round(v * 2^frac_bits)`` as a two's-complement 64-bit integer. Deltas are
clipped to ``[-clip, clip]`` element-wise before weighting, weights must be in
``[0, max_weight]``; the config refuses settings under which a sum of ``max_clients`` such
values could wrap. The revealed mean ``sum q(w x) / sum q(w)`` differs from the float mean by at
most about ``n * 2^-(frac_bits+1) * (1 + |mean|) / sum w`` per element (n contributors).

Shamir secret sharing is pycryptodome's (:class:`Crypto.Protocol.SecretSharing.Shamir`, GF(2^128),
16-byte secrets): a 32-byte secret is shared as two halves with the same share indices.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfedmoe.errors import SecAggError
from hfedmoe.names import parse_key
from hfedmoe.secagg_config import SecAggConfig

KEY_BYTES = 32  # X25519 keys, seeds, AES-256 keys
ROUND_KEY_BYTES = 16  # the server's fresh per-round nonce
NONCE_BYTES = 12  # AES-GCM
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw

__all__ = ["SecAggConfig"]  # re-exported: the settings live in hfedmoe.secagg_config


def unit_of(key: str) -> str:
    """The unit a canonical key belongs to: ``"e:{layer}:{expert}"`` for an expert's keys,
    ``"k:{key}"`` for a gate or shared key (raises ModelError for a non-canonical key)."""
    parsed = parse_key(key)
    if parsed.kind == "expert":
        return f"e:{parsed.layer_idx}:{parsed.expert_idx}"
    return f"k:{key}"


# --- quantization -------------------------------------------------------------------------------


def quantize(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """``round(values * 2^frac_bits)`` as uint64 (two's complement of the int64)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(1 << frac_bits))
    return scaled.astype(np.int64).view(np.uint64)


def dequantize(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """Inverse of :func:`quantize` on a (summed) uint64 vector: float64."""
    return np.asarray(values, dtype=np.uint64).view(np.int64).astype(np.float64) / float(
        1 << frac_bits)


# --- keys, agreement, encryption ----------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class KeyPair:
    """An X25519 key pair as raw bytes (32 each); ``repr`` hides the private key."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def new_keypair() -> KeyPair:
    """A fresh X25519 key pair from the OS's randomness."""
    sk = X25519PrivateKey.generate()
    return KeyPair(sk.private_bytes(_RAW, _RAW_PRIV, serialization.NoEncryption()),
                   sk.public_key().public_bytes(_RAW, _RAW_PUB))


def public_of(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    try:
        sk = X25519PrivateKey.from_private_bytes(private)
    except ValueError as exc:
        raise SecAggError(f"not an X25519 private key: {exc}") from exc
    return sk.public_key().public_bytes(_RAW, _RAW_PUB)


def agree(private: bytes, public: bytes, round_key: bytes, label: bytes) -> bytes:
    """A 32-byte key from X25519(private, public), bound to the round and a purpose label.

    Raises:
        SecAggError: a public key of the wrong length or a low-order point.
    """
    if len(public) != KEY_BYTES:
        raise SecAggError(f"public key must be {KEY_BYTES} bytes, got {len(public)}")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise SecAggError(f"key agreement failed: {exc}") from exc
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=round_key,
                info=b"hfedmoe/secagg/" + label).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext+tag`` with a random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; raises :class:`SecAggError` on any tampering."""
    if len(blob) < NONCE_BYTES + 16:
        raise SecAggError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SecAggError("ciphertext fails authentication") from exc


def new_seed() -> bytes:
    """A 32-byte mask seed from the OS's randomness."""
    return os.urandom(KEY_BYTES)


def seed_commitment(seed: bytes, round_key: bytes, unit: str) -> bytes:
    """SHA-256 commitment to a self-mask seed, so a reconstructed seed can be checked."""
    return hashlib.sha256(b"hfedmoe/secagg/commit" + round_key + unit.encode() + seed).digest()


def prg(seed: bytes, label: bytes, n: int) -> np.ndarray:
    """``n`` uint64 words of AES-256-CTR keystream under ``SHA-256(seed || label)``."""
    key = hashlib.sha256(b"hfedmoe/secagg/prg" + seed + label).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)) + enc.finalize(), dtype="<u8").astype(np.uint64)


# --- Shamir sharing of 32-byte secrets ----------------------------------------------------------


def split_secret(secret: bytes, t: int, n: int) -> dict[int, bytes]:
    """Shares ``index (1..n) -> 32 bytes`` of a 32-byte secret, any ``t`` of which rebuild it."""
    if len(secret) != KEY_BYTES or not 1 <= t <= n:
        raise SecAggError(f"cannot share {len(secret)} bytes {t}-of-{n}")
    lo = Shamir.split(t, n, secret[:16])
    hi = Shamir.split(t, n, secret[16:])
    return {i: a + b for (i, a), (j, b) in zip(lo, hi, strict=True) if i == j}


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """The secret from shares ``index -> 32 bytes`` (exactly the threshold's number of them)."""
    if any(len(s) != KEY_BYTES for s in shares.values()) or not shares:
        raise SecAggError("a share must be 32 bytes")
    items = sorted(shares.items())
    try:
        lo = Shamir.combine([(i, s[:16]) for i, s in items])
        hi = Shamir.combine([(i, s[16:]) for i, s in items])
    except ValueError as exc:
        raise SecAggError(f"shares do not combine: {exc}") from exc
    return lo + hi


def recover_secret(shares: dict[int, bytes], t: int, check, max_tries: int = 256) -> bytes:
    """Rebuild a secret from at least ``t`` shares, the first subset whose result passes
    ``check(secret) -> bool`` (so a few wrong shares are outvoted).

    Raises:
        SecAggError: fewer than t shares, or no subset of at most ``max_tries`` passes.
    """
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} shares, need {t}")
    for tries, subset in enumerate(combinations(sorted(shares), t)):
        if tries >= max_tries:
            break
        secret = combine_secret({i: shares[i] for i in subset})
        if check(secret):
            return secret
    raise SecAggError("no subset of the shares rebuilds a secret that checks")
