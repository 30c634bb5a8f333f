// CUDA harness for kernels/*.hip: compiles the very same kernel sources with
// nvcc (via hip_compat.h), runs every kernel and the whole sparse forward on
// the public fixtures, and compares against the CPU backend's outputs written
// by `cargo run --example dump_hip_harness_data` (.harness-data/).
//
// Owns: the device-side checks (PASS/FAIL line per check, non-zero exit on
// any failure). Must not touch: the kernels (it includes them unchanged).
//
// The forward here mirrors src/backend/hip/forward.rs step for step (router,
// device-side dispatch, per expert gather -> GEMM+bias -> LN+GELU chain ->
// output GEMM, combine in expert index order), so it checks the kernels and
// the launch plan; the Rust HIP layer itself needs an AMD GPU.

#include <hip/hip_runtime.h>

#include "../../kernels/dispatch.hip"
#include "../../kernels/gemm.hip"
#include "../../kernels/layernorm_gelu.hip"
#include "../../kernels/router.hip"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#define CHECK(call)                                                                                 \
    do {                                                                                            \
        cudaError_t err_ = (call);                                                                  \
        if (err_ != cudaSuccess) {                                                                  \
            std::fprintf(stderr, "FAIL cuda %s: %s (%s:%d)\n", #call, cudaGetErrorString(err_),    \
                         __FILE__, __LINE__);                                                       \
            std::exit(2);                                                                           \
        }                                                                                           \
    } while (0)

static int g_failures = 0;
static int g_checks = 0;

static void report(bool ok, const std::string& what, const std::string& detail) {
    ++g_checks;
    if (!ok) ++g_failures;
    std::printf("%s %s: %s\n", ok ? "PASS" : "FAIL", what.c_str(), detail.c_str());
    std::fflush(stdout);
}

template <typename T>
static std::vector<T> read_raw(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) {
        std::fprintf(stderr, "FAIL missing %s (run: cargo run --example dump_hip_harness_data)\n", path.c_str());
        std::exit(2);
    }
    const size_t bytes = (size_t)f.tellg();
    std::vector<T> v(bytes / sizeof(T));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), (std::streamsize)bytes);
    return v;
}

