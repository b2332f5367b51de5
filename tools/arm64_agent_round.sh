#!/usr/bin/env bash
# One federated round of the device agent on an EMULATED aarch64 Linux (QEMU user mode).
#
# What it does, from scratch or reusing what an earlier run left under $ARM64_ROOT:
#   1. apt: qemu-user-static, binfmt-support, debootstrap, mosquitto (only those missing).
#   2. binfmt_misc: mounted if needed, qemu-aarch64 enabled (flag F, so a chroot needs no qemu
#      binary inside it).
#   3. a Debian bookworm arm64 root (debootstrap, minbase + python3.11) in $ARM64_ROOT/rootfs.
#   4. the kit's device install plus the `assets` extra (MiniLM weights, chatterbot corpus),
#      resolved and downloaded on the host by uv for aarch64-manylinux_2_28 / CPython 3.11 and
#      installed into /opt/venv inside the root. torch is pinned to $ARM64_TORCH (default
#      2.9.1: PyPI's aarch64 build of it is CPU-only; newer aarch64 wheels on PyPI are CUDA-13
#      builds that pull several GB of nvidia-* wheels). Every other version comes from
#      constraints.txt. The kit's source itself is not installed: this checkout is bind-mounted
#      read-only at the same path inside the root and put on PYTHONPATH.
#   5. inside the emulation: `uname -m`, platform.machine(), a torch matmul,
#      `hfedmoe profile --model none`.
#   6. a private Mosquitto on a free loopback port and `hfedmoe server` on the host (x86-64,
#      $HOST_HFEDMOE, default .venv/bin/hfedmoe; 1 round, min_devices 1, batch 2 x seq 16,
#      2 steps, MiniLM-MoE 2 experts top-1 as in tests/integration), then `hfedmoe agent`
#      (max_rounds 1) emulated; passes only if the server's metrics.jsonl records the round
#      with the emulated device accepted, the agent's agent.jsonl says "accepted" and both exit 0.
#
# QEMU_CPU defaults to neoverse-n1. QEMU's default user-mode CPU ("max") advertises SVE and
# oneDNN then runs SVE kernels, which QEMU 7.2 emulates about 20x slower (fp32 256x256 matmul:
# 0.011 GFLOP/s with "max", 0.22 GFLOP/s with neoverse-n1 or cortex-a72).
#
# Measured on the 2-core x86-64 dev VM (Debian 12, QEMU 7.2, QEMU_CPU=neoverse-n1,
# torch 2.9.1+cpu), wall time per phase as the script prints it at the end:
#                                          from nothing   root + packages cached
#   apt packages (qemu-user-static...)      ~10 s (*)      0 s
#   debootstrap arm64 root                  165 s          0 s
#   aarch64 python packages (uv, ~940 MB)   5 s            0.6 s
#   uname / platform.machine() (emulated)   0.8 s          0.5 s
#   import torch + 2x2 matmul (emulated)    19 s           10 s
#   hfedmoe profile --model none (emul.)    11 s           11 s
#   agent round, start to exit (emulated)   692 s          690 s
#   whole script                            895 s          714 s
# (*) measured by hand before the script existed: apt-get install took 9.7 s.
# Inside the agent's 690 s (default upcycle, "moefy"): import torch 10 s, transformers 5 s,
# probe_device's 1024x1024 matmul probe 27 s, chatterbot data 2 s, building MiniLM-MoE 550 s
# (MoEfication: a calibration forward over 256 texts, balanced k-means and a router fit per
# layer), step-cost measurement 83 s, the round itself 10 s (2 steps of batch 2 x seq 16,
# 28 MB update up, 34 KB of model shards down). ARM64_UPCYCLE=copy builds the model in ~3 s
# instead (server and agent both get it): agent round 204 s (59 s setup, 122 s step-cost
# measurement of the full-size copied experts, 16 s round, 57 MB up), whole script 229 s cached.
# Emulated fp32 matmul runs at ~0.2-0.3 GFLOP/s, i.e. a few hundred times slower than native.

