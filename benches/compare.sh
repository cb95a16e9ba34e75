#!/bin/bash
# benches/compare.sh — tenso against Postfix+postsrsd and against the bare
# smtp-source → smtp-sink ceiling, measured in the same run on this machine.
#
#   benches/compare.sh                 # SIZES="2048 102400" COUNTS=5000 SESSIONS="10 50" REPS=3
#   SIZES=2048 COUNTS=20000 SESSIONS=10 REPS=3 benches/compare.sh
#
# Needs root (installs postfix + postsrsd from Debian when missing, like .ci does).
# The load is Postfix's own smtp-source; the destination is Postfix's smtp-sink on
# 127.0.0.1:2626; Postfix listens on 2625, tenso on 2630, both forward alias.test
# (101,000 aliases: smtp-source's 1user@…Nuser@ and user1@…) to dest.test with fsync
# before 250. The harness in benches/postfix-perf/ is the team's shared Postfix load
# harness (../shared/peers/postfix-perf), vendored so a fresh checkout can run it.
# Prints one RESULT line per run, a median table per peer, the ratios, and tenso's
# latency from 250 to arrival (p50/p99, from its log: "accepted" → "delivered").
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PF="$HERE/postfix-perf"
. "$PF/env.sh"
SIZES=${SIZES:-"2048 102400"}; COUNTS=${COUNTS:-5000}; SESSIONS=${SESSIONS:-"10 50"}; REPS=${REPS:-3}
TENSO_PORT=${TENSO_PORT:-2630}
TDIR=$PERF_WORK/tenso
OUT=${OUT:-$HERE/results/compare-$(date -u +%Y%m%dT%H%M%SZ).results}
mkdir -p "$(dirname "$OUT")"

echo "== build (release)"
(cd "$ROOT" && cargo build --release -q)
BIN=$ROOT/target/release/tenso

echo "== Postfix + postsrsd instance, smtp-sink"
"$PF/setup.sh" > "$LOG_DIR.setup.log" 2>&1 || { tail -20 "$LOG_DIR.setup.log"; exit 1; }
"$PF/start.sh"
# Mail left in Postfix's queue by an interrupted earlier run would count as this run's.
postsuper -c "$PF_CONF" -d ALL >/dev/null 2>&1 || true

echo "== tenso on 127.0.0.1:$TENSO_PORT"
stop_tenso() { [ -s "$TDIR/pid" ] && kill "$(cat "$TDIR/pid")" 2>/dev/null; sleep 0.5; rm -f "$TDIR/pid"; }
stop_tenso || true
rm -rf "$TDIR"; mkdir -p "$TDIR"
cat > "$TDIR/tenso.toml" <<CONF
hostname = "fwd.test"
data_dir = "$TDIR/data"
[smtp]
listen = ["127.0.0.1:$TENSO_PORT"]
[delivery]
routes = { "dest.test" = "127.0.0.1:$SINK_PORT" }
# The Postfix baseline checks neither SPF nor DKIM: neither does tenso here.
[auth]
spf = false
dkim = false
[tls]
starttls = false
# smtp-source is one client sending everything: lift the per-client limits.
[limits]
max_connections_per_ip = 100000
connect_rate_per_minute = 10000000
max_messages_per_connection = 100000000
alias_rate_per_hour = 0
CONF
t0=$EPOCHREALTIME
"$BIN" --config "$TDIR/tenso.toml" import "$PERF_WORK/aliases.txt"
t1=$EPOCHREALTIME
echo "import of $(wc -l < "$PERF_WORK/aliases.txt") aliases: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s"
RUST_LOG=info setsid "$BIN" --config "$TDIR/tenso.toml" serve > "$TDIR/log" 2>&1 < /dev/null &
echo $! > "$TDIR/pid"
for i in $(seq 1 100); do port_listening "$TENSO_PORT" && break; sleep 0.1; done
trap 'stop_tenso; "$PF/stop.sh" >/dev/null' EXIT