template <typename T>
static T* upload(const std::vector<T>& v) {
    T* d = nullptr;
    CHECK(cudaMalloc(&d, std::max<size_t>(v.size(), 1) * sizeof(T)));
    if (!v.empty()) CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

template <typename T>
static std::vector<T> download(const T* d, size_t n) {
    std::vector<T> v(n);
    if (n) CHECK(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

template <typename T>
static T* alloc(size_t n) {
    T* d = nullptr;
    CHECK(cudaMalloc(&d, std::max<size_t>(n, 1) * sizeof(T)));
    CHECK(cudaMemset(d, 0, std::max<size_t>(n, 1) * sizeof(T)));
    return d;
}

static double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return INFINITY;
    double m = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double d = std::fabs((double)a[i] - (double)b[i]);
        if (!(d <= m)) m = d;  // NaN propagates as a failure
    }
    return m;
}

static std::string fmt(const char* f, double v) {
    char buf[128];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}

struct Dims {
    int input, hidden, output, experts, top_k, blocks, rows;
};

struct Layer {
    float *w, *b, *gamma, *beta;
    int n, k;
};

struct Model {
    Dims d;
    float *router_w, *router_b;
    std::vector<std::vector<Layer>> blocks;  // [expert][block]
    std::vector<Layer> out;                  // [expert]
};

struct Fixture {
    std::string name, dir;
    Dims d;
    Model model;
    std::vector<float> input;
    std::vector<unsigned> strict;
};

static Dims read_meta(const std::string& dir) {
    std::ifstream f(dir + "/meta.txt");
    if (!f) {
        std::fprintf(stderr, "FAIL missing %s/meta.txt (run: cargo run --example dump_hip_harness_data)\n", dir.c_str());
        std::exit(2);
    }
    std::map<std::string, int> kv;
    std::string k;
    int v;
    while (f >> k >> v) kv[k] = v;
    return Dims{kv["input"], kv["hidden"], kv["output"], kv["experts"], kv["top_k"], kv["blocks"], kv["rows"]};
}

static Fixture load(const std::string& root, const std::string& name) {
    Fixture fx;
    fx.name = name;
    fx.dir = root + "/" + name;
    fx.d = read_meta(fx.dir);
    const Dims& d = fx.d;
    Model& m = fx.model;
    m.d = d;
    m.router_w = upload(read_raw<float>(fx.dir + "/router_w.f32"));
    m.router_b = upload(read_raw<float>(fx.dir + "/router_b.f32"));
    for (int e = 0; e < d.experts; ++e) {
        std::vector<Layer> bl;
        for (int l = 0; l < d.blocks; ++l) {
            const std::string p = fx.dir + "/e" + std::to_string(e) + "_b" + std::to_string(l);
            bl.push_back(Layer{upload(read_raw<float>(p + "_w.f32")), upload(read_raw<float>(p + "_bias.f32")),
                               upload(read_raw<float>(p + "_gamma.f32")), upload(read_raw<float>(p + "_beta.f32")),
                               d.hidden, l == 0 ? d.input : d.hidden});
        }
        m.blocks.push_back(bl);
        const std::string p = fx.dir + "/e" + std::to_string(e) + "_out";
        m.out.push_back(Layer{upload(read_raw<float>(p + "_w.f32")), upload(read_raw<float>(p + "_bias.f32")), nullptr,
                              nullptr, d.output, d.hidden});
    }
    fx.input = read_raw<float>(fx.dir + "/input.f32");
    fx.strict = read_raw<unsigned>(fx.dir + "/top_k_strict.u32");
    return fx;
}

struct Output {
    std::vector<float> logits, weights, probs;
    std::vector<unsigned> top_k;
};

static unsigned blocks_for(long n, int per) { return (unsigned)((n + per - 1) / per); }

// The whole forward on n rows, as the Rust HipSession launches it.
static Output forward(const Model& m, bool stored, const std::vector<float>& input) {
    const Dims& d = m.d;
    const int n = (int)(input.size() / d.input);
    const int cap = n;
    float* x = upload(input);
    float* probs = alloc<float>((size_t)n * d.experts);
    float* weights = alloc<float>((size_t)n * d.experts);
    unsigned* sel = alloc<unsigned>((size_t)n * d.top_k);
    int* counts = alloc<int>(d.experts);
    int* rows = alloc<int>((size_t)d.experts * cap);
    int* pos = alloc<int>((size_t)n * d.experts);
    float* gathered = alloc<float>((size_t)cap * d.input);
    float* act[2] = {alloc<float>((size_t)cap * d.hidden), alloc<float>((size_t)cap * d.hidden)};
    float* y = alloc<float>((size_t)d.experts * cap * d.output);
    float* logits = alloc<float>((size_t)n * d.output);

    tk_router_topk<<<blocks_for(n, TK_ROUTER_THREADS), TK_ROUTER_THREADS>>>(
        x, m.router_w, m.router_b, n, d.input, d.experts, d.top_k, probs, weights, sel);
    tk_dispatch<<<d.experts, TK_DISPATCH_THREADS>>>(sel, n, d.experts, d.top_k, cap, counts, rows, pos);
    for (int e = 0; e < d.experts; ++e) {
        tk_gather_rows<<<n, 128>>>(x, rows, counts, e, cap, d.input, gathered);
        const float* src = gathered;
        for (int l = 0; l < d.blocks; ++l) {
            const Layer& L = m.blocks[e][l];
            float* dst = act[l % 2];
            dim3 grid(blocks_for(L.n, TK_GEMM_TILE_N), blocks_for(n, TK_GEMM_TILE_M));
            tk_gemm_bias<<<grid, TK_GEMM_THREADS>>>(src, L.w, L.b, dst, counts + e, L.n, L.k);
            tk_layernorm_gelu<<<n, TK_LN_THREADS>>>(dst, counts + e, L.n, stored ? L.gamma : nullptr,
                                                     stored ? L.beta : nullptr);
            src = dst;
        }
        const Layer& O = m.out[e];
        dim3 grid(blocks_for(O.n, TK_GEMM_TILE_N), blocks_for(n, TK_GEMM_TILE_M));
        tk_gemm_bias<<<grid, TK_GEMM_THREADS>>>(src, O.w, O.b, y + (size_t)e * cap * d.output, counts + e, O.n, O.k);
    }
    tk_combine<<<blocks_for((long)n * d.output, 256), 256>>>(y, weights, pos, n, d.experts, d.output, cap, logits);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    Output o;
    o.logits = download(logits, (size_t)n * d.output);
    o.weights = download(weights, (size_t)n * d.experts);
    o.probs = download(probs, (size_t)n * d.experts);
    o.top_k = download(sel, (size_t)n * d.top_k);
    for (void* p : std::vector<void*>{x, probs, weights, sel, counts, rows, pos, gathered, act[0], act[1], y, logits})
        CHECK(cudaFree(p));
    return o;
}

static void check_router(const Fixture& fx) {
    const Dims& d = fx.d;
    const int n = d.rows;
    float* x = upload(fx.input);
    float* probs = alloc<float>((size_t)n * d.experts);
    float* weights = alloc<float>((size_t)n * d.experts);
    unsigned* sel = alloc<unsigned>((size_t)n * d.top_k);
    tk_router_topk<<<blocks_for(n, TK_ROUTER_THREADS), TK_ROUTER_THREADS>>>(
        x, fx.model.router_w, fx.model.router_b, n, d.input, d.experts, d.top_k, probs, weights, sel);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    const auto p = download(probs, (size_t)n * d.experts);
    const auto w = download(weights, (size_t)n * d.experts);
    const auto s = download(sel, (size_t)n * d.top_k);
    const double dp = max_abs_diff(p, read_raw<float>(fx.dir + "/ref_router_probs.f32"));
    report(dp <= 1e-6, fx.name + " router probs vs f64 softmax", fmt("max |diff| %.3e (tol 1e-6)", dp));
    const double dw = max_abs_diff(w, read_raw<float>(fx.dir + "/cpu_identity_router_weights.f32"));
    report(dw <= 1e-6, fx.name + " router weights vs CPU", fmt("max |diff| %.3e (tol 1e-6)", dw));
    const auto want = read_raw<unsigned>(fx.dir + "/cpu_identity_top_k.u32");
    int bad = 0, compared = 0;
    for (int r = 0; r < n; ++r) {
        if (!fx.strict[r]) continue;
        ++compared;
        for (int t = 0; t < d.top_k; ++t) bad += s[(size_t)r * d.top_k + t] != want[(size_t)r * d.top_k + t];
    }
    report(bad == 0, fx.name + " router top-k vs CPU (strict rows)",
           std::to_string(compared) + " rows compared, " + std::to_string(bad) + " mismatches");
    // Dispatch on the router's selection: lists ascending, pos consistent.
    int* counts = alloc<int>(d.experts);
    int* rows = alloc<int>((size_t)d.experts * n);
    int* pos = alloc<int>((size_t)n * d.experts);
    tk_dispatch<<<d.experts, TK_DISPATCH_THREADS>>>(sel, n, d.experts, d.top_k, n, counts, rows, pos);
    CHECK(cudaDeviceSynchronize());
    const auto c = download(counts, d.experts);
    const auto rl = download(rows, (size_t)d.experts * n);
    const auto pl = download(pos, (size_t)n * d.experts);
    bool ok = true;
    for (int e = 0; e < d.experts; ++e) {
        int i = 0;
        for (int r = 0; r < n; ++r) {
            bool chosen = false;
            for (int t = 0; t < d.top_k; ++t) chosen |= s[(size_t)r * d.top_k + t] == (unsigned)e;
            if (chosen) {
                ok &= rl[(size_t)e * n + i] == r && pl[(size_t)r * d.experts + e] == i;
                ++i;
            } else {
                ok &= pl[(size_t)r * d.experts + e] == -1;
            }
        }
        ok &= c[e] == i;
    }
    report(ok, fx.name + " dispatch lists/positions/counts", ok ? "exact" : "mismatch");
    for (void* q : std::vector<void*>{x, probs, weights, sel, counts, rows, pos}) CHECK(cudaFree(q));
}

static void check_block0(const Fixture& fx) {
    const Dims& d = fx.d;
    const int n = d.rows;
    const Layer& L = fx.model.blocks[0][0];
    float* x = upload(fx.input);
    float* z = alloc<float>((size_t)n * d.hidden);
    int* m = upload(std::vector<int>{n});
    dim3 grid(blocks_for(L.n, TK_GEMM_TILE_N), blocks_for(n, TK_GEMM_TILE_M));
    tk_gemm_bias<<<grid, TK_GEMM_THREADS>>>(x, L.w, L.b, z, m, L.n, L.k);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    const auto got = download(z, (size_t)n * d.hidden);
    const auto ref = read_raw<float>(fx.dir + "/ref_e0_gemm0.f32");
    const double dz = max_abs_diff(got, ref);
    size_t same = 0;
    for (size_t i = 0; i < got.size() && i < ref.size(); ++i) same += std::memcmp(&got[i], &ref[i], 4) == 0;
    report(dz <= 1e-5, fx.name + " gemm+bias (expert 0 block 0, 64 rows)",
           fmt("max |diff| %.3e (tol 1e-5)", dz) + ", " + std::to_string(same) + "/" + std::to_string(got.size()) +
               " bit-identical to the ascending fma chain");
    for (int stored = 0; stored < 2; ++stored) {
        float* a = upload(ref);
        tk_layernorm_gelu<<<n, TK_LN_THREADS>>>(a, m, d.hidden, stored ? L.gamma : nullptr, stored ? L.beta : nullptr);
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        const auto h = download(a, (size_t)n * d.hidden);
        const std::string mode = stored ? "stored" : "identity";
        const double dh = max_abs_diff(h, read_raw<float>(fx.dir + "/ref_e0_lngelu0_" + mode + ".f32"));
        report(dh <= 1e-5, fx.name + " layernorm+gelu " + mode + " vs f64", fmt("max |diff| %.3e (tol 1e-5)", dh));
        CHECK(cudaFree(a));
    }
    for (void* q : std::vector<void*>{x, z, m}) CHECK(cudaFree(q));
}

static void check_forward(const Fixture& fx) {
    const Dims& d = fx.d;
    for (int stored = 0; stored < 2; ++stored) {
        const std::string mode = stored ? "stored" : "identity";
        const std::string what = fx.name + " forward " + mode;
        const Output o = forward(fx.model, stored, fx.input);
        const double dl = max_abs_diff(o.logits, read_raw<float>(fx.dir + "/cpu_" + mode + "_logits.f32"));
        report(dl <= 2e-5, what + " logits vs CPU", fmt("max |diff| %.3e (tol 2e-5)", dl));
        const double dw = max_abs_diff(o.weights, read_raw<float>(fx.dir + "/cpu_" + mode + "_router_weights.f32"));
        report(dw <= 1e-6, what + " router weights vs CPU", fmt("max |diff| %.3e (tol 1e-6)", dw));
        const auto want = read_raw<unsigned>(fx.dir + "/cpu_" + mode + "_top_k.u32");
        int bad = 0;
        for (int r = 0; r < d.rows; ++r)
            for (int t = 0; fx.strict[r] && t < d.top_k; ++t)
                bad += o.top_k[(size_t)r * d.top_k + t] != want[(size_t)r * d.top_k + t];
        report(bad == 0, what + " top-k vs CPU (strict rows)", std::to_string(bad) + " mismatches");

        // Batch invariance: every row alone vs inside batches of 64 and 256
        // at other positions (with other companions), bit for bit.
        std::vector<Output> alone;
        for (int r = 0; r < d.rows; ++r) {
            std::vector<float> one(fx.input.begin() + (size_t)r * d.input, fx.input.begin() + (size_t)(r + 1) * d.input);
            alone.push_back(forward(fx.model, stored, one));
        }
        for (int batch : {64, 256}) {
            std::vector<int> src(batch);
            std::vector<float> in;
            for (int i = 0; i < batch; ++i) {
                src[i] = batch == 64 ? (i + 17) % d.rows : (i * 37 + 5) % d.rows;
                in.insert(in.end(), fx.input.begin() + (size_t)src[i] * d.input,
                          fx.input.begin() + (size_t)(src[i] + 1) * d.input);
            }
            const Output b = forward(fx.model, stored, in);
            int diff_rows = 0;
            for (int i = 0; i < batch; ++i) {
                const Output& a = alone[src[i]];
                bool same = std::memcmp(a.logits.data(), &b.logits[(size_t)i * d.output], 4 * d.output) == 0 &&
                            std::memcmp(a.weights.data(), &b.weights[(size_t)i * d.experts], 4 * d.experts) == 0 &&
                            std::memcmp(a.top_k.data(), &b.top_k[(size_t)i * d.top_k], 4 * d.top_k) == 0;
                diff_rows += !same;
            }
            report(diff_rows == 0, what + " batch invariance (alone vs batch of " + std::to_string(batch) + ")",
                   std::to_string(diff_rows) + " of " + std::to_string(batch) + " rows differ in any bit");
        }
    }
}

// Larger shapes than the Nano fixtures (H=2048, k not a multiple of the tile,
// m not a multiple of 64): the GEMM against a host fma chain, batch invariance
// of GEMM and LayerNorm across m.
static void check_large_shapes() {
    const int k = 2048 + 5, n = 2048 + 3, m = 130;
    std::vector<float> a((size_t)m * k), w((size_t)n * k), b(n);
    unsigned s = 12345;
    auto rnd = [&]() { s = s * 1664525u + 1013904223u; return ((s >> 8) / 16777216.0f - 0.5f) * 0.1f; };
    for (auto& v : a) v = rnd();
    for (auto& v : w) v = rnd();
    for (auto& v : b) v = rnd();
    float *da = upload(a), *dw = upload(w), *db = upload(b), *dc = alloc<float>((size_t)m * n);
    int* dm = upload(std::vector<int>{m});
    dim3 grid(blocks_for(n, TK_GEMM_TILE_N), blocks_for(m, TK_GEMM_TILE_M));
    tk_gemm_bias<<<grid, TK_GEMM_THREADS>>>(da, dw, db, dc, dm, n, k);
    CHECK(cudaDeviceSynchronize());
    const auto c = download(dc, (size_t)m * n);
    size_t same = 0;
    for (int r = 0; r < m; r += 43)
        for (int o = 0; o < n; ++o) {
            float acc = b[o];
            for (int kk = 0; kk < k; ++kk) acc = std::fma(a[(size_t)r * k + kk], w[(size_t)o * k + kk], acc);
            same += std::memcmp(&acc, &c[(size_t)r * n + o], 4) == 0;
        }
    const size_t total = (size_t)((m + 42) / 43) * n;
    report(same == total, "gemm+bias 130x2053x2051 vs host fma chain",
           std::to_string(same) + "/" + std::to_string(total) + " bit-identical");
    // Row 129 alone (as row 0 of a 1-row problem) vs inside the 130-row one.
    int* one = upload(std::vector<int>{1});
    float* c1 = alloc<float>(n);
    tk_gemm_bias<<<dim3(blocks_for(n, TK_GEMM_TILE_N), 1), TK_GEMM_THREADS>>>(da + (size_t)129 * k, dw, db, c1, one, n, k);
    float* ln = upload(std::vector<float>(c.begin(), c.end()));
    tk_layernorm_gelu<<<m, TK_LN_THREADS>>>(ln, dm, n, nullptr, nullptr);
    tk_layernorm_gelu<<<1, TK_LN_THREADS>>>(c1, one, n, nullptr, nullptr);
    CHECK(cudaDeviceSynchronize());
    const auto r_all = download(ln + (size_t)129 * n, n);
    const auto r_one = download(c1, n);
    report(std::memcmp(r_all.data(), r_one.data(), 4 * (size_t)n) == 0,
           "gemm+layernorm row 129 of 130 vs alone (H=2051)", "bit-identical check");
    for (void* q : std::vector<void*>{da, dw, db, dc, dm, one, c1, ln}) CHECK(cudaFree(q));
}

int main(int argc, char** argv) {
    const std::string root = argc > 1 ? argv[1] : ".harness-data";
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s (sm_%d%d, warpSize %d)\n", prop.name, prop.major, prop.minor, prop.warpSize);
    const auto t0 = std::chrono::steady_clock::now();
    for (const char* name : {"nano-s11", "nano-s12"}) {
        const Fixture fx = load(root, name);
        check_router(fx);
        check_block0(fx);
        check_forward(fx);
    }
    check_large_shapes();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s: %d checks, %d failed (%.1f s)\n", g_failures ? "FAIL" : "PASS", g_checks, g_failures, secs);
    return g_failures ? 1 : 0;
}
