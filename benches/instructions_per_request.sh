#!/usr/bin/env bash
# Instructions the server executes per single-row POST /infer (demo Nano
# model, one worker), counted by callgrind over all its threads: repeatable
# to a few hundred instructions whatever else the machine is doing, so a
# change's cost on the request path can be read without a quiet machine.
#
#   bash benches/instructions_per_request.sh BINARY [OUT_DIR]
#
# Runs the server under `valgrind --tool=callgrind` twice, for 500 and for
# 2500 sequential requests on one keep-alive connection (then SIGTERM), and
# prints (Ir(2500) - Ir(500)) / 2000: start-up and shutdown cancel out. The
# server's settings come from the environment, e.g.
# TOKITAI_TRACING_OTLP_ENDPOINT=http://127.0.0.1:PORT/v1/traces to measure
# tracing (with tests/otlp_receiver.py listening there). Needs valgrind,
# curl and python3. BENCHMARKS.md section 17.
set -euo pipefail
binary=${1:?usage: instructions_per_request.sh BINARY [OUT_DIR]}
out_dir=${2:-$(mktemp -d)}
mkdir -p "$out_dir"

# Total instructions of one run of N requests.
run() {
    local n=$1 out="$out_dir/callgrind-$1.out" port pid
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    valgrind --tool=callgrind --callgrind-out-file="$out" "$binary" --bind "127.0.0.1:$port" \
        --grpc-bind 127.0.0.1:0 --workers 1 >/dev/null 2>"$out.log" &
    pid=$!
    for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.25; done
    python3 - "$port" "$n" <<'PY'
import http.client, json, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
body = json.dumps({"features": [0.25] * 96})
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("POST", "/infer", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
    kill -TERM "$pid"; wait "$pid" || true
    awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

small=$(run 500)
large=$(run 2500)
echo "$binary: Ir(500) $small, Ir(2500) $large, per request $(( (large - small) / 2000 ))"
