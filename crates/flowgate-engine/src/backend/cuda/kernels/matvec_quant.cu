// Quantised matrix-vector products for decode (and small batches of up to MAXT tokens),
// reading GGUF blocks directly from device memory, plus row dequantisation (prefill tiles for
// cuBLAS, embedding lookups).
//
// matvec: a block of 8 warps; `wpr` warps share one weight row (1, 2, 4 or 8: matrices with
// few rows split their columns so that enough warps stream memory at once), so a block covers
// 8 / wpr rows. Each lane decodes 8 consecutive elements per 256-wide step (`deq8`) and
// multiplies them with the same 8 activations of every token, so a weight byte is read once
// for all tokens of the batch. The column loop is unrolled by UNROLL so that every lane has
// several independent loads in flight (decode is bound by memory latency × bytes in flight).
// Partial sums are reduced with warp shuffles, then across the row's warps in shared memory.
// Activations are f32 and the math is f32 (no activation quantisation), so results match a
// float reference on the dequantised weights up to summation order.

#define MAXT 8
#define UNROLL 4

template <int DT>
__device__ __forceinline__ void mv_step(const u8* __restrict__ row, const float* __restrict__ x,
                                        int base, int cols, int ntok, bool vec, float* acc) {
    float w[8];
    // Quantised rows are whole blocks (multiples of 32 elements): only float rows have tails.
    bool full = DT > DT_BF16 || base + 8 <= cols;
    if (full) {
        deq8<DT>(row, base, w);
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = base + k < cols ? deq1<DT>(row, base + k) : 0.0f;
    }
#pragma unroll
    for (int t = 0; t < MAXT; t++) {
        if (t < ntok) {
            const float* xt = x + (u64)t * cols + base;
            float s = 0.0f;
            if (full && vec) {
                float4 a = *(const float4*)xt;
                float4 b = *(const float4*)(xt + 4);
                s = w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x +
                    w[5] * b.y + w[6] * b.z + w[7] * b.w;
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (base + k < cols) s += w[k] * xt[k];
            }
            acc[t] += s;
        }
    }
}

template <int DT>
__device__ __forceinline__ void matvec_body(const u8* __restrict__ W, u64 row_bytes,
                                            const float* __restrict__ x, float* __restrict__ y,
                                            int rows, int cols, int ntok, int out_stride,
                                            int wpr) {
    __shared__ float part[8][MAXT];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int rpb = 8 / wpr;
    int r = blockIdx.x * rpb + warp / wpr;
    int sub = warp % wpr;
    float acc[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; t++) acc[t] = 0.0f;
    if (r < rows) {
        const u8* row = W + (u64)r * row_bytes;
        const bool vec = (cols & 3) == 0;
        int stride = 256 * wpr;
        int base = (sub * 32 + lane) * 8;
        // Whole groups of UNROLL steps, then the rest.
        for (; base + (UNROLL - 1) * stride < cols; base += UNROLL * stride) {
#pragma unroll
            for (int u = 0; u < UNROLL; u++) mv_step<DT>(row, x, base + u * stride, cols, ntok, vec, acc);
        }
        for (; base < cols; base += stride) mv_step<DT>(row, x, base, cols, ntok, vec, acc);
    }
#pragma unroll
    for (int t = 0; t < MAXT; t++) {
        if (t < ntok) {
            float s = warp_sum(acc[t]);
            if (wpr == 1) {
                if (lane == 0 && r < rows) y[(u64)t * out_stride + r] = s;
            } else if (lane == 0) {
                part[warp][t] = s;
            }
        }
    }
    if (wpr > 1) {
        __syncthreads();
        if (sub == 0 && lane < ntok && r < rows) {
            float s = 0.0f;
            for (int k = 0; k < wpr; k++) s += part[warp + k][lane];
            y[(u64)lane * out_stride + r] = s;
        }
    }
}

// matvec1: the single-token case (decode), kept free of the batch loop above, which costs
// 2.5× in bandwidth. Measured on the H100 with tools/device/matvec_bench.cu (Q4_K, GB/s of
// weights): 14336×4096: 1062 here vs 411 batched; 128256×4096 (lm head): 1366; unrolling two
// steps per iteration was slower (801), and so were 16 bytes of quants per lane (905) and two
// or four rows per warp sharing the activations (838, 665). Matrices with few rows split each
// row over `wpr` warps (1024×4096: 224 → 378 GB/s with 4).
__device__ __forceinline__ float dot8(const float* w, const float* __restrict__ x) {
    float4 a = *(const float4*)x;
    float4 b = *(const float4*)(x + 4);
    return w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
           w[6] * b.z + w[7] * b.w;
}

template <int DT>
__device__ __forceinline__ void matvec1_body(const u8* __restrict__ W, u64 row_bytes,
                                             const float* __restrict__ x,
                                             float* __restrict__ y, int rows, int cols,
                                             int wpr) {
    __shared__ float part[8];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * (8 / wpr) + warp / wpr;
    int sub = warp % wpr;
    float acc = 0.0f;
    if (r < rows) {
        const u8* row = W + (u64)r * row_bytes;
        int stride = 256 * wpr;
        if (wpr == 1 && (DT > DT_BF16 || (cols & 7) == 0)) {
            // A compile-time stride lets the compiler pipeline the loop's loads (measured
            // 1063 vs 820 GB/s with the run-time stride below on 14336 × 4096 Q4_K).
            for (int base = lane * 8; base < cols; base += 256) {
                float w[8];
                deq8<DT>(row, base, w);
                acc += dot8(w, x + base);
            }
        } else if (DT > DT_BF16 || (cols & 7) == 0) {
            for (int base = (sub * 32 + lane) * 8; base < cols; base += stride) {
                float w[8];
                deq8<DT>(row, base, w);
                acc += dot8(w, x + base);
            }
        } else {
            for (int base = (sub * 32 + lane) * 8; base < cols; base += stride)
                for (int k = 0; k < 8 && base + k < cols; k++)
                    acc += deq1<DT>(row, base + k) * x[base + k];
        }
    }
    acc = warp_sum(acc);
    if (wpr == 1) {
        if (lane == 0 && r < rows) y[r] = acc;
        return;
    }
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (sub == 0 && lane == 0 && r < rows) {
        float s = 0.0f;
        for (int k = 0; k < wpr; k++) s += part[warp + k];
        y[r] = s;
    }
}

