#!/usr/bin/env python3
"""Checks tokitai-serve's API keys with Triton's own clients
(tritonclient[http] and tritonclient[grpc]) and their `headers=` arguments.

Usage:
  auth_check.py HTTP_ADDR GRPC_ADDR MODEL IN_DIM KEY OTHER_KEY

KEY has the infer and metadata scopes, OTHER_KEY neither. On both
protocols: the probes answer without a key; inference and model metadata
answer with `Authorization: Bearer KEY` (gRPC: `authorization` metadata),
and the answers of the two protocols are bit-identical; without a key the
client gets 401 / UNAUTHENTICATED, with OTHER_KEY 403 / PERMISSION_DENIED; a
gRPC stream opened with the key serves, one opened without it ends with
UNAUTHENTICATED.

Exits non-zero with a message on the first mismatch; prints PASS at the end.
"""
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def refused(fn, status, what):
    try:
        fn()
    except InferenceServerException as e:
        if str(e.status()) != status:
            fail(f"{what}: got {e.status()} ({e.message()}), expected {status}")
        print(f"{what}: {e.status()}: {e.message()}")
        return
    fail(f"{what}: accepted")


def check_http(addr, model, row, key, other):
    client = httpclient.InferenceServerClient(addr)
    if not (client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)):
        fail("HTTP probes without a key")
    inp = httpclient.InferInput("features", list(row.shape), "FP32")
    inp.set_data_from_numpy(row, binary_data=True)
    auth = {"Authorization": f"Bearer {key}"}
    logits = client.infer(model, [inp], headers=auth).as_numpy("logits")
    if client.get_model_metadata(model, headers=auth)["name"] != model:
        fail("HTTP model metadata with the key")
    refused(lambda: client.infer(model, [inp]), "401", "HTTP infer without a key")
    refused(lambda: client.infer(model, [inp], headers={"Authorization": f"Bearer {other}"}), "403",
            "HTTP infer with a key without the scope")
    refused(lambda: client.get_model_metadata(model), "401", "HTTP model metadata without a key")
    print("HTTP: probes open, infer and metadata with the key: ok")
    return logits


def stream_once(client, model, inp, headers):
    """One request on a stream opened with `headers`: (result, error)."""
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    try:
        client.async_stream_infer(model, [inp], request_id="s1")
    except InferenceServerException as e:
        # The stream was already refused: its error comes to the callback.
        print(f"stream ended before its request was sent: {e.message()}")
    answer = answers.get(timeout=60)
    client.stop_stream()
    return answer


def check_grpc(addr, model, row, key, other, http_logits):
    client = grpcclient.InferenceServerClient(addr)
    if not (client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)):
        fail("gRPC probes without a key")
    inp = grpcclient.InferInput("features", list(row.shape), "FP32")
    inp.set_data_from_numpy(row)
    auth = {"authorization": f"Bearer {key}"}
    logits = client.infer(model, [inp], headers=auth).as_numpy("logits")
    if logits.tobytes() != http_logits.tobytes():
        fail("gRPC and HTTP answers differ")
    if client.get_model_metadata(model, headers=auth).name != model:
        fail("gRPC model metadata with the key")
    refused(lambda: client.infer(model, [inp]), "StatusCode.UNAUTHENTICATED", "gRPC infer without a key")
    refused(lambda: client.infer(model, [inp], headers={"authorization": f"Bearer {other}"}),
            "StatusCode.PERMISSION_DENIED", "gRPC infer with a key without the scope")
    refused(lambda: client.get_model_metadata(model), "StatusCode.UNAUTHENTICATED",
            "gRPC model metadata without a key")
    result, error = stream_once(client, model, inp, auth)
    if error is not None or result.as_numpy("logits").tobytes() != http_logits.tobytes():
        fail(f"a stream opened with the key: {error}")
    result, error = stream_once(client, model, inp, None)
    if error is None or str(error.status()) != "StatusCode.UNAUTHENTICATED":
        fail(f"a stream opened without a key: {result}, {error}")
    print(f"stream without a key: {error.status()}: {error.message()}")
    print("gRPC: probes open, infer, metadata and a stream with the key: ok")


def main():
    http_addr, grpc_addr, model, in_dim, key, other = sys.argv[1:7]
    row = np.full((1, int(in_dim)), 0.25, dtype=np.float32)
    http_logits = check_http(http_addr, model, row, key, other)
    check_grpc(grpc_addr, model, row, key, other, http_logits)
    print("PASS")


if __name__ == "__main__":
    main()
