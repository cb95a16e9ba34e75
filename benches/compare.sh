#!/bin/bash
# benches/compare.sh — tenso against Postfix+postsrsd and against the bare
# smtp-source → smtp-sink ceiling, measured in the same run on this machine.
#
#   benches/compare.sh                 # SIZES="2048 102400" COUNTS=5000 SESSIONS="10 50" REPS=3
#   SIZES=2048 COUNTS=20000 SESSIONS=10 REPS=3 benches/compare.sh
#   SPAM=1 SIZES=2048 COUNTS=2000 SESSIONS=10 benches/compare.sh   # with the spam gate
#   STEADY_TOTAL=200000 benches/compare.sh     # + the steady run and the memory benchmark
#
# STEADY_TOTAL > 0 (default 0: skipped) adds, after the table, benches/steady.sh (one
# daemon, STEADY_TOTAL messages of 2 KB at 50 sessions in batches of 10,000) and
# benches/memory.sh (100 concurrent 20 MB transfers, peak RSS).
#
# SPAM=1: one private rspamd (tests/rspamd/ config, Debian's rules, no Redis) judges
# both paths in the same run: Postfix through rspamd's proxy worker as a milter
# (smtpd_milters = inet:127.0.0.1:$RSPAMD_PROXY), tenso through /checkv2 on the normal
# worker. A second tenso without the gate ("tenso-nogate", port 2631) gives the cost of
# the gate. rspamd's and tenso's DNS go to benches/nxdns.py (NXDOMAIN at once), and
# rspamd's CPU is counted in both forwarders' CPU figures.
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
. "$HERE/lib.sh"
SIZES=${SIZES:-"2048 102400"}; COUNTS=${COUNTS:-5000}; SESSIONS=${SESSIONS:-"10 50"}; REPS=${REPS:-3}
TENSO_PORT=${TENSO_PORT:-2630}
TENSO_PLAIN_PORT=${TENSO_PLAIN_PORT:-2631}
SPAM=${SPAM:-0}
RSPAMD_NORMAL=${RSPAMD_NORMAL:-11433}; RSPAMD_PROXY=${RSPAMD_PROXY:-11432}
RSPAMD_CONTROLLER=${RSPAMD_CONTROLLER:-11434}; NXDNS_PORT=${NXDNS_PORT:-11453}
RDIR=$PERF_WORK/rspamd
TDIR=$PERF_WORK/tenso
TPDIR=$PERF_WORK/tenso-nogate
PEERS="sink-direct postfix tenso"
if [ "$SPAM" = 1 ]; then PEERS="sink-direct postfix tenso tenso-nogate"; fi
OUT=${OUT:-$HERE/results/compare-$(date -u +%Y%m%dT%H%M%SZ).results}
mkdir -p "$(dirname "$OUT")"

# BIN=another/tenso NOBUILD=1: measure another build (e.g. main before a change).
if [ -z "${NOBUILD:-}" ]; then echo "== build (release)"; (cd "$ROOT" && cargo build --release -q); fi
BIN=${BIN:-$ROOT/target/release/tenso}

echo "== Postfix + postsrsd instance, smtp-sink"
mkdir -p "$PERF_WORK"
"$PF/setup.sh" > "$LOG_DIR.setup.log" 2>&1 || { tail -20 "$LOG_DIR.setup.log"; exit 1; }

