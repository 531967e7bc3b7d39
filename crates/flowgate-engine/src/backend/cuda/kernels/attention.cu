// Causal attention over the KV cache (decode and prefill), with grouped-query heads and an
// optional sliding window, in one pass with an online softmax (flash-attention style: scores
// are never stored).
//
// Grid (n_heads, n_tokens, splits); block of NW warps. The keys of query (t, h), positions
// first..=pos, are cut into `splits` contiguous ranges (split-K / flash-decoding: with one
// query token there are only n_heads blocks otherwise, too few to fill the GPU); within a range
// warp w takes every NW-th key. A warp holds the query and its output accumulator spread over
// its lanes (element d on lane d % 32), computes each score with a shuffle reduction and
// updates a running max / sum / weighted V. The warps of a block are merged through shared
// memory; with splits > 1 each block writes (max, sum, acc) to `part`, and the last block of a
// (t, h) to finish (counted in `counters`, which it resets to zero) merges them: one launch,
// where a separate combine kernel cost a second launch per layer.
#define MAXD 8  // head_dim <= 256

#define MAXSPLITS 128  // the host launches at most 128 splits (AttnSplits in cuda/mod.rs)

// Writes output element i (= (t·n_heads + h)·head_dim + d) of the attention, and with q8
// non-null (one token, head_dim a multiple of 32: a warp's 32 consecutive elements are one
// group) its q8 form (quantize_q8's layout and rounding, `cols` values), which the output
// projection's 8-bit mat-vec then reads instead of quantising the row again.
__device__ __forceinline__ void attn_out(float* __restrict__ out, u8* __restrict__ q8, int cols,
                                         u64 i, float v) {
    out[i] = v;
    if (q8) {
        float dq = warp_max(fabsf(v)) / 127.0f;
        ((i8*)q8)[i] = (i8)(dq > 0.0f ? __float2int_rn(v / dq) : 0);
        if ((threadIdx.x & 31) == 0) ((float*)(q8 + cols))[i >> 5] = dq;
    }
}

// Merges the per-split partial results of query (t, h) (threads of one block). The loads
// bypass L1 (`__ldcg`: other blocks wrote them, and L1 is not coherent) and are independent:
// the threads fetch every split's (max, sum) at once, and each element's sum over the splits
// is a row of independent loads, not a chain of dependent ones (a chain cost ~1 µs per split).
__device__ __forceinline__ void combine_splits(const float* __restrict__ part,
                                               float* __restrict__ out, u8* __restrict__ q8,
                                               int t, int h, int n_heads, int head_dim,
                                               int splits) {
    __shared__ float cm[MAXSPLITS], cl[MAXSPLITS], cw[MAXSPLITS];
    const float* pp = part + ((u64)t * n_heads + h) * splits * (u64)(head_dim + 2);
    for (int s = threadIdx.x; s < splits; s += blockDim.x) {
        float l = __ldcg(pp + s * (head_dim + 2) + 1);
        float m = __ldcg(pp + s * (head_dim + 2));
        cl[s] = l;
        cm[s] = l > 0.0f ? m : -INFINITY;
    }
    __syncthreads();
    float M = -INFINITY;
    for (int s = 0; s < splits; s++) M = fmaxf(M, cm[s]);
    float L = 0.0f;
    for (int s = 0; s < splits; s++)
        if (cl[s] > 0.0f) L += cl[s] * expf(cm[s] - M);
    for (int s = threadIdx.x; s < splits; s += blockDim.x)
        cw[s] = cl[s] > 0.0f ? expf(cm[s] - M) : 0.0f;
    __syncthreads();
    u64 o = ((u64)t * n_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < splits; s++)
            if (cw[s] > 0.0f) a += __ldcg(pp + s * (head_dim + 2) + 2 + d) * cw[s];
        attn_out(out, q8, n_heads * head_dim, o + d, a / L);
    }
}

extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ K,
                                     const float* __restrict__ V, float* __restrict__ out,
                                     float* __restrict__ part, int* __restrict__ counters,
                                     int start_pos, const int* __restrict__ pos_dev,
                                     int n_heads, int n_kv_heads, int head_dim, int window,
                                     float scale, int split_keys, int min_splits,
                                     u8* __restrict__ q8) {
    grid_dep_enter();
    extern __shared__ float sm[];
    int h = blockIdx.x, t = blockIdx.y, split = blockIdx.z;
    int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int group = n_heads / n_kv_heads;
    int kvh = h / group;
    // A recorded decode step reads its position from device memory.
    if (pos_dev) start_pos = *pos_dev;
    int pos = start_pos + t;
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    int nkeys = pos + 1 - first;
    // With split_keys > 0 the number of splits follows the keys (about split_keys each, at
    // least min_splits, at most gridDim.z); blocks past it have nothing to do. The host picks
    // the same number for a plain launch; a recorded step launches gridDim.z = the most.
    int splits = gridDim.z;
    if (split_keys > 0) splits = min(splits, max(min_splits, (nkeys + split_keys - 1) / split_keys));
    if (split >= splits) return;
    int per = (nkeys + splits - 1) / splits;
    int lo = first + split * per;
    int hi = min(pos + 1, lo + per);
    u64 width = (u64)n_kv_heads * head_dim;
    const float* qv = q + ((u64)t * n_heads + h) * head_dim;
    float qr[MAXD], acc[MAXD];
#pragma unroll
    for (int j = 0; j < MAXD; j++) {
        int d = lane + 32 * j;
        qr[j] = d < head_dim ? qv[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    // Unrolled so that the loads of several keys are in flight at once (each key's score is
    // a chain of a load, a shuffle reduction and two exps).
#pragma unroll 4
    for (int key = lo + warp; key < hi; key += nw) {
        const float* kr = K + (u64)key * width + (u64)kvh * head_dim;
        const float* vr = V + (u64)key * width + (u64)kvh * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXD; j++) {
            int d = lane + 32 * j;
            if (d < head_dim) s += qr[j] * kr[d];
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn);
        float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int j = 0; j < MAXD; j++) {
            int d = lane + 32 * j;
            if (d < head_dim) acc[j] = acc[j] * corr + p * vr[d];
        }
        m = mn;
    }
    // Merge warps: sm = [nw maxes][nw sums][nw * head_dim accumulators].
    float* sm_m = sm;
    float* sm_l = sm + nw;
    float* sm_a = sm + 2 * nw;
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < MAXD; j++) {
        int d = lane + 32 * j;
        if (d < head_dim) sm_a[warp * head_dim + d] = acc[j];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < nw; w++) M = fmaxf(M, sm_m[w]);
    float L = 0.0f;
    for (int w = 0; w < nw; w++)
        if (sm_l[w] > 0.0f) L += sm_l[w] * expf(sm_m[w] - M);
    if (splits == 1) {
        u64 o = ((u64)t * n_heads + h) * head_dim;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float a = 0.0f;
            for (int w = 0; w < nw; w++)
                if (sm_l[w] > 0.0f) a += sm_a[w * head_dim + d] * expf(sm_m[w] - M);
            attn_out(out, q8, n_heads * head_dim, o + d, a / L);
        }
    } else {
        // part layout per (t, h, split): [max, sum, acc[head_dim]].
        float* pp = part + (((u64)t * n_heads + h) * splits + split) * (u64)(head_dim + 2);
        if (threadIdx.x == 0) {
            pp[0] = M;
            pp[1] = L;
        }
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float a = 0.0f;
            for (int w = 0; w < nw; w++)
                if (sm_l[w] > 0.0f) a += sm_a[w * head_dim + d] * expf(sm_m[w] - M);
            pp[2 + d] = a;
        }
        // Publish this split, then count it; the last one merges all splits.
        __shared__ int is_last;
        __threadfence();
        __syncthreads();
        int* counter = counters + (u64)t * n_heads + h;
        if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == splits - 1;
        __syncthreads();
        if (!is_last) return;
        __threadfence();
        if (threadIdx.x == 0) *counter = 0;
        combine_splits(part, out, q8, t, h, n_heads, head_dim, splits);
    }
}

