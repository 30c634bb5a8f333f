#!/usr/bin/env python3
"""Checks tokitai-serve's gRPC service on its Unix socket (grpc.unix_socket)
with Triton's own gRPC client (tritonclient[grpc]).

Usage:
  uds_check.py SOCKET_PATH GRPC_ADDR MODEL

gRPC's C core (grpcio, so tritonclient) sends the socket path,
percent-encoded, as the HTTP/2 :authority of a unix: target, which the
server's HTTP/2 layer (h2) refuses as malformed (the stream is reset with
PROTOCOL_ERROR); the client sets "localhost" instead with the channel
argument grpc.default_authority, as grpc-go and tonic clients do by
themselves. With it: readiness, model metadata, and inference on two rows
bit-identical to the same request over TCP.

Exits non-zero with a message on the first mismatch; prints PASS at the end.
"""
import sys

import numpy as np
import tritonclient.grpc as grpcclient

LOCALHOST = [("grpc.default_authority", "localhost")]


def infer(client, model, rows, width):
    x = (np.arange(rows * width, dtype=np.float32).reshape(rows, width) % 7) / 7.0
    inp = grpcclient.InferInput("features", [rows, width], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp])
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def main():
    path, tcp, model = sys.argv[1], sys.argv[2], sys.argv[3]
    uds = grpcclient.InferenceServerClient(f"unix://{path}", channel_args=LOCALHOST)
    over_tcp = grpcclient.InferenceServerClient(tcp)
    if not uds.is_server_ready():
        sys.exit("not ready over the Unix socket")
    meta = uds.get_model_metadata(model)
    width = int(meta.inputs[0].shape[1])
    a, b = infer(uds, model, 2, width), infer(over_tcp, model, 2, width)
    if sorted(a) != sorted(b) or not a:
        sys.exit(f"outputs differ: {sorted(a)} vs {sorted(b)}")
    for name in a:
        if a[name].tobytes() != b[name].tobytes():
            sys.exit(f"output {name} over the Unix socket differs from TCP's")
    print("PASS")


if __name__ == "__main__":
    main()
