#!/usr/bin/env python3
"""Checks tokitai-serve's Open Inference Protocol routes with Triton's own
client library (tritonclient[http]).

Usage: client_check.py URL MODEL FIXTURE_DIR LOGITS_KEY

Server and model readiness, model metadata and config, then inference on the
fixture's 64 input rows in JSON and in binary mode, compared with the
fixture's expected outputs (shapes from the fixture's arch.json) (`LOGITS_KEY` is `logits_ln_identity` or `logits`
depending on the server's LayerNorm mode). Exits non-zero with a message on
the first mismatch.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def main():
    url, model, fixture_dir, logits_key = sys.argv[1:5]
    expected = json.load(open(f"{fixture_dir}/expected.json"))
    arch = json.load(open(f"{fixture_dir}/arch.json"))
    in_dim, out_dim, n_experts = arch["input_dim"], arch["output_dim"], arch["n_experts"]
    inputs = np.asarray(expected["inputs"], dtype=np.float32)
    want_logits = np.asarray(expected[logits_key], dtype=np.float32)
    want_router = np.asarray(expected["router_weights"], dtype=np.float32)

    client = httpclient.InferenceServerClient(url=url)
    if not client.is_server_live():
        fail("server not live")
    if not client.is_server_ready():
        fail("server not ready")
    if not client.is_model_ready(model):
        fail(f"model {model} not ready")
    meta = client.get_model_metadata(model)
    if meta["name"] != model or meta["inputs"][0]["name"] != "features":
        fail(f"unexpected metadata {meta}")
    if [o["name"] for o in meta["outputs"]] != ["logits", "router_weights"]:
        fail(f"unexpected outputs {meta['outputs']}")
    config = client.get_model_config(model)
    if config.get("max_batch_size", 0) < 64:
        fail(f"unexpected config {config}")
    try:
        client.get_model_metadata("no-such-model")
        fail("unknown model accepted")
    except InferenceServerException as e:
        print(f"unknown model rejected: {e.status()} {e.message()}")

    for binary in (False, True):
        for batch in (inputs[:1], inputs[:17], inputs):
            inp = httpclient.InferInput("features", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch, binary_data=binary)
            outs = [httpclient.InferRequestedOutput("logits", binary_data=binary),
                    httpclient.InferRequestedOutput("router_weights", binary_data=binary)]
            result = client.infer(model, [inp], outputs=outs, request_id="check-1")
            n = batch.shape[0]
            logits = result.as_numpy("logits")
            router = result.as_numpy("router_weights")
            if logits.shape != (n, out_dim) or router.shape != (n, n_experts):
                fail(f"shapes {logits.shape} {router.shape} for batch {n}")
            dl = float(np.max(np.abs(logits - want_logits[:n])))
            dr = float(np.max(np.abs(router - want_router[:n])))
            if dl > 2e-5 or dr > 1e-6:
                fail(f"binary={binary} batch={n}: max |logit diff| {dl}, router {dr}")
            if result.get_response()["id"] != "check-1":
                fail("request id not echoed")
            print(f"binary={binary} batch={n}: max |logit diff| {dl:.2e}, router {dr:.2e}: ok")

    # A malformed request gets the protocol's error body and a 400.
    bad = httpclient.InferInput("features", [1, in_dim - 1], "FP32")
    bad.set_data_from_numpy(np.zeros((1, in_dim - 1), dtype=np.float32), binary_data=True)
    try:
        client.infer(model, [bad])
        fail(f"{in_dim - 1} features accepted")
    except InferenceServerException as e:
        if "shape" not in e.message():
            fail(f"unexpected error for a bad shape: {e.message()}")
        print(f"bad shape rejected: {e.message()}")
    print("PASS")


if __name__ == "__main__":
    main()