# Usage:   sudo tools/arm64_agent_round.sh          (root: apt, mount, chroot)
# Env:     ARM64_ROOT (default /tmp/arm64)  ARM64_TORCH (2.9.1)  QEMU_CPU (neoverse-n1)
#          HOST_HFEDMOE (<repo>/.venv/bin/hfedmoe)  AGENT_TIMEOUT_S (3600)
#          DEBIAN_MIRROR (http://deb.debian.org/debian)  UV (a uv binary; else found/installed)
#          ARM64_UPCYCLE ("" = the kit's default, moefy; or copy / split: model.upcycle of
#          both server and agent, to skip the slow MoEfication under emulation)
# Exit:    0 when the server accepted the emulated device's update; non-zero otherwise.
# Leaves:  $ARM64_ROOT/rootfs and $ARM64_ROOT/uv-cache (~1.4 GB together: uv hard-links), logs in $ARM64_ROOT/run-<time>/.
# Cleans:  its mounts under the root, its server and Mosquitto (by PID), on any exit.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARM64_ROOT=${ARM64_ROOT:-/tmp/arm64}
ARM64_TORCH=${ARM64_TORCH:-2.9.1}
QEMU_CPU=${QEMU_CPU:-neoverse-n1}
HOST_HFEDMOE=${HOST_HFEDMOE:-$REPO/.venv/bin/hfedmoe}
AGENT_TIMEOUT_S=${AGENT_TIMEOUT_S:-3600}
ARM64_UPCYCLE=${ARM64_UPCYCLE:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOTFS=$ARM64_ROOT/rootfs
RUN=$ARM64_ROOT/run-$(date +%Y%m%d-%H%M%S)
DEVICE_ID=arm64-emu
RUN_ID=arm64round

log() { printf '[arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (apt-get, mount, chroot)"
[[ $(uname -m) == x86_64 ]] || log "host is $(uname -m), not x86_64: untested"
[[ -x $HOST_HFEDMOE ]] || die "no host hfedmoe at $HOST_HFEDMOE (set HOST_HFEDMOE)"
HOST_PY=$(dirname "$HOST_HFEDMOE")/python
[[ -x $HOST_PY ]] || HOST_PY=python3
mkdir -p "$ARM64_ROOT" "$RUN"

# --- phase timing --------------------------------------------------------------------------
TIMES=()
T_START=$(date +%s.%N)
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
phase() {  # phase NAME CMD...: run CMD, record its wall time
    local name=$1 t0 t1; shift
    log "== $name"
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    TIMES+=("$(printf '%-34s %8s s' "$name" "$(secs "$t0" "$t1")")")
    log "== $name: $(secs "$t0" "$t1") s"
}
summary() {
    log "wall times:"
    local t
    for t in "${TIMES[@]}"; do printf '    %s\n' "$t" >&2; done
    printf '    %-34s %8s s\n' "total" "$(secs "$T_START" "$(date +%s.%N)")" >&2
}

# --- cleanup: our mounts, our processes (by PID) ---------------------------------------------
SERVER_PID="" MOSQ_PID="" AGENT_PID=""
MOUNTED=()
cleanup() {
    local rc=$? pid m i
    for pid in "$AGENT_PID" "$SERVER_PID" "$MOSQ_PID"; do
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        m=${MOUNTED[i]}
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
    done
    [[ ${#TIMES[@]} -gt 0 ]] && summary
    if [[ $rc == 0 ]]; then log "PASS (logs: $RUN)"; else log "FAILED rc=$rc (logs: $RUN)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. host packages ------------------------------------------------------------------------
host_packages() {
    local need=() p
    for p in qemu-user-static binfmt-support debootstrap mosquitto; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
    done
    if ((${#need[@]})); then
        log "apt-get install ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
            >"$RUN/apt.log" 2>&1 || { tail -20 "$RUN/apt.log" >&2; die "apt-get install"; }
    fi
}
phase "apt packages" host_packages

# --- 2. binfmt_misc ----------------------------------------------------------------------------
binfmt() {
    local bm=/proc/sys/fs/binfmt_misc
    if [[ ! -e $bm/register ]]; then
        mount -t binfmt_misc binfmt_misc "$bm" \
            || die "binfmt_misc not mountable here; this script needs it (chroot + qemu)"
    fi
    [[ -e $bm/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    [[ -e $bm/qemu-aarch64 ]] || die "qemu-aarch64 not registered in $bm"
    grep -q '^enabled' "$bm/qemu-aarch64" || echo 1 >"$bm/qemu-aarch64"
    grep -q '^flags:.*F' "$bm/qemu-aarch64" \
        || die "qemu-aarch64 binfmt lacks flag F (needs qemu-user-static's registration)"
}
phase "binfmt_misc" binfmt

# --- 3. arm64 root -----------------------------------------------------------------------------
no_mounts_under() { ! awk '{print $2}' /proc/mounts | grep -q "^$1\(/\|$\)"; }
rootfs() {
    if [[ -e $ROOTFS/.hfedmoe-rootfs-ok ]]; then log "reusing $ROOTFS"; return; fi
    local tmp=$ROOTFS.partial
    if [[ -e $tmp ]]; then
        no_mounts_under "$tmp" || die "something is mounted under $tmp; not removing it"
        rm -rf --one-file-system "$tmp"
    fi
    debootstrap --arch=arm64 --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
        bookworm "$tmp" "$DEBIAN_MIRROR" >"$RUN/debootstrap.log" 2>&1 \
        || { tail -20 "$RUN/debootstrap.log" >&2; die "debootstrap (log: $RUN/debootstrap.log)"; }
    chroot "$tmp" /usr/bin/python3.11 -m venv --without-pip /opt/venv
    touch "$tmp/.hfedmoe-rootfs-ok"
    mv "$tmp" "$ROOTFS"
}
phase "debootstrap arm64 root" rootfs

# --- 4. python packages for aarch64 ----------------------------------------------------------
find_uv() {
    if [[ -n ${UV:-} && -x $UV ]]; then echo "$UV"; return; fi
    if command -v uv >/dev/null; then command -v uv; return; fi
    if [[ -x /tmp/uvenv/bin/uv ]]; then echo /tmp/uvenv/bin/uv; return; fi
    if [[ ! -x $ARM64_ROOT/uvenv/bin/uv ]]; then
        python3 -m venv "$ARM64_ROOT/uvenv" >&2 && "$ARM64_ROOT/uvenv/bin/pip" install -q uv >&2
    fi
    echo "$ARM64_ROOT/uvenv/bin/uv"
}
packages() {
    local uv site req stamp
    uv=$(find_uv)
    export UV_CACHE_DIR=$ARM64_ROOT/uv-cache
    site=$ROOTFS/opt/venv/lib/python3.11/site-packages
    req=$ARM64_ROOT/requirements-aarch64.txt
    # constraints.txt pins torch to an x86-64 +cpu build; swap in the aarch64 pin
    grep -v -E '^torch==' "$REPO/constraints.txt" >"$ARM64_ROOT/constraints-aarch64.txt"
    echo "torch==$ARM64_TORCH" >>"$ARM64_ROOT/constraints-aarch64.txt"
    "$uv" pip compile -q --python-platform aarch64-manylinux_2_28 --python-version 3.11 \
        --index-url https://pypi.org/simple --no-header --no-annotate \
        -c "$ARM64_ROOT/constraints-aarch64.txt" "$REPO/pyproject.toml" --extra assets \
        -o "$req.new" || die "uv pip compile for aarch64"
    stamp=$(sha256sum "$req.new" | cut -d' ' -f1)
    if [[ -e $site/.hfedmoe-req && $(cat "$site/.hfedmoe-req") == "$stamp" ]]; then
        log "packages up to date ($(grep -c == "$req.new") pinned)"
    else
        "$uv" pip install -q --python-platform aarch64-manylinux_2_28 --python-version 3.11 \
            --index-url https://pypi.org/simple --target "$site" -r "$req.new" \
            || die "uv pip install --target for aarch64"
        echo "$stamp" >"$site/.hfedmoe-req"
    fi
    mv "$req.new" "$req"
    grep -E '^(torch|transformers|numpy|safetensors|paho-mqtt)==' "$req" | tr '\n' ' ' >&2; echo >&2
    if grep -qiE '^nvidia-' "$req"; then log "note: nvidia-* wheels in the set (torch $ARM64_TORCH)"; fi
}
phase "aarch64 python packages (uv)" packages

# --- mounts: /proc, /sys, this checkout read-only ----------------------------------------------
bind_mounts() {
    mkdir -p "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS$REPO" "$ROOTFS/var/cache/pyc" "$ROOTFS/tmp"
    mount -t proc proc "$ROOTFS/proc"; MOUNTED+=("$ROOTFS/proc")
    mount --bind /sys "$ROOTFS/sys"; MOUNTED+=("$ROOTFS/sys")
    mount -o remount,bind,ro "$ROOTFS/sys" 2>/dev/null || true
    mount --bind "$REPO" "$ROOTFS$REPO"; MOUNTED+=("$ROOTFS$REPO")
    mount -o remount,bind,ro "$ROOTFS$REPO"
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
}
bind_mounts

in_arm64() {  # run a command inside the emulated root, clean environment
    chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" \
        PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        PYTHONPATH="$REPO" PYTHONPYCACHEPREFIX=/var/cache/pyc PYTHONUNBUFFERED=1 \
        HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 "$@"
}

# --- 5. checks inside the emulation ------------------------------------------------------------
arch_check() {
    local m pm
    m=$(in_arm64 /usr/bin/uname -m)
    pm=$(in_arm64 /opt/venv/bin/python -c 'import platform; print(platform.machine())')
    log "uname -m: $m; platform.machine(): $pm; QEMU_CPU=$QEMU_CPU"
    [[ $m == aarch64 && $pm == aarch64 ]] || die "not running as aarch64"
}
phase "uname / platform (emulated)" arch_check
torch_check() {
    in_arm64 /opt/venv/bin/python -c \
        'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.randn(2, 2) @ torch.randn(2, 2))' \
        2> >(grep -v MIDR_EL1 >&2) | tee "$RUN/torch.txt"
}
phase "import torch + matmul (emulated)" torch_check
profile() {
    in_arm64 /opt/venv/bin/python -m hfedmoe.cli profile --model none \
        --matmul-seconds 0.3 --matmul-size 256 --out /tmp/arm64-device-report.json \
        >"$RUN/profile.txt" 2> >(grep -v MIDR_EL1 >&2)
    cat "$RUN/profile.txt"
    cp "$ROOTFS/tmp/arm64-device-report.json" "$RUN/device-report.json"
}
phase "hfedmoe profile (emulated)" profile

# --- 6. one round: broker + server on the host, agent emulated ---------------------------------
UPCYCLE_LINE=""
[[ -z $ARM64_UPCYCLE ]] || UPCYCLE_LINE="upcycle = \"$ARM64_UPCYCLE\""
PORT=$("$HOST_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=mqtt://127.0.0.1:$PORT
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' \
    "$PORT" >"$RUN/mosquitto.conf"
cat >"$RUN/server.toml" <<EOF
run_id = "$RUN_ID"
run_dir = "$RUN/server-run"
max_eval_examples = 32
eval_batch_size = 32
[model]
num_experts = 2
top_k = 1
max_length = 16
$UPCYCLE_LINE
[train]
lr = 1e-3
batch_size = 2
max_steps = 2
selection_batches = 1
threads = 1
[rounds]
rounds = 1
min_devices = 1
deadline_s = 1800.0
train_time_s = 900.0
registration_timeout_s = $AGENT_TIMEOUT_S
[transport]
url = "$URL"
keepalive = 30
EOF
AGENT_DIR=/tmp/arm64-agent  # inside the root
rm -rf --one-file-system "$ROOTFS$AGENT_DIR"
mkdir -p "$ROOTFS$AGENT_DIR"
cat >"$ROOTFS$AGENT_DIR/agent.toml" <<EOF
device_id = "$DEVICE_ID"
run_id = "$RUN_ID"
work_dir = "$AGENT_DIR/work"
matmul_seconds = 0.2
upload_margin_s = 5.0
ack_timeout_s = 60.0
max_rounds = 1
[model]
num_experts = 2
top_k = 1
max_length = 16
$UPCYCLE_LINE
[train]
threads = 1
batch_size = 2
[transport]
url = "$URL"
keepalive = 30
EOF
cp "$ROOTFS$AGENT_DIR/agent.toml" "$RUN/agent.toml"

start_host_side() {
    mosquitto -c "$RUN/mosquitto.conf" >"$RUN/mosquitto.log" 2>&1 &
    MOSQ_PID=$!
    local i
    for i in $(seq 50); do
        "$HOST_PY" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$PORT)))" \
            && break
        sleep 0.2
    done
    kill -0 "$MOSQ_PID" || die "mosquitto did not start (log: $RUN/mosquitto.log)"
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
        "$HOST_HFEDMOE" server --config "$RUN/server.toml" >"$RUN/server.log" 2>&1 &
    SERVER_PID=$!
    log "mosquitto pid $MOSQ_PID on $URL; server pid $SERVER_PID (log: $RUN/server.log)"
}
phase "host: mosquitto + server start" start_host_side

agent_round() {
    local rc=0
    in_arm64 /usr/bin/timeout "$AGENT_TIMEOUT_S" /opt/venv/bin/python -m hfedmoe.cli agent \
        --config "$AGENT_DIR/agent.toml" >"$RUN/agent.log" 2>&1 &
    AGENT_PID=$!
    log "agent (emulated) pid $AGENT_PID (log: $RUN/agent.log)"
    wait "$AGENT_PID" || rc=$?
    AGENT_PID=""
    grep -E 'INFO hfedmoe.agent' "$RUN/agent.log" | cut -c1-220 >&2 || true
    [[ $rc == 0 ]] || { tail -30 "$RUN/agent.log" >&2; die "agent exited $rc"; }
}
phase "agent round (emulated)" agent_round

server_done() {
    local rc=0 i
    for i in $(seq 120); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=""
    [[ $rc == 0 ]] || { tail -30 "$RUN/server.log" >&2; die "server exited $rc"; }
}
phase "server finish" server_done

cp "$ROOTFS$AGENT_DIR/work/agent.jsonl" "$RUN/agent.jsonl" 2>/dev/null || die "no agent.jsonl"
grep -E 'round 0:' "$RUN/server.log" | cut -c1-250 >&2 || true
"$HOST_PY" - "$RUN/server-run/metrics.jsonl" "$RUN/agent.jsonl" "$DEVICE_ID" <<'EOF' || die "update not accepted"
import json, sys
metrics, agent, dev = sys.argv[1:4]
rows = [json.loads(x) for x in open(metrics) if x.strip()]
rounds = [r for r in rows if r.get("phase") == "round"]
assert rounds, "no round in the server's metrics"
r = rounds[-1]
assert r["accepted"] >= 1 and dev in r.get("devices", {}), f"server: {r.get('accepted')} accepted, devices {list(r.get('devices', {}))}"
a = [json.loads(x) for x in open(agent) if x.strip()][-1]
assert a["status"] == "accepted", f"agent says {a['status']}"
print(f"server accepted {dev}: accepted={r['accepted']} experts_updated={r['experts_updated']} "
      f"bytes_in={r['bytes_in']} round_s={r['round_s']:.1f} accuracy={r['accuracy']:.3f}; "
      f"agent: steps={a.get('steps')} loss={a.get('loss'):.3f} bytes_up={a['bytes_up']} "
      f"bytes_down={a['bytes_down']} seconds={a['seconds']:.1f}", file=sys.stderr)
EOF
