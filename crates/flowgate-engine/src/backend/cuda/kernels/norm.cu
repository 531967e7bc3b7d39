// RMSNorm: one block per row of `dim` values (in place when out == x); up to 1024 threads so
// that the single row of a decode step is spread over the whole block. The sum of squares is
// accumulated in f32 per thread and reduced across the block; the reciprocal root is taken in
// f64 like the CPU reference (rms_scale, shared with the fused add + RMSNorm below).

// 1 / sqrt(mean of squares + eps) of a row from each thread's partial sum of squares `ss`.
__device__ __forceinline__ float rms_scale(float ss, int dim, float eps) {
    __shared__ float part[32];
    ss = warp_sum(ss);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        float v = lane < nw ? part[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) part[0] = v;
    }
    __syncthreads();
    return (float)(1.0 / sqrt((double)part[0] / (double)dim + (double)eps));
}

extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int dim,
                                    float eps) {
    grid_dep_enter();
    const float* xr = x + (u64)blockIdx.x * dim;
    float* orow = out + (u64)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    float r = rms_scale(ss, dim, eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = xr[i] * r * w[i];
}

// The residual add fused with the next RMSNorm: x += y, then out = rms_norm(x) · w, one block
// per row (each thread normalises the values it added). With q8 non-null (one row, dim a
// multiple of 32, blockDim a multiple of 32), out is also written as a q8 vector (the layout
// and rounding of quantize_q8 in matvec_q8.cu: a warp's 32 consecutive values form one
// group), which the next decode mat-vecs read instead of quantising out again.
// Writes value o of a normalised row, and its q8 form if q8 is non-null (the warp's 32
// consecutive values form one group).
__device__ __forceinline__ void norm_out(float* orow, u8* q8, int dim, int i, float o) {
    orow[i] = o;
    if (q8) {
        float d = warp_max(fabsf(o)) / 127.0f;
        ((i8*)q8)[i] = (i8)(d > 0.0f ? __float2int_rn(o / d) : 0);
        if ((threadIdx.x & 31) == 0) ((float*)(q8 + dim))[i >> 5] = d;
    }
}

#define NORM_VALS 4  // values a thread keeps in registers (the host launches dim/4 threads)
extern "C" __global__ void add_rms_norm(float* x, const float* y, const float* w, float* out,
                                        int dim, float eps, u8* q8) {
    float* xr = x + (u64)blockIdx.x * dim;
    const float* yr = y + (u64)blockIdx.x * dim;
    float* orow = out + (u64)blockIdx.x * dim;
    // The first NORM_VALS·blockDim values stay in registers with their weights (loaded before
    // the reduction; the weights, which no kernel writes, before waiting for the previous
    // kernel), so the second pass re-reads nothing; longer rows loop over the rest.
    float v[NORM_VALS], wv[NORM_VALS];
#pragma unroll
    for (int c = 0; c < NORM_VALS; c++) {
        int i = threadIdx.x + c * blockDim.x;
        wv[c] = i < dim ? w[i] : 0.0f;
    }
    grid_dep_enter();
    float ss = 0.0f;
#pragma unroll
    for (int c = 0; c < NORM_VALS; c++) {
        int i = threadIdx.x + c * blockDim.x;
        v[c] = 0.0f;
        if (i < dim) {
            v[c] = xr[i] + yr[i];
            xr[i] = v[c];
            ss += v[c] * v[c];
        }
    }
    for (int i = threadIdx.x + NORM_VALS * blockDim.x; i < dim; i += blockDim.x) {
        float t = xr[i] + yr[i];
        xr[i] = t;
        ss += t * t;
    }
    float r = rms_scale(ss, dim, eps);
#pragma unroll
    for (int c = 0; c < NORM_VALS; c++) {
        int i = threadIdx.x + c * blockDim.x;
        if (i < dim) norm_out(orow, q8, dim, i, v[c] * r * wv[c]);
    }
    for (int i = threadIdx.x + NORM_VALS * blockDim.x; i < dim; i += blockDim.x)
        norm_out(orow, q8, dim, i, xr[i] * r * w[i]);
}

// The decode form of add_rms_norm (one row of `dim` values, a multiple of 256), over dim/256
// blocks of 256 threads instead of one block: every block sums the squares of the whole row
// x + y (the same values in the same order, so every block gets the same scale), then writes
// its own 256 values: the new residual into xo (not x: other blocks still read x) and the
// normed values into out, with their q8 groups when q8 is non-null. A single block's serial
// latency (its loads, reductions and 4 values of quantisation per thread) was the cost of
// add_rms_norm in decode: 5.7 µs on the H100 against 2.7 for a trivial kernel.
extern "C" __global__ void add_rms_norm_rows1(const float* x, const float* y, const float* w,
                                              float* xo, float* out, u8* q8, int dim,
                                              float eps) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float wi = w[i];
    grid_dep_enter();
    float ss = 0.0f, own = 0.0f;
    int per = dim / blockDim.x;
    // Unrolled so that a 4096-wide row's 16 pairs of loads per thread are all in flight.
#pragma unroll 16
    for (int k = 0; k < per; k++) {
        int e = threadIdx.x + k * blockDim.x;
        float t = x[e] + y[e];
        ss += t * t;
        if (k == blockIdx.x) own = t;
    }
    float r = rms_scale(ss, dim, eps);
    xo[i] = own;
    norm_out(out, q8, dim, i, own * r * wi);
}
