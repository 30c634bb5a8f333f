// Router: linear (E outputs), softmax, top-k. One thread per row.
//
// Owns: the routing arithmetic. Must not touch: dispatch, experts, combine.
//
// Written in the CPU backend's order with explicit non-fused operations
// (__fmul_rn / __fadd_rn: the compilers would otherwise contract a*b+c into
// an fma), so the logits before the softmax match the CPU bit for bit; only
// expf may differ by an ulp. Top-k selects by strict `>` scanning upward, so
// equal probabilities keep the lower expert index first. The weights are the
// selected probabilities, NOT renormalised; all others are exactly 0.

#include <hip/hip_runtime.h>

#define TK_ROUTER_MAX_EXPERTS 16
#define TK_ROUTER_THREADS 128

// grid: (ceil(n / 128)), block: 128. probs may be null (the harness reads it).
extern "C" __global__ void __launch_bounds__(TK_ROUTER_THREADS)
tk_router_topk(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
               int n, int k_in, int experts, int top_k, float* __restrict__ probs,
               float* __restrict__ weights, unsigned int* __restrict__ selected) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    const float* xr = x + (size_t)row * k_in;
    float p[TK_ROUTER_MAX_EXPERTS];
    for (int e = 0; e < experts; ++e) {
        const float* we = w + (size_t)e * k_in;
        float acc = 0.0f;
        for (int k = 0; k < k_in; ++k) acc = __fadd_rn(acc, __fmul_rn(we[k], xr[k]));
        p[e] = __fadd_rn(acc, bias[e]);
    }
    float mx = -INFINITY;
    for (int e = 0; e < experts; ++e) mx = fmaxf(mx, p[e]);
    float sum = 0.0f;
    for (int e = 0; e < experts; ++e) {
        p[e] = expf(p[e] - mx);
        sum = __fadd_rn(sum, p[e]);
    }
    for (int e = 0; e < experts; ++e) p[e] = p[e] / sum;
    float* wr = weights + (size_t)row * experts;
    for (int e = 0; e < experts; ++e) {
        wr[e] = 0.0f;
        if (probs != nullptr) probs[(size_t)row * experts + e] = p[e];
    }
    unsigned int taken = 0;  // bit e: expert e already selected
    for (int t = 0; t < top_k; ++t) {
        int best = -1;
        for (int e = 0; e < experts; ++e) {
            if (taken & (1u << e)) continue;
            if (best < 0 || p[e] > p[best]) best = e;
        }
        taken |= 1u << best;
        selected[(size_t)row * top_k + t] = (unsigned int)best;
        wr[best] = p[best];
    }
}
