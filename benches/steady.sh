#!/bin/bash
# benches/steady.sh — does tenso slow down as the number of messages it handled grows?
#
#   benches/steady.sh                       # TOTAL=200000 BATCH=10000 SESSIONS=50 SIZE=2048
#   TOTAL=40000 BATCH=10000 benches/steady.sh
#
# One tenso daemon (the 101,000-alias table of benches/compare.sh, delivery to the
# harness's smtp-sink) receives TOTAL messages in consecutive batches of BATCH from
# smtp-source, without a restart. After each batch it prints one STEADY line: msgs/s
# (end to end), tenso's CPU (user and system, from /proc/PID/stat) per message, its
# RSS, the size of the queue directory and of the table's store, and the acceptance
# latency (end of DATA → 250, p50/p99, from the "accepted" log lines' `commit_ms`).
# Ends with the first-10 % vs last-10 % comparison. Needs the harness set up (it runs
# benches/postfix-perf/setup.sh when the sink or smtp-source is missing). Bounded:
# TOTAL/BATCH batches, each with bench.sh's WAIT_TIMEOUT.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PF="$HERE/postfix-perf"
. "$PF/env.sh"
. "$HERE/lib.sh"
TOTAL=${TOTAL:-200000}; BATCH=${BATCH:-10000}; SESSIONS=${SESSIONS:-50}; SIZE=${SIZE:-2048}
TENSO_PORT=${TENSO_PORT:-2632}
TDIR=$PERF_WORK/tenso-steady
OUT=${OUT:-$HERE/results/steady-$(date -u +%Y%m%dT%H%M%SZ).results}
mkdir -p "$(dirname "$OUT")"
BIN=${BIN:-$ROOT/target/release/tenso}
[ -n "${NOBUILD:-}" ] || (cd "$ROOT" && cargo build --release -q)

if [ ! -s "$PERF_WORK/aliases.txt" ] || ! command -v smtp-source >/dev/null; then
    "$PF/setup.sh" > "$PERF_WORK.setup.log" 2>&1 || { tail -20 "$PERF_WORK.setup.log"; exit 1; }
fi
start_sink

[ -s "$TDIR/pid" ] && kill "$(cat "$TDIR/pid")" 2>/dev/null || true
if [ -d "$TDIR" ]; then
    rm -rf "$TDIR"
    # ext4 without a journal makes every inode allocation skip the inodes deleted in
    # the last 60 s (360 s while their inode table block is dirty): the previous run's
    # files would slow this run's first batches.
    sleep "${SETTLE:-40}"
fi
mkdir -p "$TDIR"
bench_tenso_conf "$TDIR/tenso.toml" "$TDIR/data" "$TENSO_PORT" "[auth]
spf = false
dkim = false"
"$BIN" --config "$TDIR/tenso.toml" import "$PERF_WORK/aliases.txt" >/dev/null
PID=$(bench_tenso_start "$BIN" "$TDIR/tenso.toml" "$TDIR/log" "$TDIR/pid" "$TENSO_PORT")
trap 'kill $PID 2>/dev/null || true' EXIT

ticks() { awk '{sub(/.*\) /,""); print $12, $13}' "/proc/$PID/stat"; }   # utime stime
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$PID/status"; }
queue_empty() {
    local i; for i in $(seq 1 1200); do
        [ -z "$(find "$TDIR/data/queue" -type f \( -name '*.env' -o -name '*.msg' \) 2>/dev/null | head -1)" ] && return 0
        sleep 0.1; done; return 1
}
accept_lat() {  # FROM_BYTE: p50/p99 of commit_ms over the log since FROM_BYTE
    tail -c +"$(( $1 + 1 ))" "$TDIR/log" | grep -o 'commit_ms=[0-9.]*' | cut -d= -f2 | sort -g |
        awk '{v[NR]=$1} END {if (NR==0) {print "acc_p50_ms=-1 acc_p99_ms=-1"; exit}
            i50=int(NR*0.50); if (i50<1) i50=1; i99=int(NR*0.99); if (i99<1) i99=1;
            printf "acc_p50_ms=%.2f acc_p99_ms=%.2f", v[i50], v[i99]}'
}
HZ=$(getconf CLK_TCK)
n=0; b=0
echo "# steady: TOTAL=$TOTAL BATCH=$BATCH SESSIONS=$SESSIONS SIZE=$SIZE $(uptime)" | tee -a "$OUT"
while [ "$n" -lt "$TOTAL" ]; do
    b=$((b + 1))
    read -r u0 s0 < <(ticks); off=$(stat -c %s "$TDIR/log")
    line=$(LABEL=steady "$PF/bench.sh" "$TENSO_PORT" "$BATCH" "$SESSIONS" "$SIZE" | grep '^RESULT' || true)
    queue_empty || echo "queue did not drain after batch $b" >&2
    read -r u1 s1 < <(ticks)
    n=$((n + BATCH))
    rate=$(sed -n 's/.* e2e_rate=\([0-9.]*\).*/\1/p' <<< "$line")
    qdir=$(du -sk "$TDIR/data/queue" | cut -f1); tbl=$(du -sk "$TDIR/data/table" 2>/dev/null | cut -f1 || echo 0)
    st="STEADY batch=$b handled=$n e2e_rate=${rate:-0} user_ms_per_msg=$(awk -v a="$u0" -v b="$u1" -v h="$HZ" -v n="$BATCH" 'BEGIN{printf "%.3f", (b-a)*1000/h/n}') sys_ms_per_msg=$(awk -v a="$s0" -v b="$s1" -v h="$HZ" -v n="$BATCH" 'BEGIN{printf "%.3f", (b-a)*1000/h/n}') rss_mb=$(( $(rss_kb) / 1024 )) queue_kb=$qdir table_kb=$tbl $(accept_lat "$off") load=\"$(cut -d' ' -f1-3 /proc/loadavg)\""
    echo "$st" | tee -a "$OUT"
done
python3 - "$OUT" <<'PY'
import sys, re
rows = [dict(re.findall(r'(\w+)=("[^"]*"|\S+)', l)) for l in open(sys.argv[1]) if l.startswith("STEADY")]
if len(rows) < 2: sys.exit(0)
k = max(1, len(rows) // 10)
f = lambda rs, key: sum(float(r[key]) for r in rs) / len(rs)
first, last = rows[:k], rows[-k:]
print("first %d batch(es): %.0f msgs/s, acceptance p99 %.2f ms; last %d: %.0f msgs/s, p99 %.2f ms" % (
    k, f(first, "e2e_rate"), f(first, "acc_p99_ms"), k, f(last, "e2e_rate"), f(last, "acc_p99_ms")))
print("last/first throughput %.2f (target >= 0.90)" % (f(last, "e2e_rate") / f(first, "e2e_rate")))
PY
