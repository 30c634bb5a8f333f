// Linear layer with bias: C[m, N] = A[m, K] * W[N, K]^T + bias[N], f32.
//
// Owns: the per-expert GEMM of every block and of the output projection.
// Must not touch: routing, LayerNorm, the combine (other kernel files).
//
// Layouts: A, C row-major with row stride K / N; W is the checkpoint's own
// `[out, in]` row-major tensor, uploaded unchanged.
//
// Batch invariance: every output element is ONE fmaf chain over k in
// ascending order starting at its bias (the same chain the CPU backend's
// micro-kernel computes), whatever tile, block or row position it falls in.
// Tiling only changes where operands are read from, never the order of the
// additions, so a row's result does not depend on the batch around it.
//
// The row count comes from device memory (`m_ptr`): the dispatch kernel
// writes each expert's count on the device, so the host never waits for the
// routing mid-forward. Grids are sized for the batch's upper bound and
// blocks past `m` exit at once.
//
// Kept to the HIP subset that is also valid CUDA (no wavefront-size
// assumption: 256 threads is a multiple of 32 and of 64).

#include <hip/hip_runtime.h>

#define TK_GEMM_TILE_M 64
#define TK_GEMM_TILE_N 64
#define TK_GEMM_TILE_K 16
#define TK_GEMM_THREADS 256

// grid: (ceil(N / 64), ceil(m_max / 64)), block: 256 threads.
extern "C" __global__ void __launch_bounds__(TK_GEMM_THREADS)
tk_gemm_bias(const float* __restrict__ a, const float* __restrict__ w, const float* __restrict__ bias,
             float* __restrict__ c, const int* __restrict__ m_ptr, int n, int k) {
    __shared__ float as[TK_GEMM_TILE_K][TK_GEMM_TILE_M + 1];
    __shared__ float ws[TK_GEMM_TILE_K][TK_GEMM_TILE_N + 1];
    const int m = *m_ptr;
    const int row0 = blockIdx.y * TK_GEMM_TILE_M;
    const int col0 = blockIdx.x * TK_GEMM_TILE_N;
    if (row0 >= m) return;  // uniform across the block: before any barrier
    const int tid = threadIdx.x;
    const int tx = tid % 16;  // column group
    const int ty = tid / 16;  // row group
    float acc[4][4];
    for (int j = 0; j < 4; ++j) {
        const int col = col0 + tx + 16 * j;
        const float b = col < n ? bias[col] : 0.0f;
        for (int i = 0; i < 4; ++i) acc[i][j] = b;
    }
    for (int k0 = 0; k0 < k; k0 += TK_GEMM_TILE_K) {
        // 64 x 16 floats of A and of W, 4 per thread, read along k.
        for (int q = 0; q < 4; ++q) {
            const int l = tid + TK_GEMM_THREADS * q;
            const int r = l / TK_GEMM_TILE_K;
            const int kk = l % TK_GEMM_TILE_K;
            const int gk = k0 + kk;
            const int gr = row0 + r;
            const int gc = col0 + r;
            as[kk][r] = (gr < m && gk < k) ? a[(size_t)gr * k + gk] : 0.0f;
            ws[kk][r] = (gc < n && gk < k) ? w[(size_t)gc * k + gk] : 0.0f;
        }
        __syncthreads();
        // Only the valid k of the last tile: a padded fmaf(0, 0, acc) would
        // turn a -0.0 accumulator into +0.0.
        const int kl = min(TK_GEMM_TILE_K, k - k0);
        for (int kk = 0; kk < kl; ++kk) {
            float av[4], wv[4];
            for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
            for (int j = 0; j < 4; ++j) wv[j] = ws[kk][tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + ty + 16 * i;
        if (row >= m) continue;
        for (int j = 0; j < 4; ++j) {
            const int col = col0 + tx + 16 * j;
            if (col < n) c[(size_t)row * n + col] = acc[i][j];
        }
    }
}
