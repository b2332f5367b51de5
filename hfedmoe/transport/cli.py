"""``hfedmoe certs OUT_DIR --devices a,b``: a private CA, broker and client certs, and a
Mosquitto config for them: the client certificate's CN is the account, an ACL limits each
device to its own topics. Start the broker with ``mosquitto -c OUT_DIR/mosquitto/mosquitto.conf``
(as root it switches to the account of the config's ``user`` line). Device ids that are reserved
account names (``server``) are refused."""

from __future__ import annotations

import argparse
from pathlib import Path


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="create TLS certificates and a Mosquitto config",
                       description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--devices", type=_split, required=True, help="comma-separated device ids")
    p.add_argument("--hosts", type=_split, default=[],
                   help="extra broker host names / IPs for the certificate")
    p.add_argument("--days", type=int, default=825)
    p.add_argument("--port", type=int, default=8883, help="TLS listener port")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--plain-port", type=int, default=None,
                   help="also open a plain-TCP listener (no certificates: there the username "
                        "and a generated password are the identity; ACL still enforced)")
    p.add_argument("--persistence-dir", default=None)
    p.add_argument("--broker-user", default=None,
                   help="account mosquitto switches to when started as root (default: you, "
                        "or 'mosquitto' when run as root and it can reach the files, else "
                        "root)")
    p.add_argument("--pin-client-ids", action="store_true",
                   help="the broker replaces each client id with the account name "
                        "(use_username_as_clientid): no device can take over another's "
                        "session; one connection per account (no sharded-ingestion workers)")
    p.add_argument("--no-broker-config", action="store_true",
                   help="certificates only, no mosquitto.conf/passwd/acl")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hfedmoe.transport.broker_config import write_mosquitto_config
    from hfedmoe.transport.certs import make_certs

    bundle = make_certs(args.out_dir, args.devices, args.hosts, args.days)
    print(f"CA            {bundle.ca.cert}")
    print(f"broker        {bundle.broker.cert}")
    for name, pair in bundle.clients.items():
        print(f"client {name:<8} {pair.cert}")
    if not args.no_broker_config:
        files = write_mosquitto_config(args.out_dir / "mosquitto", args.devices, certs=bundle,
                                       tls_port=args.port, plain_port=args.plain_port,
                                       bind=args.bind, persistence_dir=args.persistence_dir,
                                       run_as_user=args.broker_user,
                                       pin_client_ids=args.pin_client_ids)
        print(f"mosquitto     {files.conf}")
        print(f"start with    mosquitto -c {files.conf}"
              + (f"  (as root it runs as '{files.user}')" if files.user else ""))
        if files.passwd is not None:
            print(f"passwords     {files.conf.parent / 'credentials.txt'} (plain listener only)")
        for note in files.notes:
            print(f"note: {note}")
    return 0