// matvec1g: up to MAXJ single-token products in one launch — matrices of one format and
// width, rows may differ (q/k/v, gate/up, the chosen experts of a MoE layer). The jobs are
// passed by value as a kernel parameter (no upload); job blockIdx.y, blocks past its rows exit.
// (MvJobs and MAXJ are in common.cuh: matvec_q8.cu uses them too.)

// Dequantises rows into f32: output row j is weight row `ids[j]` (or `row0 + j` without ids).
// Grid: x over groups of 8 elements of a row (one per thread), y over rows (striding by
// gridDim.y past 65535 rows); stores are two float4 when the row width allows. (A first
// version with one 1-D index split by 64-bit division ran at ~0.6 TB/s and took 71% of a
// dense8b prefill.)
template <int DT>
__device__ __forceinline__ void dequant_body(const u8* __restrict__ W, u64 row_bytes,
                                             const u32* __restrict__ ids, u64 row0,
                                             float* __restrict__ out, int nrows, int cols) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= cols) return;
    const bool vec = (cols & 3) == 0;
    for (int j = blockIdx.y; j < nrows; j += gridDim.y) {
        u64 src = ids ? (u64)ids[j] : row0 + (u64)j;
        const u8* row = W + src * row_bytes;
        float* o = out + (u64)j * cols + i;
        if (i + 8 <= cols) {
            float w[8];
            deq8<DT>(row, i, w);
            if (vec) {
                *(float4*)o = make_float4(w[0], w[1], w[2], w[3]);
                *(float4*)(o + 4) = make_float4(w[4], w[5], w[6], w[7]);
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) o[k] = w[k];
            }
        } else {
            for (int k = 0; i + k < cols; k++) o[k] = deq1<DT>(row, i + k);
        }
    }
}

// matvec1x (MoE decode routed on the device): the matrix of job j (blockIdx.y) is expert
// ids[j % k]'s, looked up in the device table ta (jobs below k) or tb (the others); its input
// is x + (j % k) * x_stride floats and its output y + j * rows. Gate and up of k experts are
// one launch of 2k jobs (ta = gate table, tb = up table, x_stride 0); their downs one of k.
// A negative id is an expert computed elsewhere (the CPU's share): its jobs do nothing.
#define INSTANTIATE(NAME, DT)                                                                   \
    extern "C" __global__ void matvec_##NAME(const u8* W, u64 row_bytes, const float* x,       \
                                             float* y, int rows, int cols, int ntok,           \
                                             int out_stride, int wpr) {                        \
        matvec_body<DT>(W, row_bytes, x, y, rows, cols, ntok, out_stride, wpr);                \
    }                                                                                          \
    extern "C" __global__ void matvec1_##NAME(const u8* W, u64 row_bytes, const float* x,      \
                                              float* y, int rows, int cols, int wpr) {         \
        matvec1_body<DT>(W, row_bytes, x, y, rows, cols, wpr);                                 \
    }                                                                                          \
    extern "C" __global__ void matvec1g_##NAME(MvJobs jobs, u64 row_bytes, int cols, int wpr) { \
        int j = blockIdx.y;                                                                    \
        int rows = jobs.rows[j];                                                               \
        if ((int)blockIdx.x * (8 / wpr) >= rows) return;                                      \
        matvec1_body<DT>((const u8*)jobs.w[j], row_bytes, (const float*)jobs.x[j],             \
                         (float*)jobs.y[j], rows, cols, wpr);                                  \
    }                                                                                          \
    extern "C" __global__ void matvec1x_##NAME(const u64* ta, const u64* tb, const int* ids,      \
                                               int k, const float* x, u64 x_stride, float* y,   \
                                               int rows, int cols, u64 row_bytes, int wpr) {    \
        int j = blockIdx.y;                                                                    \
        int id = ids[j % k];                                                                   \
        if (id < 0) return; /* computed elsewhere (moe_split_mask) */                          \
        const u8* W = (const u8*)(j < k ? ta : tb)[id];                                        \
        matvec1_body<DT>(W, row_bytes, x + (u64)(j % k) * x_stride, y + (u64)j * rows, rows,   \
                         cols, wpr);                                                           \
    }                                                                                          \
    extern "C" __global__ void dequant_##NAME(const u8* W, u64 row_bytes, const u32* ids,      \
                                              u64 row0, float* out, int nrows, int cols) {     \
        dequant_body<DT>(W, row_bytes, ids, row0, out, nrows, cols);                           \
    }

INSTANTIATE(f32, DT_F32)
INSTANTIATE(f16, DT_F16)
INSTANTIATE(bf16, DT_BF16)
INSTANTIATE(q4_0, DT_Q4_0)
INSTANTIATE(q4_1, DT_Q4_1)
INSTANTIATE(q5_0, DT_Q5_0)
INSTANTIATE(q5_1, DT_Q5_1)
INSTANTIATE(q8_0, DT_Q8_0)
INSTANTIATE(q4_k, DT_Q4_K)
INSTANTIATE(q5_k, DT_Q5_K)
INSTANTIATE(q6_k, DT_Q6_K)
