#!/usr/bin/env python3
"""Checks tokitai-serve's gRPC service with Triton's own gRPC client
(tritonclient[grpc]).

Usage:
  grpc_check.py GRPC_ADDR HTTP_ADDR MODEL FIXTURE_DIR LOGITS_KEY
  grpc_check.py --deadline GRPC_ADDR MODEL IN_DIM

The first form: liveness, readiness, server and model metadata, model config,
inference on the fixture's rows (1, 17 and 64 at once) within the core
tolerances and bit-identical to HTTP /infer and to /v2 binary answers for the
same rows, requested outputs in the order asked, the request id echoed,
async_stream_infer with 64 requests on one stream, a malformed request getting
INVALID_ARGUMENT, and the statistics extension counting what was served.

The second form (a server that holds partial batches far longer than the
deadline): a request whose deadline passes gets DEADLINE_EXCEEDED, and the
server still answers afterwards.

Exits non-zero with a message on the first mismatch; prints PASS at the end.
"""
import json
import queue
import sys
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

LOGIT_TOL, ROUTER_TOL = 2e-5, 1e-6


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def features(batch):
    inp = grpcclient.InferInput("features", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    return inp


def http_infer(http_addr, batch):
    """The same rows through the sidecar route POST /infer (JSON)."""
    body = json.dumps({"features": batch.tolist()}).encode()
    req = urllib.request.Request(f"http://{http_addr}/infer", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.load(r)
    return (np.asarray(answer["logits"], dtype=np.float32),
            np.asarray(answer["router_weights"], dtype=np.float32))


def expect_code(fn, code, what):
    try:
        fn()
    except InferenceServerException as e:
        if e.status() != code:
            fail(f"{what}: got {e.status()} ({e.message()}), expected {code}")
        print(f"{what}: {e.status()}: {e.message()}")
        return
    fail(f"{what}: accepted")


def check_control(client, model, in_dim, out_dim, n_experts):
    if not client.is_server_live():
        fail("server not live")
    if not client.is_server_ready():
        fail("server not ready")
    if not client.is_model_ready(model):
        fail(f"model {model} not ready")
    meta = client.get_server_metadata(as_json=True)
    if "statistics" not in meta.get("extensions", []):
        fail(f"server metadata {meta}")
    meta = client.get_model_metadata(model, as_json=True)
    if meta["name"] != model or meta["inputs"][0]["name"] != "features" \
            or meta["inputs"][0]["shape"] != ["-1", str(in_dim)]:
        fail(f"unexpected metadata {meta}")
    if [o["name"] for o in meta["outputs"]] != ["logits", "router_weights"]:
        fail(f"unexpected outputs {meta['outputs']}")
    config = client.get_model_config(model, as_json=True)["config"]
    want = {"name": "features", "data_type": "TYPE_FP32", "dims": [str(in_dim)]}
    if int(config.get("max_batch_size", 0)) < 64 or config["input"][0] != want:
        fail(f"unexpected config {config}")
    if config["output"][1] != {"name": "router_weights", "data_type": "TYPE_FP32", "dims": [str(n_experts)]}:
        fail(f"unexpected config outputs {config['output']}")
    expect_code(lambda: client.get_model_metadata("no-such-model"), "StatusCode.NOT_FOUND", "unknown model")


def check_inference(client, http, http_addr, model, inputs, want_logits, want_router):
    for batch in (inputs[:1], inputs[:17], inputs):
        n = batch.shape[0]
        outs = [grpcclient.InferRequestedOutput("router_weights"), grpcclient.InferRequestedOutput("logits")]
        result = client.infer(model, [features(batch)], outputs=outs, request_id=f"grpc-{n}")
        logits, router = result.as_numpy("logits"), result.as_numpy("router_weights")
        names = [o.name for o in result.get_response().outputs]
        if names != ["router_weights", "logits"]:
            fail(f"outputs not in the order asked: {names}")
        if result.get_response().id != f"grpc-{n}":
            fail("request id not echoed")
        dl = float(np.max(np.abs(logits - want_logits[:n])))
        dr = float(np.max(np.abs(router - want_router[:n])))
        if dl > LOGIT_TOL or dr > ROUTER_TOL:
            fail(f"batch={n}: max |logit diff| {dl}, router {dr}")
        h_logits, h_router = http_infer(http_addr, batch)
        if not (np.array_equal(logits, h_logits) and np.array_equal(router, h_router)):
            fail(f"batch={n}: gRPC and HTTP /infer answers differ")
        inp = httpclient.InferInput("features", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=True)
        v2 = http.infer(model, [inp])
        if v2.as_numpy("logits").tobytes() != logits.tobytes() \
                or v2.as_numpy("router_weights").tobytes() != router.tobytes():
            fail(f"batch={n}: gRPC and HTTP /v2 binary answers differ")
        print(f"batch={n}: max |logit diff| {dl:.2e}, router {dr:.2e}; bit-identical to HTTP: ok")


def check_stream(client, model, inputs, want_logits):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(64):
        client.async_stream_infer(model, [features(inputs[i:i + 1])], request_id=str(i))
    # One malformed request in the stream: an error message, the stream stays open.
    bad = grpcclient.InferInput("features", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    client.async_stream_infer(model, [bad], request_id="bad")
    client.async_stream_infer(model, [features(inputs[:1])], request_id="after-bad")
    seen, errors = set(), []
    for _ in range(66):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors.append(error)
            continue
        rid = result.get_response().id
        row = 0 if rid == "after-bad" else int(rid)
        d = float(np.max(np.abs(result.as_numpy("logits")[0] - want_logits[row])))
        if d > LOGIT_TOL:
            fail(f"stream request {rid}: max |logit diff| {d}")
        seen.add(rid)
    client.stop_stream()
    if len(seen) != 65 or len(errors) != 1 or "shape" not in str(errors[0]):
        fail(f"stream: {len(seen)} answers, errors {errors}")
    print(f"stream: 64 requests answered on one stream, and the malformed one: {errors[0]}")


def main_check(grpc_addr, http_addr, model, fixture_dir, logits_key):
    expected = json.load(open(f"{fixture_dir}/expected.json"))
    arch = json.load(open(f"{fixture_dir}/arch.json"))
    in_dim, out_dim, n_experts = arch["input_dim"], arch["output_dim"], arch["n_experts"]
    inputs = np.asarray(expected["inputs"], dtype=np.float32)
    want_logits = np.asarray(expected[logits_key], dtype=np.float32)
    want_router = np.asarray(expected["router_weights"], dtype=np.float32)
    client = grpcclient.InferenceServerClient(url=grpc_addr)
    http = httpclient.InferenceServerClient(url=http_addr)
    check_control(client, model, in_dim, out_dim, n_experts)
    check_inference(client, http, http_addr, model, inputs, want_logits, want_router)
    check_stream(client, model, inputs, want_logits)
    bad = grpcclient.InferInput("features", [1, in_dim - 1], "FP32")
    bad.set_data_from_numpy(np.zeros((1, in_dim - 1), dtype=np.float32))
    expect_code(lambda: client.infer(model, [bad]), "StatusCode.INVALID_ARGUMENT", "bad shape")
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    if int(stats["inference_count"]) < 1 + 17 + 64 + 65 or int(stats["execution_count"]) < 1:
        fail(f"statistics {stats}")
    print(f"statistics: {stats['inference_count']} rows, {stats['execution_count']} batches")
    print("PASS")


def deadline_check(grpc_addr, model, in_dim):
    client = grpcclient.InferenceServerClient(url=grpc_addr)
    row = np.zeros((1, in_dim), dtype=np.float32)
    expect_code(lambda: client.infer(model, [features(row)], client_timeout=0.05),
                "StatusCode.DEADLINE_EXCEEDED", "passed deadline")
    # The server still answers (the held batch goes after its delay).
    result = client.infer(model, [features(row)], client_timeout=30)
    if result.as_numpy("logits").shape[0] != 1:
        fail("no answer after the deadline test")
    print("PASS")


if __name__ == "__main__":
    if sys.argv[1] == "--deadline":
        deadline_check(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main_check(*sys.argv[1:6])
