#!/usr/bin/env python3
"""Peak server memory for one maximum-size v2 JSON infer body (issue 11).

Starts BINARY (a release `tokitai-serve`, demo model) on PORT, waits for
/readyz, resets the peak RSS (/proc/PID/clear_refs), posts one v2 JSON body
of just under 16 MiB (server.max_body_bytes) and prints the peak RSS
(VmHWM) as a multiple of the body.

    python3 benches/v2_body_memory.py target/release/tokitai-serve 9321
    python3 benches/v2_body_memory.py target/release/tokitai-serve 9321 8300000

With a third argument N, the body holds N zeros (`0,0,...`: the most values
per byte, past the row limit, so it is refused); without it, 4096 x 96 long
decimals (a valid request at the row limit).
"""
import http.client
import json
import random
import subprocess
import sys
import time

binary, port = sys.argv[1], int(sys.argv[2])
rows, width = 4096, 96
random.seed(1)
if len(sys.argv) > 3:
    vals = ["0"] * int(sys.argv[3])
else:
    vals = ["%.36f" % random.uniform(-1, 1) for _ in range(rows * width)]
data = "[" + ",".join(vals) + "]"
header = {"inputs": [{"name": "features", "shape": [rows, width], "datatype": "FP32", "data": "X"}]}
body = json.dumps(header).replace('"X"', data).encode()
assert len(body) <= 16 * 1024 * 1024, len(body)

server = subprocess.Popen([binary, "--bind", f"127.0.0.1:{port}", "--grpc-bind", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def status():
    out = {}
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


try:
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/readyz")
            r = c.getresponse()
            r.read()
            if r.status == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    base = status()
    with open(f"/proc/{server.pid}/clear_refs", "w") as f:
        f.write("5")
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    start = time.time()
    c.request("POST", "/v2/models/tokitai-moe/infer", body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    r.read()
    seconds = time.time() - start
    peak = status()["VmHWM"]
    mib = len(body) / 2**20
    print(json.dumps({
        "binary": binary, "body_mib": round(mib, 2), "status": r.status, "seconds": round(seconds, 3),
        "rss_before_mib": round(base["VmRSS"], 1), "peak_rss_mib": round(peak, 1),
        "peak_over_body": round((peak - base["VmRSS"]) / mib, 2),
    }))
finally:
    server.terminate()
    server.wait()
