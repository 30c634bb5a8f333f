#!/usr/bin/env python3
"""Accuracy against the float64 reference, on the peers' own weights, for
`cargo bench --bench peers -- --accuracy` (which runs both subcommands itself).

  accuracy.py export --peers PEERS_DIR --size tiny --out D [--rows 256] [--seed 0] [--input-seed 7]
      D/arch.json + D/checkpoint.tkp1: ort_moe.make_weights(H, depth, seed) in the engine's
      format (TKP1 v1, weights transposed to [out, in], no optimizer state; run it with
      LayerNorm mode "stored": the peers apply the stored gamma/beta);
      D/inputs.f32 [rows, 96] (seeded standard normal), D/ref_logits.f64 [rows, 20] (the
      float64 reference, ort_moe.reference), D/ref_top2.i32 [rows, 2] (the reference's two
      experts, by descending router probability, ties to the lower index); D/meta.json.
      All raw files little-endian, row-major.
  accuracy.py peers --peers PEERS_DIR --size tiny --dir D [--bf16] [--threads 2]
      one JSON line per runtime on D's inputs: ONNX Runtime f32, OpenVINO f32 and (--bf16)
      OpenVINO bf16, each with max and mean |logit error| (and the max over the rows whose
      top-2 experts match the reference's), argmax and top-2 agreement.
      The top-2 experts are read from the graph's own TopK (added as a second output).
"""
import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import numpy as np


def load_peer(peers_dir):
    sys.path.insert(0, os.path.abspath(peers_dir))
    import ort_moe as om  # noqa: E402 - found through --peers

    return om


def ref_top2(om, W, x):
    logits = x.astype(np.float64) @ W["router_w"].astype(np.float64) + W["router_b"]
    return np.argsort(-logits, axis=-1, kind="stable")[:, : om.TOP_K].astype(np.int32)


def engine_tensors(om, W, depth):
    """The checkpoint's records in order: (name, [out, in] or vector)."""
    out = [("router.param_0", W["router_w"].T), ("router.param_1", W["router_b"])]
    for e in range(om.N_EXPERTS):
        i = 0
        for l in range(depth + 1):
            for t in (W[f"e{e}_l{l}_w"].T, W[f"e{e}_l{l}_b"], W[f"e{e}_l{l}_g"], W[f"e{e}_l{l}_beta"]):
                out.append((f"expert_{e}.param_{i}", t))
                i += 1
        for t in (W[f"e{e}_out_w"].T, W[f"e{e}_out_b"]):
            out.append((f"expert_{e}.param_{i}", t))
            i += 1
    return out


def write_tkp1(path, records, config):
    with open(path, "wb") as f:
        f.write(b"TKP1" + struct.pack("<III", 1, 0, len(records)))
        c = config.encode()
        f.write(struct.pack("<I", len(c)) + c)
        for name, t in records:
            n = name.encode()
            a = np.ascontiguousarray(t, dtype="<f4")
            f.write(struct.pack("<I", len(n)) + n + struct.pack("<I", a.size))
            f.write(a.tobytes())
            # m_len 0, v_len 0, param_step 0, has_grad 0
            f.write(struct.pack("<IIIB", 0, 0, 0, 0))


def export(a):
    om = load_peer(a.peers)
    H, depth = om.SIZES[a.size]
    t0 = time.perf_counter()
    W = om.make_weights(H, depth, a.seed)
    os.makedirs(a.out, exist_ok=True)
    arch = {"size": a.size.capitalize(), "input_dim": om.IN_DIM, "hidden_dim": H, "output_dim": om.OUT_DIM,
            "n_experts": om.N_EXPERTS, "top_k": om.TOP_K, "expert_depth": depth, "seed": a.seed,
            "model_kind": "MoE", "router_kind": "SoftmaxOnly"}
    with open(os.path.join(a.out, "arch.json"), "w") as f:
        json.dump(arch, f, indent=2)
    config = json.dumps({"source": "ort_moe.make_weights", "size": a.size, "seed": a.seed})
    write_tkp1(os.path.join(a.out, "checkpoint.tkp1"), engine_tensors(om, W, depth), config)
    x = np.random.default_rng(a.input_seed).standard_normal((a.rows, om.IN_DIM), dtype=np.float32)
    ref = om.reference(W, x, depth)
    x.astype("<f4").tofile(os.path.join(a.out, "inputs.f32"))
    ref.astype("<f8").tofile(os.path.join(a.out, "ref_logits.f64"))
    ref_top2(om, W, x).astype("<i4").tofile(os.path.join(a.out, "ref_top2.i32"))
    meta = {"size": a.size, "hidden": H, "depth": depth, "weight_seed": a.seed, "input_seed": a.input_seed,
            "rows": a.rows, "max_abs_ref": float(np.max(np.abs(ref))), "layer_norm": "stored"}
    # meta.json last: its presence means the export is complete.
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(f"# exported {a.size} to {a.out} in {time.perf_counter() - t0:.1f}s", flush=True)


