// Element-wise kernels: residual adds, row biases, the fused SiLU·mul of SwiGLU, and the row
// gathers/scatters of MoE token grouping.
extern "C" __global__ void add(float* x, const float* y, u64 n) {
    grid_dep_enter();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// out[i] += sigmoid(g[i / dim]) · y[i]: a shared expert's output under its gate (one logit per
// row), added on the device.
extern "C" __global__ void add_sigmoid_gated(float* out, const float* y, const float* g, int dim,
                                             u64 n) {
    grid_dep_enter();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] += (1.0f / (1.0f + expf(-g[i / dim]))) * y[i];
}

extern "C" __global__ void add_row_bias(float* x, const float* b, u64 n, int width) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += b[i % width];
}

// With q8 non-null (n a multiple of 32), g is also written as a q8 vector (quantize_q8's
// layout and rounding: a warp's 32 consecutive values form one group) for the decode mat-vec
// that reads it next.
extern "C" __global__ void silu_mul(float* g, const float* u, u64 n, u8* q8) {
    grid_dep_enter();
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float a = g[i];
        float o = a / (1.0f + expf(-a)) * u[i];
        g[i] = o;
        if (q8) {
            float d = warp_max(fabsf(o)) / 127.0f;
            ((i8*)q8)[i] = (i8)(d > 0.0f ? __float2int_rn(o / d) : 0);
            if ((threadIdx.x & 31) == 0) ((float*)(q8 + n))[i >> 5] = d;
        }
    }
}

// Prefill SwiGLU on one GEMM's output: gu holds per token [gate (rows) | up (rows)];
// h[t][i] = silu(gate[t][i]) · up[t][i].
extern "C" __global__ void silu_mul_rows(const float* gu, float* h, int rows, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * rows) return;
    u64 t = i / rows, c = i % rows;
    float a = gu[t * 2 * rows + c];
    h[i] = a / (1.0f + expf(-a)) * gu[t * 2 * rows + rows + c];
}

// out[j] = x[idx[j]] for rows of width dim.
extern "C" __global__ void gather_rows(const float* x, const u32* idx, float* out, int dim,
                                       int nrows) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)dim * nrows) return;
    u64 j = i / dim;
    int c = (int)(i % dim);
    out[i] = x[(u64)idx[j] * dim + c];
}

// out[idx[j]] += scale[j] * y[j]; atomics keep repeated indices correct.
extern "C" __global__ void scatter_add_rows(float* out, const float* y, const u32* idx,
                                            const float* scale, int dim, int nrows) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)dim * nrows) return;
    u64 j = i / dim;
    int c = (int)(i % dim);
    atomicAdd(&out[(u64)idx[j] * dim + c], scale[j] * y[i]);
}

// The same for at most 16 rows, indices and weights passed by value (MoE decode: one token per
// expert; no host-to-device copy needed).
struct RowScale {
    u32 idx[16];
    float scale[16];
};

extern "C" __global__ void scatter_add_rows_small(float* out, const float* y, RowScale rs,
                                                  int dim, int nrows) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)dim * nrows) return;
    int j = (int)(i / dim);
    int c = (int)(i % dim);
    atomicAdd(&out[(u64)rs.idx[j] * dim + c], rs.scale[j] * y[i]);
}
