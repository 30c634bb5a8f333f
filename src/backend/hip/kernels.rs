//! The code objects compiled by build.rs from kernels/*.hip (one multi-arch
//! bundle per source file), embedded in the binary.
//!
//! Owns: the embedding and the kernels' symbol names. Must not touch: their
//! launch (see `launch`).

include!(concat!(env!("OUT_DIR"), "/hip_kernels.rs"));

/// `(code object, kernels it defines)`, in load order.
pub(crate) const MODULES: [(&str, &[u8], &[&str]); 4] = [
    ("gemm", GEMM, &["tk_gemm_bias"]),
    ("layernorm_gelu", LAYERNORM_GELU, &["tk_layernorm_gelu"]),
    ("router", ROUTER, &["tk_router_topk"]),
    ("dispatch", DISPATCH, &["tk_dispatch", "tk_gather_rows", "tk_combine"]),
];