stop_rspamd() {
    # The whole process group: rspamd's main process and the workers it forked.
    if [ -s "$RDIR/main.pid" ]; then kill -TERM -- "-$(cat "$RDIR/main.pid")" 2>/dev/null || true; sleep 1
        kill -KILL -- "-$(cat "$RDIR/main.pid")" 2>/dev/null || true; rm -f "$RDIR/main.pid"; fi
    if [ -s "$RDIR/nxdns.pid" ]; then kill "$(cat "$RDIR/nxdns.pid")" 2>/dev/null || true; rm -f "$RDIR/nxdns.pid"; fi
}
RSPAMD_PIDS=""
if [ "$SPAM" = 1 ]; then
    echo "== rspamd (normal 127.0.0.1:$RSPAMD_NORMAL, milter proxy :$RSPAMD_PROXY), DNS stub :$NXDNS_PORT"
    command -v rspamd >/dev/null || { echo "rspamd missing: apt-get install --no-install-recommends rspamd" >&2; exit 1; }
    stop_rspamd || true
    rm -rf "$RDIR"; mkdir -p "$RDIR"
    setsid python3 "$HERE/nxdns.py" "$NXDNS_PORT" > "$RDIR/nxdns.log" 2>&1 < /dev/null &
    echo $! > "$RDIR/nxdns.pid"
    setsid rspamd -f -i -c "$ROOT/tests/rspamd/rspamd.conf" --var "LOCAL_CONFDIR=$ROOT/tests/rspamd" \
        --var "RUNDIR=$RDIR" --var "DBDIR=$RDIR" --var "LOGDIR=$RDIR" --var "NORMAL_PORT=$RSPAMD_NORMAL" \
        --var "PROXY_PORT=$RSPAMD_PROXY" --var "CONTROLLER_PORT=$RSPAMD_CONTROLLER" \
        --var "DNS=127.0.0.1:$NXDNS_PORT" --var "PASSWORD=bench" > "$RDIR/out.log" 2>&1 < /dev/null &
    echo $! > "$RDIR/main.pid"
    for i in $(seq 1 600); do
        curl -s "http://127.0.0.1:$RSPAMD_NORMAL/ping" 2>/dev/null | grep -q pong && break; sleep 0.2
    done
    curl -s "http://127.0.0.1:$RSPAMD_NORMAL/ping" | grep -q pong || { tail -20 "$RDIR/rspamd.log"; exit 1; }
    RSPAMD_PIDS=$(cat "$RDIR/main.pid")
    postconf -c "$PF_CONF" -e "smtpd_milters = inet:127.0.0.1:$RSPAMD_PROXY" \
        "milter_default_action = accept" "milter_protocol = 6"
fi
"$PF/start.sh"
# Mail left in Postfix's queue by an interrupted earlier run would count as this run's.
postsuper -c "$PF_CONF" -d ALL >/dev/null 2>&1 || true

stop_tenso() {
    local d; for d in "$TDIR" "$TPDIR"; do
        [ -s "$d/pid" ] && kill "$(cat "$d/pid")" 2>/dev/null; rm -f "$d/pid"
    done; sleep 0.5
}
stop_tenso || true
tenso_conf() {  # DIR PORT EXTRA: a tenso config for the benchmark
    # The Postfix baseline checks neither SPF nor DKIM: neither does tenso here.
    bench_tenso_conf "$1/tenso.toml" "$1/data" "$2" "[auth]
spf = false
dkim = false
$3"
}
# An earlier run's data directory is moved aside, and deleted only when the comparison
# is over: ext4 without a journal makes every inode allocation skip the inodes deleted
# in the last 60 s (360 s while their inode table block is dirty), so deleting tens of
# thousands of files here would slow whichever forwarder creates files next.
OLD_DIRS=()
start_tenso() {  # DIR PORT EXTRA
    if [ -e "$1" ]; then local old="$1.old.$EPOCHREALTIME"; mv "$1" "$old"; OLD_DIRS+=("$old"); fi
    mkdir -p "$1"
    tenso_conf "$1" "$2" "$3"
    local t0=$EPOCHREALTIME
    "$BIN" --config "$1/tenso.toml" import "$PERF_WORK/aliases.txt"
    echo "import of $(wc -l < "$PERF_WORK/aliases.txt") aliases: $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}') s"
    bench_tenso_start "$BIN" "$1/tenso.toml" "$1/log" "$1/pid" "$2" >/dev/null
}
SPAM_CONF=""
if [ "$SPAM" = 1 ]; then
    SPAM_CONF="[spam]
rspamd_url = \"http://127.0.0.1:$RSPAMD_NORMAL\"
[dns]
nameservers = [\"127.0.0.1:$NXDNS_PORT\"]"
fi
echo "== tenso on 127.0.0.1:$TENSO_PORT$([ "$SPAM" = 1 ] && echo " (spam gate), tenso-nogate on :$TENSO_PLAIN_PORT")"
start_tenso "$TDIR" "$TENSO_PORT" "$SPAM_CONF"
[ "$SPAM" = 1 ] && start_tenso "$TPDIR" "$TENSO_PLAIN_PORT" "[dns]
nameservers = [\"127.0.0.1:$NXDNS_PORT\"]"
trap 'stop_tenso; "$PF/stop.sh" >/dev/null; stop_rspamd; rm -rf "${OLD_DIRS[@]}"' EXIT

queue_empty() {  # PEER: wait (≤120 s) until the forwarder's queue is empty
    local i
    for i in $(seq 1 1200); do
        case $1 in
            postfix) [ -z "$(find "$PF_QUEUE"/{incoming,active,deferred} -type f 2>/dev/null | head -1)" ] && return 0 ;;
            tenso) [ -z "$(find "$TDIR/data/queue" -name '*.msg' 2>/dev/null | head -1)" ] && return 0 ;;
            tenso-nogate) [ -z "$(find "$TPDIR/data/queue" -name '*.msg' 2>/dev/null | head -1)" ] && return 0 ;;
            *) return 0 ;;
        esac
        sleep 0.1
    done
    echo "queue of $1 did not drain" >&2; return 1
}

