// Sparse dispatch: per-expert row lists (device side), gather, and the
// combine that scatters expert outputs back to their rows.
//
// Owns: building each expert's list of rows from the router's top-k, copying
// those rows into the expert's contiguous input, and the weighted sum of the
// expert outputs per row. Must not touch: the router, GEMM or LayerNorm math.
//
// Buffers sized for `cap` rows per expert: rows[e * cap + i] is the i-th row
// (ascending) routed to expert e, pos[row * E + e] its index in that list or
// -1, counts[e] the list's length, y[(e * cap + i) * out + j] expert e's
// output for its i-th row.
//
// Batch invariance: the lists only decide where a row's data sits; the
// combine adds a row's experts in ascending index order with explicit
// non-fused operations, exactly like the CPU backend (0 + w0*y0 + w1*y1).

#include <hip/hip_runtime.h>

#define TK_DISPATCH_THREADS 256

// grid: (E), block: 256. Rows are scanned in chunks of 256 with a
// block-wide prefix sum (integers: any order gives the same answer).
extern "C" __global__ void __launch_bounds__(TK_DISPATCH_THREADS)
tk_dispatch(const unsigned int* __restrict__ selected, int n, int experts, int top_k, int cap,
            int* __restrict__ counts, int* __restrict__ rows, int* __restrict__ pos) {
    __shared__ int scan[TK_DISPATCH_THREADS];
    const int e = blockIdx.x;
    const int t = threadIdx.x;
    int base = 0;
    for (int r0 = 0; r0 < n; r0 += TK_DISPATCH_THREADS) {
        const int row = r0 + t;
        int flag = 0;
        if (row < n) {
            for (int s = 0; s < top_k; ++s) flag |= selected[(size_t)row * top_k + s] == (unsigned int)e;
        }
        scan[t] = flag;
        __syncthreads();
        for (int off = 1; off < TK_DISPATCH_THREADS; off <<= 1) {
            const int v = t >= off ? scan[t - off] : 0;
            __syncthreads();
            scan[t] += v;
            __syncthreads();
        }
        if (row < n) {
            const int idx = base + scan[t] - flag;  // exclusive prefix
            pos[(size_t)row * experts + e] = flag ? idx : -1;
            if (flag) rows[(size_t)e * cap + idx] = row;
        }
        base += scan[TK_DISPATCH_THREADS - 1];
        __syncthreads();
    }
    if (t == 0) counts[e] = base;
}

// Copies expert e's rows of x ([n, k]) into dst ([counts[e], k]).
// grid: (n_max), block: 128.
extern "C" __global__ void tk_gather_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                          const int* __restrict__ counts, int e, int cap, int k,
                                          float* __restrict__ dst) {
    const int i = blockIdx.x;
    if (i >= counts[e]) return;
    const int row = rows[(size_t)e * cap + i];
    for (int j = threadIdx.x; j < k; j += blockDim.x) dst[(size_t)i * k + j] = x[(size_t)row * k + j];
}

// logits[row, j] = sum over selected e, ascending, of weights[row, e] * y_e[pos, j].
// grid: (ceil(n * out / 256)), block: 256.
extern "C" __global__ void tk_combine(const float* __restrict__ y, const float* __restrict__ weights,
                                      const int* __restrict__ pos, int n, int experts, int out, int cap,
                                      float* __restrict__ logits) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * out) return;
    const int row = idx / out;
    const int j = idx % out;
    float acc = 0.0f;
    for (int e = 0; e < experts; ++e) {
        const int p = pos[(size_t)row * experts + e];
        if (p < 0) continue;
        const float v = y[((size_t)e * cap + p) * out + j];
        acc = __fadd_rn(acc, __fmul_rn(weights[(size_t)row * experts + e], v));
    }
    logits[idx] = acc;
}
