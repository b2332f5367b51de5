"""A private PKI for one deployment: a CA, the broker's server certificate, and client certs.

Keys are EC P-256. The broker certificate carries SANs ``localhost``/``127.0.0.1``/``::1`` plus
any given hosts; every client (each device, and the ``server`` coordinator account) gets a
certificate whose CN is its account name. The broker takes the account from that CN
(``use_identity_as_username``), so a certificate *is* the identity: the ``server`` certificate is
the only one whose CN is the server account, and a device id that is a reserved account name
is refused (:class:`~hfedmoe.errors.ReservedIdError`). Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hfedmoe.errors import ConfigError
from hfedmoe.transport.topics import SERVER_ACCOUNT, check_device_id

__all__ = ["SERVER_ACCOUNT", "CertBundle", "KeyPair", "cert_identity", "make_certs"]


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CertBundle:
    """Paths of everything :func:`make_certs` wrote."""

    out_dir: Path
    ca: KeyPair
    broker: KeyPair
    clients: dict[str, KeyPair] = field(default_factory=dict)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hfedmoe"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(pair_dir: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> KeyPair:
    pair_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = pair_dir / f"{stem}.crt", pair_dir / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return KeyPair(cert_path, key_path)


def _issue(subject: str, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
           days: int, *, ca: bool = False, sans: list[x509.GeneralName] | None = None,
           usage: list[x509.ObjectIdentifier] | None = None,
           key: ec.EllipticCurvePrivateKey | None = None,
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return b.sign(issuer_key, hashes.SHA256()), key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(out_dir: str | Path, devices: Iterable[str], hosts: Iterable[str] = (),
               days: int = 825) -> CertBundle:
    """Create ``ca.crt/key``, ``broker.crt/key`` and ``clients/{name}.crt/key`` in ``out_dir``.

    Args:
        devices: device ids; each gets a client certificate (CN = id).
        hosts: extra DNS names / IPs for the broker certificate's SAN.
        days: validity of every certificate.

    Raises:
        ReservedIdError: a device id is a reserved account name (``server``); nothing is
            written.
        ConfigError: a device id is invalid or given twice.
    """
    out = Path(out_dir)
    names = [check_device_id(d) for d in devices]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"device ids given twice: {twice}")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, _ = _issue("hfedmoe CA", _name("hfedmoe CA"), ca_key, days, ca=True, key=ca_key)
    ca = _write(out, "ca", ca_cert, ca_key)
    sans = [_san(h) for h in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts])]
    broker_cert, broker_key = _issue("hfedmoe broker", ca_cert.subject, ca_key, days, sans=sans,
                                     usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    broker = _write(out, "broker", broker_cert, broker_key)
    clients = {}
    for name in [SERVER_ACCOUNT, *names]:
        cert, key = _issue(name, ca_cert.subject, ca_key, days,
                           usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
        clients[name] = _write(out / "clients", name, cert, key)
    return CertBundle(out, ca, broker, clients)



def cert_identity(cert_path: str | Path) -> str:
    """The account a client certificate logs in as: its subject CN."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise ConfigError(f"{cert_path}: the certificate has no CN (no broker identity)")
    value = cns[0].value
    return value if isinstance(value, str) else value.decode()
