"""Benchmark: raw paho vs the kit's chunked transfer on one broker, and wire encode/decode speed.

Question: how much does the kit's transfer protocol (manifest, per-chunk and whole-blob sha256,
reassembly, queue pumping) cost next to a bare paho QoS 1 publish of the same payload? Target:
the kit at >= 50% of raw paho throughput. Also: MB/s of ``hfedmoe.wire`` encode/decode.

    python -m benchmarks.transport [--quick] [--size-mb 50] [--broker mosquitto|amqtt|URL]
                                   [--out results.jsonl]

Prints a table and writes JSON lines (one per measurement, each with the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def environment(broker: str) -> dict:
    import paho.mqtt
    import safetensors
    import torch
    import zstandard

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
    except OSError:
        sha = ""
    try:
        from importlib.metadata import version
        amqtt_version = version("amqtt")
    except Exception:
        amqtt_version = ""
    return {"git_sha": sha, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads":
            torch.get_num_threads(), "paho_mqtt": paho.mqtt.__version__,
            "safetensors": safetensors.__version__, "zstandard": zstandard.__version__,
            "amqtt": amqtt_version, "broker": broker}


# ---------------------------------------------------------------------------------------------
# Brokers


class _Mosquitto:
    def __init__(self) -> None:
        from hfedmoe.transport.broker import free_port

        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hfedmoe-bench-")
        conf = Path(self.dir) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nuser root\n")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_broker(spec: str) -> tuple[str, Callable[[], None]]:
    if spec == "mosquitto":
        m = _Mosquitto()
        return m.url, m.stop
    if spec == "amqtt":
        from hfedmoe.transport.broker import EmbeddedBroker

        b = EmbeddedBroker().start()
        return b.url, b.stop
    return spec, lambda: None


# ---------------------------------------------------------------------------------------------
# Measurements


def raw_paho(url: str, payload: bytes, n_messages: int = 1) -> float:
    """Seconds from the first publish until the subscriber holds every message (QoS 1)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from hfedmoe.transport.config import parse_url

    addr = parse_url(url)
    done, count = threading.Event(), [0]

    def on_message(client, userdata, msg) -> None:  # noqa: ANN001
        count[0] += 1
        if count[0] == n_messages:
            done.set()

    tag = uuid.uuid4().hex[:6]
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-sub-{tag}")
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{tag}")
    sub.on_message = on_message
    for c in (sub, pub):
        c.max_inflight_messages_set(64)
        c.connect(addr.host, addr.port)
        c.loop_start()
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(f"bench/{tag}/#", qos=1)
    subscribed.wait(5)
    size = len(payload) // n_messages
    t0 = time.perf_counter()
    for i in range(n_messages):
        pub.publish(f"bench/{tag}/{i}", payload[i * size:(i + 1) * size], qos=1)
    ok = done.wait(120)
    dt = time.perf_counter() - t0
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    if not ok:
        raise RuntimeError("raw paho transfer did not complete")
    return dt


def kit_transfer(url: str, payload: bytes, chunk_size: int) -> float:
    """Seconds from ``send_blob`` until ``BlobReceiver`` hands over the verified blob."""
    from hfedmoe.transport.chunks import BlobReceiver, send_blob
    from hfedmoe.transport.config import TransportConfig
    from hfedmoe.transport.mqtt import MqttTransport

    tag = uuid.uuid4().hex[:6]
    cfg = TransportConfig(url=url)
    rx, tx = MqttTransport(cfg, f"kit-rx-{tag}"), MqttTransport(cfg, f"kit-tx-{tag}")
    got: dict[str, bytes] = {}
    try:
        recv = BlobReceiver(rx, f"bench/{tag}/#", lambda p, b: got.setdefault(p, b))
        rx.wait_subscribed(5)
        t0 = time.perf_counter()
        sender = send_blob(tx, f"bench/{tag}/blob", payload, chunk_size=chunk_size)
        ok = rx.run_until(lambda: bool(got), 120, tick=lambda: (recv.poll(), tx.pump()),
                          step=0.01)
        dt = time.perf_counter() - t0
        sender.close()
    finally:
        rx.close()
        tx.close()
    if not ok or got[f"bench/{tag}/blob"] != payload:
        raise RuntimeError("kit transfer did not complete intact")
    return dt


