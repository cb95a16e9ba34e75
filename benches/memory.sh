#!/bin/bash
# benches/memory.sh — does tenso's memory grow with message size?
#
#   benches/memory.sh                              # CONC=100 SIZE=20971520 (100 × 20 MB)
#   BASE_BIN=/path/to/older/tenso benches/memory.sh   # + the same run against another build
#
# One tenso daemon (delivery to the harness's smtp-sink) receives CONC messages of SIZE
# bytes over CONC concurrent sessions at once (Postfix's smtp-source, one message per
# session), and forwards them. Prints one MEMORY line per binary: the RSS before the
# load, the peak RSS (VmHWM from /proc) over the whole transfer and delivery, the
# per-transfer increase, and msgs/s end to end. The issue's target: peak RSS under
# 64 MB + 256 KB per concurrent transfer (150 MB for 100 × 20 MB). Bounded: the wait
# for the sink ends after WAIT_TIMEOUT seconds (bench.sh's default, 900).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PF="$HERE/postfix-perf"
. "$PF/env.sh"
CONC=${CONC:-100}; SIZE=${SIZE:-20971520}
TENSO_PORT=${TENSO_PORT:-2633}
TDIR=$PERF_WORK/tenso-memory
OUT=${OUT:-$HERE/results/memory-$(date -u +%Y%m%dT%H%M%SZ).results}
mkdir -p "$(dirname "$OUT")"
BIN=${BIN:-$ROOT/target/release/tenso}
[ -n "${NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release -q)
command -v smtp-source >/dev/null || "$PF/setup.sh" > "$PERF_WORK.setup.log" 2>&1
start_sink

run_one() {  # LABEL BIN
    local label=$1 bin=$2
    [ -s "$TDIR/pid" ] && kill "$(cat "$TDIR/pid")" 2>/dev/null || true
    rm -rf "$TDIR"; mkdir -p "$TDIR"
    cat > "$TDIR/tenso.toml" <<CONF
hostname = "fwd.test"
data_dir = "$TDIR/data"
[smtp]
listen = ["127.0.0.1:$TENSO_PORT"]
max_message_size = $((SIZE * 2))
[delivery]
routes = { "dest.test" = "127.0.0.1:$SINK_PORT" }
[auth]
spf = false
dkim = false
[tls]
starttls = false
[limits]
max_connections_per_ip = 100000
connect_rate_per_minute = 10000000
max_messages_per_connection = 100000000
alias_rate_per_hour = 0
CONF
    printf 'user@%s user@%s\n' "$ALIAS_DOMAIN" "$DEST_DOMAIN" > "$TDIR/aliases.txt"
    "$bin" --config "$TDIR/tenso.toml" import "$TDIR/aliases.txt" >/dev/null
    RUST_LOG=warn setsid "$bin" --config "$TDIR/tenso.toml" serve > "$TDIR/log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$TDIR/pid"
    local i; for i in $(seq 1 100); do port_listening "$TENSO_PORT" && break; sleep 0.1; done
    local before; before=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    local base; base=$(sink_count); local t0; t0=$(date +%s.%N)
    smtp-source -s "$CONC" -m "$CONC" -l "$SIZE" -f "sender@sender.test" -t "user@$ALIAS_DOMAIN" \
        "127.0.0.1:$TENSO_PORT" 2> "$TDIR/source.err" || true
    for i in $(seq 1 "$((${WAIT_TIMEOUT:-900} * 10))"); do
        [ "$(sink_count)" -ge $((base + CONC)) ] && break; sleep 0.1; done
    local t1; t1=$(date +%s.%N)
    local peak; peak=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
    local got=$(( $(sink_count) - base ))
    kill "$pid" 2>/dev/null || true
    awk -v l="$label" -v c="$CONC" -v s="$SIZE" -v b="$before" -v p="$peak" -v g="$got" -v t0="$t0" -v t1="$t1" 'BEGIN {
        printf "MEMORY label=%s conc=%d size=%d rss_before_mb=%.1f peak_rss_mb=%.1f per_transfer_kb=%.0f delivered=%d e2e_rate=%.1f target_mb=%.0f\n",
            l, c, s, b/1024, p/1024, (p-b)/c, g, g/(t1-t0), 64 + c*0.25 }' | tee -a "$OUT"
}
echo "# memory: CONC=$CONC SIZE=$SIZE $(uptime)" | tee -a "$OUT"
run_one tenso "$BIN"
[ -z "${BASE_BIN:-}" ] || run_one tenso-base "$BASE_BIN"
