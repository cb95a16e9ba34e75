#!/bin/bash
# benches/memory.sh — does tenso's memory grow with message size?
#
#   benches/memory.sh                              # CONC=100 SIZE=20971520 (100 × 20 MB)
#   BASE_BIN=/path/to/older/tenso benches/memory.sh   # + the same run against another build
#
# One tenso daemon (delivery to the harness's smtp-sink) receives CONC messages of SIZE
# bytes over CONC concurrent sessions at once (Postfix's smtp-source -F, one message per
# session), and forwards them. The message carries a DKIM-Signature, so under the
# defaults (SPF and DKIM on) tenso hashes each body for DKIM at the end of DATA. DNS
# goes to a loopback port where nothing answers: every lookup is refused at once and
# recorded as temperror (the bench measures memory, not DNS). The same load runs a
# second time with `[auth] spf = false, dkim = false` (label tenso-auth-off), and a
# third time with the defaults plus DKIM signing of the forwarded copy (label
# tenso-signing): signing needs each message whole, so those read-backs take turns
# within `[smtp] whole_message_memory` (64 MiB). Prints one MEMORY line per binary: the RSS before the
# load, the peak RSS (VmHWM from /proc) over the whole transfer and delivery, the
# per-transfer increase, and msgs/s end to end. The issue's target: peak RSS under
# 64 MB + 256 KB per concurrent transfer (150 MB for 100 × 20 MB). Bounded: the wait
# for the sink ends after WAIT_TIMEOUT seconds (bench.sh's default, 900).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PF="$HERE/postfix-perf"
. "$PF/env.sh"
. "$HERE/lib.sh"
CONC=${CONC:-100}; SIZE=${SIZE:-20971520}
TENSO_PORT=${TENSO_PORT:-2633}
DNS_PORT=${DNS_PORT:-2653}   # nothing listens here
TDIR=$PERF_WORK/tenso-memory
OUT=${OUT:-$HERE/results/memory-$(date -u +%Y%m%dT%H%M%SZ).results}
mkdir -p "$(dirname "$OUT")"
BIN=${BIN:-$ROOT/target/release/tenso}
[ -n "${NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release -q)
command -v smtp-source >/dev/null || "$PF/setup.sh" > "$PERF_WORK.setup.log" 2>&1
start_sink

# The message: a DKIM-Signature (its key will not be found; the body is hashed first)
# and SIZE bytes of body in lines of 78 octets with runs of blanks.
MSG=$PERF_WORK/memory-$SIZE.eml
if [ ! -s "$MSG" ]; then
    {
        printf 'From: <sender@sender.test>\nTo: <user@%s>\nSubject: memory\n' "$ALIAS_DOMAIN"
        printf 'DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test; s=bench;\n'
        printf ' h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\n\n'
        # Not `yes | head`: under pipefail yes's SIGPIPE would end the script.
        head -c "$SIZE" < <(yes 'memory benchmark body line  with 	 blanks  and some text to make it 78 octets')
    } > "$MSG"
fi

run_one() {  # LABEL BIN AUTH(on|off|sign)
    local label=$1 bin=$2 auth=$3
    local auth_conf="" sign_conf=""
    [ "$auth" != off ] || auth_conf=$'spf = false\ndkim = false'
    [ -s "$TDIR/pid" ] && kill "$(cat "$TDIR/pid")" 2>/dev/null || true
    rm -rf "$TDIR"; mkdir -p "$TDIR"
    if [ "$auth" = sign ]; then
        "$bin" dkim keygen --algorithm rsa --selector bench --domain fwd.test --out "$TDIR/dkim.pem" >/dev/null
        sign_conf=$'[dkim]\ndomain = "fwd.test"\nselector = "bench"\nkey = "'"$TDIR/dkim.pem"'"'
    fi
    bench_tenso_conf "$TDIR/tenso.toml" "$TDIR/data" "$TENSO_PORT" "max_message_size = $((SIZE * 2))
[auth]
$auth_conf
[dns]
nameservers = [\"127.0.0.1:$DNS_PORT\"]
timeout = \"1s\"
attempts = 1
$sign_conf"
    printf 'user@%s user@%s\n' "$ALIAS_DOMAIN" "$DEST_DOMAIN" > "$TDIR/aliases.txt"
    "$bin" --config "$TDIR/tenso.toml" import "$TDIR/aliases.txt" >/dev/null
    local pid; pid=$(bench_tenso_start "$bin" "$TDIR/tenso.toml" "$TDIR/log" "$TDIR/pid" "$TENSO_PORT" warn)
    local before; before=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    local base; base=$(sink_count); local t0; t0=$(date +%s.%N)
    smtp-source -s "$CONC" -m "$CONC" -F "$MSG" -f "sender@sender.test" -t "user@$ALIAS_DOMAIN" \
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
run_one tenso "$BIN" on
run_one tenso-auth-off "$BIN" off
run_one tenso-signing "$BIN" sign
[ -z "${BASE_BIN:-}" ] || run_one tenso-base "$BASE_BIN" on