latency() {  # LOG FROM_BYTE: p50/p99 (ms) of accepted → delivered over LOG since FROM_BYTE
    tail -c +"$(( $2 + 1 ))" "$1" | python3 -c '
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
    for peer in $PEERS; do
        case $peer in sink-direct) port=$SINK_PORT ;; postfix) port=$PF_PORT ;; tenso) port=$TENSO_PORT ;;
            tenso-nogate) port=$TENSO_PLAIN_PORT ;; esac
        tlog=$TDIR/log; [ "$peer" = tenso-nogate ] && tlog=$TPDIR/log
        queue_empty "$peer"
        [ "$peer" = postfix ] && postfix -c "$PF_CONF" reload >/dev/null 2>&1 && sleep 1
        off=$(stat -c %s "$tlog")
        fwd=""; [ "$peer" = postfix ] && fwd=$(cat "$RUN_DIR/postsrsd.pid")
        # The shared rspamd works for whichever forwarder uses it: its CPU counts there.
        case $peer in postfix|tenso) fwd="$fwd $RSPAMD_PIDS" ;; esac
        echo "-- rep $rep: $peer size=$size msgs=$n sessions=$s"
        line=$(FWD_PIDS="$fwd" LABEL=$peer "$PF/bench.sh" "$port" "$n" "$s" "$size" | tee /dev/stderr | grep '^RESULT' || true)
        case $peer in tenso|tenso-nogate) if [ -n "$line" ]; then
            queue_empty "$peer"
            line="$line $(latency "$tlog" "$off")"
        fi ;; esac
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
gate = []
for k in keys:
    t, p, c = runs.get(("tenso",) + k, []), runs.get(("postfix",) + k, []), runs.get(("sink-direct",) + k, [])
    g = runs.get(("tenso-nogate",) + k, [])
    if g and t:
        gate.append((k, med(t, "e2e_rate"), med(g, "e2e_rate"),
            st.median(float(r["fwd_cpu_s"]) * 1000 / int(r["msgs"]) for r in t),
            st.median(float(r["fwd_cpu_s"]) * 1000 / int(r["msgs"]) for r in g),
            med(t, "lat_p50_ms"), med(g, "lat_p50_ms")))
    te, pe, ce = med(t, "e2e_rate"), med(p, "e2e_rate"), med(c, "e2e_rate")
    tcpu = st.median(float(r["fwd_cpu_s"]) * 1000 / int(r["msgs"]) for r in t) if t else float("nan")
    pcpu = st.median(float(r["fwd_cpu_s"]) * 1000 / int(r["msgs"]) for r in p) if p else float("nan")
    print("| %d B | %d | %d | %.0f | %.0f | %.0f | %.2f | %.2f | %.2f | %.2f | %.0f | %.1f / %.1f |" % (
        k[0], k[1], k[2], te, pe, ce, te / pe if pe else float("nan"), te / ce if ce else float("nan"),
        tcpu, pcpu, med(t, "peak_rss_kb") / 1024, med(t, "lat_p50_ms"), med(t, "lat_p99_ms")))
if gate:
    print()
    print("cost of the spam gate (tenso with rspamd vs tenso-nogate; CPU with gate includes rspamd):")
    print("| payload | msgs | sessions | with gate e2e | without e2e | with/without | CPU ms/msg with / without | latency p50 with / without ms |")
    print("|---|---|---|---|---|---|---|---|")
    for k, w, wo, cw, cwo, lw, lwo in gate:
        print("| %d B | %d | %d | %.0f | %.0f | %.2f | %.2f / %.2f | %.1f / %.1f |" % (k[0], k[1], k[2], w, wo, w / wo if wo else float("nan"), cw, cwo, lw, lwo))
PY

if [ "${STEADY_TOTAL:-0}" -gt 0 ]; then
    trap - EXIT; stop_tenso; "$PF/stop.sh" >/dev/null; stop_rspamd; rm -rf "${OLD_DIRS[@]}"
    echo; echo "== steady: $STEADY_TOTAL messages of 2 KB at 50 sessions, one daemon"
    NOBUILD=1 BIN=$BIN TOTAL=$STEADY_TOTAL BATCH=10000 SESSIONS=50 SIZE=2048 "$HERE/steady.sh"
    echo; echo "== memory: 100 concurrent transfers of 20 MB"
    NOBUILD=1 BIN=$BIN CONC=100 SIZE=20971520 "$HERE/memory.sh"
fi
