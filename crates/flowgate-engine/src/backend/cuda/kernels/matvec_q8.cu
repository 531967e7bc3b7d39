// Decode mat-vec with the activations quantised to 8 bits (dp4a), as llama.cpp's MMVQ does:
// the f32 kernels of matvec_quant.cu spend their time converting nibbles to floats and
// reading 32 bytes of f32 activations from L1 per 16 bytes of weights; here a lane multiplies
// 16 bytes of quants (32 weights) with 32 bytes of int8 activations in 8 dp4a instructions.
//
// Quantised vector layout ("q8 vector", made by `quantize_q8`): `cols` int8 values, then
// cols/32 f32 scales (one per 32 values, d = max|x| / 127, q = round(x / d)), the whole
// region padded to 16 bytes (q8_bytes() on the host). Error: each activation is rounded to
// 1/254 of its 32-block's largest magnitude, the same order as the weights' own rounding
// (the CPU backend rounds activations to Q8_K blocks of 256 the same way).

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// Jobs of one launch: vector j is x[j] (f32) → q[j] (a q8 vector), `n` values each.
#define MAXQ 16
struct QuantJobs {
    u64 x[MAXQ];
    u64 q[MAXQ];
};

// One warp per 32 values: blockIdx.y is the job. n is a multiple of 32.
extern "C" __global__ void quantize_q8(QuantJobs jobs, int n) {
    grid_dep_enter();
    int g = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (g * 32 >= n) return;
    const float* x = (const float*)jobs.x[blockIdx.y];
    u8* q = (u8*)jobs.q[blockIdx.y];
    float v = x[g * 32 + lane];
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f;
    int iv = d > 0.0f ? __float2int_rn(v / d) : 0;
    ((i8*)q)[g * 32 + lane] = (i8)iv;
    if (lane == 0) ((float*)(q + n))[g] = d;
}

// Q4_K (144-byte blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes
// of nibbles: byte 32*j + l holds element 64*j + l (low) and 64*j + 32 + l (high)).
// A lane takes 16 bytes of one block's quants: bytes 32*j + 16*h .. +16, i.e. 16 weights of
// sub-block 2j and 16 of 2j+1; 8 lanes cover a block, a warp 4 blocks per step; R rows per
// warp share the activation loads. The block's 16-byte header (d, dmin and the scales) is one
// 16-byte load (blocks are 144 bytes, rows a multiple of 16), its scale bytes picked from
// registers (q4k_scale_min), rather than a load per byte.
// U steps are loaded before any is summed (U = 2 for products of one wave of warps, whose
// warps otherwise wait for each step's loads in turn); the sums run in the same order for any
// U, so the result does not depend on it.
__device__ __forceinline__ int q4k_sbyte(uint4 hd, int k) {
    u32 w = k < 4 ? hd.y : (k < 8 ? hd.z : hd.w);
    return (int)((w >> (8 * (k & 3))) & 0xFF);
}

__device__ __forceinline__ void q4k_scale_min(int j, uint4 hd, int* sc, int* m) {
    scale_min_k4_by(j, [hd](int k) { return q4k_sbyte(hd, k); }, sc, m);
}

template <int R, int U>
__device__ __forceinline__ void mvq_q4_k(const u8* __restrict__ W, u64 row_bytes,
                                         const u8* __restrict__ xv, float* __restrict__ y,
                                         int rows, int cols, int r0, int lane) {
    const i8* xq = (const i8*)xv;
    const float* xd = (const float*)(xv + cols);
    int nb = cols >> 8;
    int j = (lane & 7) >> 1, h = lane & 1;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    for (int blk0 = lane >> 3; blk0 < nb; blk0 += 4 * U) {
        int4 a[U], c[U];
        float dx0[U], dx1[U];
        uint4 q[U][R], hd[U][R];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int blk = blk0 + 4 * u;
            if (U > 1 && blk >= nb) break;
            int e = blk * 256 + 64 * j;
            a[u] = *(const int4*)(xq + e + 16 * h);
            c[u] = *(const int4*)(xq + e + 32 + 16 * h);
            dx0[u] = xd[e >> 5];
            dx1[u] = xd[(e >> 5) + 1];
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (R > 1 && r0 + r >= rows) break;
                const u8* b = W + (u64)(r0 + r) * row_bytes + (u64)blk * 144;
                hd[u][r] = *(const uint4*)b;
                q[u][r] = *(const uint4*)(b + 16 + 32 * j + 16 * h);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (U > 1 && blk0 + 4 * u >= nb) break;
            const int O = 0x01010101;
            int sa = dp4a(O, a[u].x, dp4a(O, a[u].y, dp4a(O, a[u].z, dp4a(O, a[u].w, 0))));
            int sc = dp4a(O, c[u].x, dp4a(O, c[u].y, dp4a(O, c[u].z, dp4a(O, c[u].w, 0))));
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (R > 1 && r0 + r >= rows) break;
                uint4 qq = q[u][r];
                int sc0, m0, sc1, m1;
                q4k_scale_min(2 * j, hd[u][r], &sc0, &m0);
                q4k_scale_min(2 * j + 1, hd[u][r], &sc1, &m1);
                const int M = 0x0F0F0F0F;
                int d0 = dp4a(qq.x & M, a[u].x,
                              dp4a(qq.y & M, a[u].y, dp4a(qq.z & M, a[u].z, dp4a(qq.w & M, a[u].w, 0))));
                int d1 = dp4a((qq.x >> 4) & M, c[u].x,
                              dp4a((qq.y >> 4) & M, c[u].y,
                                   dp4a((qq.z >> 4) & M, c[u].z, dp4a((qq.w >> 4) & M, c[u].w, 0))));
                u32 dm = hd[u][r].x;
                float d = h2f((u16)(dm & 0xFFFF)), dmin = h2f((u16)(dm >> 16));
                acc[r] += d * (dx0[u] * (float)(sc0 * d0) + dx1[u] * (float)(sc1 * d1)) -
                          dmin * (dx0[u] * (float)(m0 * sa) + dx1[u] * (float)(m1 * sc));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        float v = warp_sum(acc[r]);
        if (lane == 0 && r0 + r < rows) y[r0 + r] = v;
    }
}

