#!/usr/bin/env bash
# The Unix domain socket against loopback TCP (issue 23): client-observed
# latency (p50 / p99) and the server's own CPU per request of POST /infer,
# one row, at 1 and 64 keep-alive connections, over each transport of ONE
# server (so both see the same engine, workers and load); and GET
# /v2/health/live the same way (the framework's own floor, where the
# transport is the largest share of a request).
#
#   bash benches/uds_latency.sh BINARY CLIENT [SECONDS] [REPEATS] [-- ARGS...]
#
# BINARY: a release tokitai-serve (the demo Nano model unless ARGS name a
# model: e.g. -- --arch DIR/arch.json --checkpoint DIR/checkpoint.tkp1).
# CLIENT: the release build of examples/uds_latency.rs
# (cargo build --release --example uds_latency: target/release/examples/uds_latency).
# Each (connections, transport) run lasts SECONDS (default 5) after a 1 s
# warm-up; the pairs alternate TCP / Unix REPEATS times (default 3) so drift
# on a shared machine hits both alike (and which goes first alternates),
# and the medians of the repeats are printed last. Each run also reports
# the mean rows per batch the server formed: the CPU per request of /infer
# follows it (more rows per forward, less CPU per row) far more than the
# transport, so compare transports at equal batches, or with
# -- --max-batch-rows 1 (every request its own forward). Then curl: one curl process sending
# CURL_REQUESTS (default 2000) requests over one reused connection, through
# --unix-socket and through TCP, its own time_total per request (p50 / p99).
# Ends with SIGTERM and checks the socket file was removed.
set -euo pipefail
binary=${1:?usage: uds_latency.sh BINARY CLIENT [SECONDS] [REPEATS] [-- ARGS...]}
client=${2:?usage: uds_latency.sh BINARY CLIENT [SECONDS] [REPEATS] [-- ARGS...]}
seconds=${3:-5}
repeats=${4:-3}
shift $(( $# >= 4 ? 4 : $# ))
[ "${1:-}" = "--" ] && shift
curl_requests=${CURL_REQUESTS:-2000}

dir=$(mktemp -d)
sock="$dir/http.sock"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TOKITAI_SERVER_UNIX_SOCKET="$sock" "$binary" --bind "127.0.0.1:$port" --grpc-bind 127.0.0.1:0 "$@" >/dev/null 2>"$dir/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 300); do
    curl -sf --unix-socket "$sock" http://localhost/readyz >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf --unix-socket "$sock" http://localhost/readyz >/dev/null || { echo "server not ready" >&2; cat "$dir/server.log" >&2; exit 1; }
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; server pid $pid; ${seconds}s per run"

results="$dir/results.jsonl"
for repeat in $(seq "$repeats"); do
    # Which transport goes first alternates too.
    targets=("tcp:127.0.0.1:$port" "unix:$sock")
    [ $((repeat % 2)) = 1 ] || targets=("unix:$sock" "tcp:127.0.0.1:$port")
    for route in /infer /v2/health/live; do
        get=()
        [ "$route" = /infer ] || get=(--get "$route")
        for conns in 1 64; do
            for target in "${targets[@]}"; do
                "$client" --target "$target" --connections "$conns" --seconds "$seconds" --pid "$pid" "${get[@]}" \
                    | tee -a "$results"
            done
        done
    done
done
# The median of the repeats, per route, connections and transport.
python3 - "$results" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["route"], r["connections"], r["target"].split(":")[0]) for r in runs})
print("# median of %d repeats" % (len(runs) // max(len(keys), 1)))
for route, conns, kind in keys:
    same = [r for r in runs if (r["route"], r["connections"], r["target"].split(":")[0]) == (route, conns, kind)]
    med = lambda k: round(statistics.median(r[k] for r in same), 1)
    print(json.dumps({"route": route, "connections": conns, "transport": kind, "rps": med("rps"),
                      "p50_us": med("p50_us"), "p99_us": med("p99_us"),
                      "server_cpu_us_per_request": med("server_cpu_us_per_request"),
                      "mean_batch_rows": med("mean_batch_rows")}))
EOF

# curl: one process, one reused connection, CURL_REQUESTS sequential requests.
width=$(curl -sf --unix-socket "$sock" http://localhost/v2/models/tokitai-moe \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["inputs"][0]["shape"][1])')
python3 -c "import json; print(json.dumps({'features': [0.25] * $width}))" >"$dir/body.json"
curl_run() {
    local name=$1 base=$2; shift 2
    local urls=()
    for _ in $(seq "$curl_requests"); do urls+=("$base/infer"); done
    curl -s "$@" -H 'Content-Type: application/json' --data-binary @"$dir/body.json" \
        -w '\n@@ %{http_code} %{time_total}\n' "${urls[@]}" | grep '^@@' \
        | python3 -c '
import json, sys
name = sys.argv[1]
rows = [l.split() for l in sys.stdin]
bad = [r for r in rows if r[1] != "200"]
t = sorted(float(r[2]) * 1e6 for r in rows)
pick = lambda p: round(t[min(len(t) - 1, round((len(t) - 1) * p))], 1)
print(json.dumps({"target": name, "client": "curl", "requests": len(t), "non_200": len(bad),
                  "p50_us": pick(0.5), "p99_us": pick(0.99)}))' "$name"
}
curl_run "tcp:127.0.0.1:$port" "http://127.0.0.1:$port"
curl_run "unix:$sock" http://localhost --unix-socket "$sock"

kill -TERM "$pid"
wait "$pid" || true
trap 'rm -rf "$dir"' EXIT
if [ -e "$sock" ]; then echo "the socket file is still there after SIGTERM" >&2; exit 1; fi
echo "# SIGTERM: server stopped, $sock removed"