def metrics(got, got_top2, ref, rtop2):
    err = np.abs(got.astype(np.float64) - ref)
    same_top2 = np.all(np.sort(got_top2, 1) == np.sort(rtop2, 1), axis=1)
    same = err[same_top2]
    return {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
            "max_abs_err_same_top2": float(same.max()) if same.size else 0.0,
            "argmax_agree": float(np.mean(np.argmax(got, 1) == np.argmax(ref, 1))),
            "top2_agree": float(np.mean(same_top2)), "rows": int(ref.shape[0])}


def peers(a):
    om = load_peer(a.peers)
    H, depth = om.SIZES[a.size]
    meta = json.load(open(os.path.join(a.dir, "meta.json")))
    rows = meta["rows"]
    x = np.fromfile(os.path.join(a.dir, "inputs.f32"), dtype="<f4").reshape(rows, om.IN_DIM)
    ref = np.fromfile(os.path.join(a.dir, "ref_logits.f64"), dtype="<f8").reshape(rows, om.OUT_DIM)
    rtop2 = np.fromfile(os.path.join(a.dir, "ref_top2.i32"), dtype="<i4").reshape(rows, om.TOP_K)
    W = om.make_weights(H, depth, meta["weight_seed"])
    from onnx import TensorProto, helper
    import onnx

    model = om.build_model(W, depth, "topk", "op")
    del W
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    model.graph.output.append(helper.make_tensor_value_info(topk.output[1], TensorProto.INT64, ["N", om.TOP_K]))
    tmp = tempfile.mkdtemp(prefix="acc_", dir=a.dir)
    try:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=a.size != "nano", all_tensors_to_one_file=True,
                        location="model.data")
        del model

        def emit(runtime, precision, got, got_top2, version):
            r = metrics(got, got_top2, ref, rtop2)
            r.update(kind="accuracy", size=a.size, runtime=runtime, precision=precision, version=version,
                     max_abs_ref=meta["max_abs_ref"])
            print(json.dumps(r), flush=True)

        import onnxruntime as ort
        sess = om.make_session(path, a.threads)
        y, idx = sess.run(["y", topk.output[1]], {"x": x})
        emit("onnxruntime", "f32", y, idx, ort.__version__)
        del sess
        import openvino as ov

        core = ov.Core()
        m = core.read_model(path)
        for prec in ["f32"] + (["bf16"] if a.bf16 else []):
            cm = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": a.threads, "PERFORMANCE_HINT": "LATENCY",
                                               "INFERENCE_PRECISION_HINT": prec})
            res = cm.create_infer_request().infer({"x": x})
            emit("openvino", prec, res[cm.output(0)], res[cm.output(1)], ov.__version__)
            del cm
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--peers", required=True)
    e.add_argument("--size", default="tiny")
    e.add_argument("--out", required=True)
    e.add_argument("--rows", type=int, default=256)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--input-seed", type=int, default=7)
    q = sub.add_parser("peers")
    q.add_argument("--peers", required=True)
    q.add_argument("--size", default="tiny")
    q.add_argument("--dir", required=True)
    q.add_argument("--bf16", action="store_true")
    q.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    export(a) if a.cmd == "export" else peers(a)


if __name__ == "__main__":
    main()