// Grouped launch: blockIdx.y is the job (MvJobs of matvec_quant.cu, x = a q8 vector); a block
// of 8 warps covers 8·R rows; blocks past a job's rows exit.
template <int R, int U>
__device__ __forceinline__ void mvq_q4_k_jobs(const MvJobs& jobs, u64 row_bytes, int cols) {
    int j = blockIdx.y;
    int rows = jobs.rows[j];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r0 = (blockIdx.x * (blockDim.x >> 5) + warp) * R;
    if (r0 >= rows) return;
    // The weights do not depend on the previous kernel: ask for them while it finishes.
#ifndef FG_MV_PREFETCH
#define FG_MV_PREFETCH 2304
#endif
    prefetch_l2((const u8*)jobs.w[j] + (u64)r0 * row_bytes,
                min((u64)FG_MV_PREFETCH, (u64)min(R, rows - r0) * row_bytes), lane);
    grid_dep_wait();
    mvq_q4_k<R, U>((const u8*)jobs.w[j], row_bytes, (const u8*)jobs.x[j], (float*)jobs.y[j],
                   rows, cols, r0, lane);
}

extern "C" __global__ void matvec1q8_q4_k(MvJobs jobs, u64 row_bytes, int cols) {
    mvq_q4_k_jobs<1, 1>(jobs, row_bytes, cols);
}

// Two steps' loads in flight: for launches whose warps are all resident at once.
extern "C" __global__ void matvec1q8u_q4_k(MvJobs jobs, u64 row_bytes, int cols) {
    mvq_q4_k_jobs<1, 2>(jobs, row_bytes, cols);
}

extern "C" __global__ void matvec1q8r2_q4_k(MvJobs jobs, u64 row_bytes, int cols) {
    mvq_q4_k_jobs<2, 1>(jobs, row_bytes, cols);
}

// Expert-indexed (see matvec1x in matvec_quant.cu): job j uses expert ids[j % k] of table ta
// (j < k) or tb, the q8 vector at xq + (j % k) * x_stride bytes, and writes y + j * rows.
extern "C" __global__ void matvec1q8x_q4_k(const u64* ta, const u64* tb, const int* ids, int k,
                                           const u8* xq, u64 x_stride, float* y, int rows,
                                           int cols, u64 row_bytes) {
    grid_dep_wait();
    int j = blockIdx.y;
    int id = ids[j % k];
    if (id < 0) return;  // computed elsewhere (moe_split_mask)
    const u8* W = (const u8*)(j < k ? ta : tb)[id];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r0 = blockIdx.x * (blockDim.x >> 5) + warp;
    if (r0 >= rows) return;
    mvq_q4_k<1, 1>(W, row_bytes, xq + (u64)(j % k) * x_stride, y + (u64)j * rows, rows, cols,
                   r0, lane);
}

// matvec1q8x_q4_k for weights read in place over the link (page-locked host memory, see
// paging.rs): the block's 8 rows, contiguous in memory, are first brought into shared memory
// with every thread loading whole 16-byte words in turn (each warp instruction reads 512
// contiguous bytes: full 128-byte lines, the fewest and largest requests over PCIe), then each
// warp computes its row from there. The per-row kernel's loads (a 16-byte header shared by 8
// lanes, quants straddling lines) cost the link several small requests per line. Dynamic
// shared memory: 8 · row_bytes. Same sums in the same order as matvec1q8x_q4_k.
extern "C" __global__ void matvec1q8xs_q4_k(const u64* ta, const u64* tb, const int* ids, int k,
                                            const u8* xq, u64 x_stride, float* y, int rows,
                                            int cols, u64 row_bytes) {
    extern __shared__ uint4 staged[];
    grid_dep_wait();
    int j = blockIdx.y;
    int id = ids[j % k];
    if (id < 0) return;  // computed elsewhere (moe_split_mask)
    const u8* W = (const u8*)(j < k ? ta : tb)[id];
    int r0 = blockIdx.x * (blockDim.x >> 5);
    if (r0 >= rows) return;
    int nr = min((int)(blockDim.x >> 5), rows - r0);
    const uint4* src = (const uint4*)(W + (u64)r0 * row_bytes);
    int n16 = (int)((u64)nr * row_bytes / 16);
    for (int i = threadIdx.x; i < n16; i += blockDim.x) staged[i] = src[i];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp >= nr) return;
    mvq_q4_k<1, 1>((const u8*)staged, row_bytes, xq + (u64)(j % k) * x_stride,
                   y + (u64)j * rows + r0, nr, cols, warp, lane);
}