def wire_speed(size_mb: float, dtype: str, compress: bool, repeats: int) -> dict:
    import torch

    from hfedmoe import wire
    from hfedmoe.names import ExpertId, expert_key
    from hfedmoe.update import SparseUpdate

    per_tensor = 1 << 20  # floats per expert tensor (4 MB fp32)
    n = max(1, int(size_mb * (1 << 20) / (4 * per_tensor)))
    deltas = {expert_key(i // 8, i % 8, "w1"): torch.randn(1024, 1024) * 1e-3 for i in range(n)}
    experts = frozenset(ExpertId(i // 8, i % 8) for i in range(n))
    update = SparseUpdate("bench", 0, "dev", 100, deltas, usage={e: 0.5 for e in experts},
                          importance={e: 0.3 for e in experts}, routed=experts, updated=experts,
                          base_model_hash="h")
    spec = wire.spec_from_state(deltas)
    cfg = wire.WireConfig(dtype=dtype, compress=compress)
    mb = n * per_tensor * 4 / 1e6  # fp32 payload MB, the model-side size
    enc, dec = [], []
    blob = wire.encode(update, 0.01, cfg)
    for _ in range(repeats):
        t0 = time.perf_counter()
        blob = wire.encode(update, 0.01, cfg)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        wire.decode(blob, spec, cfg)
        dec.append(time.perf_counter() - t0)
    return {"fp32_mb": round(mb, 1), "wire_mb": round(len(blob) / 1e6, 2),
            "encode_mb_s": round(mb / statistics.median(enc), 1),
            "decode_mb_s": round(mb / statistics.median(dec), 1),
            "encode_spread_s": [round(min(enc), 4), round(max(enc), 4)],
            "decode_spread_s": [round(min(dec), 4), round(max(dec), 4)]}


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller payload, fewer repeats")
    p.add_argument("--size-mb", type=float, default=None, help="transfer size (default 50)")
    p.add_argument("--chunk-kib", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--broker", default="mosquitto", help="mosquitto | amqtt | mqtt://host:port")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    size_mb = args.size_mb or (20.0 if args.quick else 50.0)
    repeats = args.repeats or (2 if args.quick else 5)
    if args.broker == "mosquitto" and not Path(MOSQUITTO).exists():
        print("mosquitto not installed; use --broker amqtt", file=sys.stderr)
        return 2
    env = environment(args.broker)
    payload = os.urandom(int(size_mb * 1e6))
    rows: list[dict] = []
    url, stop = start_broker(args.broker)
    try:
        runs = {"raw_paho_single": lambda: raw_paho(url, payload),
                "raw_paho_1mib_msgs": lambda: raw_paho(url, payload, max(1, len(payload) >> 20)),
                "kit_chunked": lambda: kit_transfer(url, payload, args.chunk_kib << 10)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():  # interleaved, so drift hits all alike
                times[name].append(fn())
    finally:
        stop()
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"bench": "transfer", "name": name, "size_mb": size_mb,
                     "median_s": round(med, 4), "min_s": round(min(ts), 4),
                     "max_s": round(max(ts), 4), "mb_s": round(size_mb / med, 1)})
    raw = next(r for r in rows if r["name"] == "raw_paho_single")["mb_s"]
    for r in rows:
        r["ratio_vs_raw_single"] = round(r["mb_s"] / raw, 2)
    for dtype in ("float32", "bfloat16"):
        for compress in (False, True):
            rows.append({"bench": "wire", "dtype": dtype, "compress": compress,
                         **wire_speed(size_mb, dtype, compress, repeats)})
    print(f"broker={args.broker} payload={size_mb} MB repeats={repeats} cpus={os.cpu_count()}")
    for r in rows:
        if r["bench"] == "transfer":
            print(f"  {r['name']:<20} {r['mb_s']:>8.1f} MB/s  median {r['median_s']:.3f}s "
                  f"[{r['min_s']:.3f}, {r['max_s']:.3f}]  x{r['ratio_vs_raw_single']} of raw")
        else:
            print(f"  wire {r['dtype']:<8} zstd={r['compress']!s:<5} wire {r['wire_mb']:>7} MB  "
                  f"encode {r['encode_mb_s']:>7.1f} MB/s  decode {r['decode_mb_s']:>7.1f} MB/s")
    if args.out:
        with open(args.out, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**r, "env": {**env, "loadavg": list(os.getloadavg())}})
                         + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