queue_empty() {  # PEER: wait (≤120 s) until the forwarder's queue is empty
    local i
    for i in $(seq 1 1200); do
        case $1 in
            postfix) [ -z "$(find "$PF_QUEUE"/{incoming,active,deferred} -type f 2>/dev/null | head -1)" ] && return 0 ;;
            tenso) [ -z "$(find "$TDIR/data/queue" -name '*.env' 2>/dev/null | head -1)" ] && return 0 ;;
            *) return 0 ;;
        esac
        sleep 0.1
    done
    echo "queue of $1 did not drain" >&2; return 1
}

latency() {  # FROM_BYTE: p50/p99 (ms) of accepted → delivered over the log since FROM_BYTE
    tail -c +"$(( $1 + 1 ))" "$TDIR/log" | python3 -c '
import sys, re, datetime
acc, lat = {}, []
for line in sys.stdin:
    m = re.match(r"(\S+)\s+INFO\s+\S+: (accepted|delivered) queue_id=(\w+)", line)
    if not m: continue
    t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
    if m.group(2) == "accepted": acc[m.group(3)] = t
    elif m.group(3) in acc: lat.append((t - acc.pop(m.group(3))) * 1000)
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else -1
print("lat_n=%d lat_p50_ms=%.2f lat_p99_ms=%.2f" % (len(lat), p(0.50), p(0.99)))'
}

for rep in $(seq 1 "$REPS"); do
  for size in $SIZES; do for n in $COUNTS; do for s in $SESSIONS; do
    for peer in sink-direct postfix tenso; do
        case $peer in sink-direct) port=$SINK_PORT ;; postfix) port=$PF_PORT ;; tenso) port=$TENSO_PORT ;; esac
        queue_empty "$peer"
        [ "$peer" = postfix ] && postfix -c "$PF_CONF" reload >/dev/null 2>&1 && sleep 1
        off=$(stat -c %s "$TDIR/log")
        fwd=""; [ "$peer" = postfix ] && fwd=$(cat "$RUN_DIR/postsrsd.pid")
        echo "-- rep $rep: $peer size=$size msgs=$n sessions=$s"
        line=$(FWD_PIDS="$fwd" LABEL=$peer "$PF/bench.sh" "$port" "$n" "$s" "$size" | tee /dev/stderr | grep '^RESULT' || true)
        if [ "$peer" = tenso ] && [ -n "$line" ]; then
            queue_empty tenso
            line="$line $(latency "$off")"
        fi
        [ -n "$line" ] && echo "$line" >> "$OUT"
    done
  done; done; done
done

echo; echo "== results ($OUT)"
"$PF/summarize.sh" "$OUT"
echo; echo "== ratios (medians of end-to-end msgs/s) and tenso latency"
python3 - "$OUT" <<'PY'
import sys, statistics as st, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    if not line.startswith("RESULT"): continue
    v = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    runs[(v["label"], int(v["size"]), int(v["msgs"]), int(v["sess"]))].append(v)
keys = sorted({k[1:] for k in runs})
print("| payload | msgs | sessions | tenso e2e | postfix e2e | ceiling e2e | tenso/postfix | tenso/ceiling | tenso CPU ms/msg | postfix CPU ms/msg | tenso peak RSS MiB | tenso latency p50/p99 ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
med = lambda rs, f: st.median(float(r[f]) for r in rs) if rs else float("nan")
for k in keys:
    t, p, c = runs.get(("tenso",) + k, []), runs.get(("postfix",) + k, []), runs.get(("sink-direct",) + k, [])
    te, pe, ce = med(t, "e2e_rate"), med(p, "e2e_rate"), med(c, "e2e_rate")
    tcpu = st.median(float(r["fwd_cpu_s"]) * 1000 / int(r["msgs"]) for r in t) if t else float("nan")
    pcpu = st.median(float(r["fwd_cpu_s"]) * 1000 / int(r["msgs"]) for r in p) if p else float("nan")
    print("| %d B | %d | %d | %.0f | %.0f | %.0f | %.2f | %.2f | %.2f | %.2f | %.0f | %.1f / %.1f |" % (
        k[0], k[1], k[2], te, pe, ce, te / pe if pe else float("nan"), te / ce if ce else float("nan"),
        tcpu, pcpu, med(t, "peak_rss_kb") / 1024, med(t, "lat_p50_ms"), med(t, "lat_p99_ms")))
PY
