# benches/lib.sh — what the bench scripts share about the tenso under test. Sourced
# after benches/postfix-perf/env.sh (SINK_PORT, port_listening).

# bench_tenso_conf FILE DATA_DIR PORT [EXTRA]: a tenso config for a benchmark — the
# harness's smtp-sink as the route for dest.test, no STARTTLS, per-client limits
# lifted (smtp-source is one client sending everything). EXTRA is appended as TOML
# right after `[smtp] listen`, so it may begin with more [smtp] keys; then its own
# sections: what is checked (e.g. "[auth]\nspf = false\ndkim = false", as the Postfix
# baseline checks neither) and anything else a benchmark needs.
bench_tenso_conf() {
    cat > "$1" <<CONF
hostname = "fwd.test"
data_dir = "$2"
[delivery]
routes = { "dest.test" = "127.0.0.1:$SINK_PORT" }
[tls]
starttls = false
[limits]
max_connections_per_ip = 100000
connect_rate_per_minute = 10000000
max_messages_per_connection = 100000000
alias_rate_per_hour = 0
[smtp]
listen = ["127.0.0.1:$3"]
${4:-}
CONF
}

# bench_tenso_start BIN CONFIG LOG PIDFILE PORT [RUST_LOG]: serve in its own session,
# wait (≤ 10 s) until it listens; prints its pid.
bench_tenso_start() {
    RUST_LOG=${6:-info} setsid "$1" --config "$2" serve > "$3" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$4"
    local i; for i in $(seq 1 100); do port_listening "$5" && break; sleep 0.1; done
    echo "$pid"
}
