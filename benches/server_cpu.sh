#!/usr/bin/env bash
# Server CPU per request, from outside (issue 13's standing benchmark).
#
# Starts BINARY (a release tokitai-serve; the demo Nano model unless ARGS
# name a model) on a free loopback port, then for each scenario reads the
# server's own CPU time (its threads' schedstat, in ns) before and after the
# run and divides by the requests answered. Client and server share the machine's
# cores, so throughput alone hides where the time goes; the server's CPU per
# request does not. Every figure is also given as a ratio to the /healthz
# floor (the framework's own cost) measured in the same run, so it survives
# the machine's noise.
#
#   bash benches/server_cpu.sh target/release/tokitai-serve [SECONDS] [-- ARGS...]
#
# Needs wrk (Debian package), python3, and Triton's perf_analyzer (the venv at
# TOKITAI_TRITON_VENV or target/triton-venv, as .ci/run makes it). Scenarios:
# GET /v2/health/live (an empty 200: the framework's own floor) with 64
# connections, with 1, and paced at 200 req/s (what any request costs at
# those loads, which bounds what /infer can reach there); GET /healthz with
# 64 (it lists the loaded models, so it costs more than the floor); POST /infer single-row with 64 connections and with 1;
# one connection paced at 200 req/s (python3 client); binary v2 infer with 64
# connections; gRPC ModelInfer and ModelStreamInfer (perf_analyzer -i grpc
# [--streaming], 64 concurrent calls, one row each as raw_input_contents;
# their request counts come from the server's own metrics). Then a
# perf_analyzer -i grpc concurrency sweep (1, 4, 16, 64).
# The wrk scripts are ../shared/peers/wrk/*.lua.
#
# SERVER_CPU_OTLP=1: the server exports traces (issue 23) to a real OTLP/HTTP
# receiver (tests/otlp_receiver.py, in the venv at TOKITAI_OTEL_VENV or
# target/otel-venv as .ci/run makes it; spans decoded and discarded) with
# TOKITAI_TRACING_SAMPLE_RATIO as set (default 1.0: every request traced);
# the spans dropped are printed at the end. Unset: tracing off (no endpoint).
set -euo pipefail
binary=${1:?usage: server_cpu.sh BINARY [SECONDS] [-- ARGS...]}
seconds=${2:-10}
shift $(( $# >= 2 ? 2 : 1 ))
[ "${1:-}" = "--" ] && shift
here=$(cd "$(dirname "$0")" && pwd)
peers=$(cd "$here/../../shared/peers/wrk" 2>/dev/null && pwd || true)
[ -n "$peers" ] || { echo "missing ../shared/peers/wrk (the wrk scripts)" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 2; }

# SERVER_CPU_GRPC=0: HTTP scenarios only (to compare with a build that has
# no gRPC, such as the issue 13 baseline).
grpc=${SERVER_CPU_GRPC:-1}
venv=${TOKITAI_TRITON_VENV:-$here/../target/triton-venv}
pa="$venv/bin/perf_analyzer"
[ "$grpc" = 0 ] || [ -x "$pa" ] || { echo "no perf_analyzer at $pa (set TOKITAI_TRITON_VENV; see .ci/run)" >&2; exit 2; }
cuda_rt=$(ls -d "$venv"/lib/python*/site-packages/nvidia/cuda_runtime/lib | head -n 1)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
gport=$(free_port)
url="http://127.0.0.1:$port"
grpc_args=()
[ "$grpc" = 0 ] || grpc_args=(--grpc-bind "127.0.0.1:$gport")
receiver=
if [ "${SERVER_CPU_OTLP:-0}" = 1 ]; then
    otel_python=${TOKITAI_OTEL_VENV:-$here/../target/otel-venv}/bin/python
    [ -x "$otel_python" ] || { echo "no $otel_python (set TOKITAI_OTEL_VENV; see .ci/run)" >&2; exit 2; }
    exec 3< <("$otel_python" "$here/../tests/otlp_receiver.py" /dev/null)
    receiver=$!
    read -r -u 3 line
    export TOKITAI_TRACING_OTLP_ENDPOINT="http://127.0.0.1:${line#listening on }/v1/traces"
    echo "== traces exported to $TOKITAI_TRACING_OTLP_ENDPOINT (sample ratio ${TOKITAI_TRACING_SAMPLE_RATIO:-1.0})"
else
    unset TOKITAI_TRACING_OTLP_ENDPOINT
fi
"$binary" --bind "127.0.0.1:$port" "${grpc_args[@]}" "$@" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; [ -z "$receiver" ] || kill "$receiver" 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "$url/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "$url/readyz" >/dev/null || { echo "server not ready" >&2; exit 1; }
# On-CPU nanoseconds of every thread of the server (the first field of each
# /proc/PID/task/*/schedstat). /proc/PID/stat's utime+stime count in 10 ms
# ticks, too coarse for the paced run's 100 us requests; the server's threads
# live as long as it does, so none of their time is lost by summing threads.
cpu_ns() { cat /proc/"$pid"/task/*/schedstat | awk '{s += $1} END {printf "%.0f", s}'; }

# run NAME COMMAND...: the command prints a JSON line with "requests".
# SERVER_CPU_ONLY="live_c64 infer_c64 ...": those scenarios only.
run() {
    local name=$1; shift
    if [ -n "${SERVER_CPU_ONLY:-}" ] && [[ " $SERVER_CPU_ONLY " != *" $name "* ]]; then
        return 0
    fi
    local before after out requests dropped_before
    dropped_before=$(spans_dropped)
    before=$(cpu_ns)
    out=$("$@" | tail -n 1)
    after=$(cpu_ns)
    requests=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$out")
    python3 - "$name" "$requests" "$((after - before))" "$out" "$dropped_before" "$(spans_dropped)" <<'EOF'
import json, sys
name, requests, dns, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
us = dns / 1e3 / max(requests, 1)
row = {"scenario": name, "requests": requests, "rps": round(out.get("rps", 0), 1),
       "p50_us": out.get("p50_us"), "p99_us": out.get("p99_us"), "server_cpu_us_per_request": round(us, 1)}
if sys.argv[5] != "-":
    row["trace_spans_dropped"] = int(float(sys.argv[6]) - float(sys.argv[5]))
print(json.dumps(row))
EOF
}

# tokitai_trace_spans_dropped_total now ("-" with tracing off). Spans still
# queued when a scenario ends are counted in the next one if dropped.
spans_dropped() {
    if [ -z "$receiver" ]; then
        echo -
        return
    fi
    curl -sf "$url/metrics" | awk '/^tokitai_trace_spans_dropped_total/ {print $2; found=1} END {if (!found) print 0}'
}

# paced [PATH]: one connection, 200 requests/s, POST /infer or GET PATH.
paced() {
    python3 - "$port" "$seconds" "${1:-/infer}" <<'EOF'
import http.client, json, random, sys, time
port, seconds, rate, path = int(sys.argv[1]), float(sys.argv[2]), 200.0, sys.argv[3]
random.seed(3)
bodies = [json.dumps({"features": [round(random.gauss(0, 1), 6) for _ in range(96)]}) for _ in range(256)]
c = http.client.HTTPConnection("127.0.0.1", port)
n, lat, start = 0, [], time.perf_counter()
while time.perf_counter() - start < seconds:
    due = start + n / rate
    now = time.perf_counter()
    if due > now:
        time.sleep(due - now)
    t = time.perf_counter()
    if path == "/infer":
        c.request("POST", "/infer", body=bodies[n % 256], headers={"Content-Type": "application/json"})
    else:
        c.request("GET", path)
    r = c.getresponse(); r.read()
    lat.append((time.perf_counter() - t) * 1e6)
    n += 1
lat.sort()
print(json.dumps({"requests": n, "rps": n / (time.perf_counter() - start), "p50_us": int(lat[len(lat) // 2]), "p99_us": int(lat[int(len(lat) * 0.99)])}))
EOF
}

# gRPC inference answers so far (unary OK + streamed OK), from /metrics.
grpc_answered() {
    curl -sf "$url/metrics" | python3 -c '
import sys
n = 0.0
for line in sys.stdin:
    if line.startswith("tokitai_grpc_requests_total{") and "ModelInfer\"" in line and "code=\"OK\"" in line:
        n += float(line.rsplit(" ", 1)[1])
    elif line.startswith("tokitai_grpc_stream_messages_total{") and "code=\"OK\"" in line:
        n += float(line.rsplit(" ", 1)[1])
print(int(n))'
}

# perf_analyzer -i grpc at concurrency 64 (arguments: --streaming or none).
grpc_pa() {
    local before after start out
    before=$(grpc_answered)
    start=$(date +%s.%N)
    out=$(LD_LIBRARY_PATH="$cuda_rt" "$pa" -m tokitai-moe -u "127.0.0.1:$gport" -i grpc "$@" \
        --concurrency-range 64 --measurement-interval $((seconds * 1000 / 3)) --max-trials 3 \
        --stability-percentage 1000 2>&1)
    after=$(grpc_answered)
    python3 - "$((after - before))" "$start" "$(date +%s.%N)" "$out" <<'EOF'
import json, re, sys
n, t0, t1, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if re.search(r"error", out, re.I):
    sys.exit("perf_analyzer reported errors:\n" + out)
p50 = re.search(r"p50 latency: (\d+) usec", out)
p99 = re.search(r"p99 latency: (\d+) usec", out)
print(json.dumps({"requests": n, "rps": n / (t1 - t0), "p50_us": int(p50.group(1)) if p50 else None,
                  "p99_us": int(p99.group(1)) if p99 else None}))
EOF
}

healthz_lua=$(mktemp --suffix=.lua)
cat > "$healthz_lua" <<'EOF'
function done(summary, latency, requests)
  io.write(string.format('{"requests": %d, "rps": %.2f, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99)))
end
EOF
d="${seconds}s"
{
    run live_c64 wrk -t2 -c64 -d"$d" -s "$healthz_lua" "$url/v2/health/live"
    run healthz_c64 wrk -t2 -c64 -d"$d" -s "$healthz_lua" "$url/healthz"
    run live_c1 wrk -t1 -c1 -d"$d" -s "$healthz_lua" "$url/v2/health/live"
    run live_paced_200 paced /v2/health/live
    run infer_c64 wrk -t2 -c64 -d"$d" -s "$peers/infer_json.lua" "$url"
    run infer_c1 wrk -t1 -c1 -d"$d" -s "$peers/infer_json.lua" "$url"
    run infer_paced_200 paced
    run v2_binary_c64 wrk -t2 -c64 -d"$d" -s "$peers/v2_binary.lua" "$url"
    if [ "$grpc" != 0 ]; then
        run grpc_unary_c64 grpc_pa
        run grpc_stream_c64 grpc_pa --streaming
    fi
} | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
by = {r["scenario"]: r["server_cpu_us_per_request"] for r in rows}
def ratio(a, b):
    return round(by[a] / by[b], 2) if a in by and b in by else None
for r in rows:
    r["x_floor"] = ratio(r["scenario"], "live_c64")
    print(json.dumps(r))
print(json.dumps({"checks": {
    "infer_c64 / live_c64 (target <= 1.5)": ratio("infer_c64", "live_c64"),
    "infer_c1 / infer_c64 (target <= 2)": ratio("infer_c1", "infer_c64"),
    "infer_paced_200 / infer_c64 (target <= 3)": ratio("infer_paced_200", "infer_c64"),
    "v2_binary_c64 / infer_c64 (target <= 0.8)": ratio("v2_binary_c64", "infer_c64"),
    "grpc_unary_c64 / infer_c64 (target <= 0.8)": ratio("grpc_unary_c64", "infer_c64"),
    "grpc_stream_c64 / infer_c64 (target <= 0.6)": ratio("grpc_stream_c64", "infer_c64"),
}, "floors": {
    "healthz_c64 / live_c64 (/healthz lists the models: more than the framework)": ratio("healthz_c64", "live_c64"),
    "live_c1 / live_c64 (the framework at one connection)": ratio("live_c1", "live_c64"),
    "live_paced_200 / infer_c64 (the framework paced, against the paced target)": ratio("live_paced_200", "infer_c64"),
    "infer_c1 / live_c1": ratio("infer_c1", "live_c1"),
    "infer_paced_200 / live_paced_200": ratio("infer_paced_200", "live_paced_200"),
}}))'
rm -f "$healthz_lua"
[ -z "$receiver" ] || echo "== tokitai_trace_spans_dropped_total $(spans_dropped)"

# SERVER_CPU_SWEEP=0: no concurrency sweep (the scenarios above only).
[ "$grpc" != 0 ] && [ "${SERVER_CPU_SWEEP:-1}" != 0 ] || exit 0
echo "== perf_analyzer -i grpc concurrency sweep (unary, then --streaming)"
for extra in "" "--streaming"; do
    for c in 1 4 16 64; do
        # shellcheck disable=SC2086
        LD_LIBRARY_PATH="$cuda_rt" "$pa" -m tokitai-moe -u "127.0.0.1:$gport" -i grpc $extra \
            --concurrency-range "$c" --measurement-interval $((seconds * 1000 / 3)) --max-trials 3 \
            --stability-percentage 1000 2>&1 | grep -E '^Concurrency: ' | sed "s/^/grpc${extra:+ $extra}: /"
    done
done
