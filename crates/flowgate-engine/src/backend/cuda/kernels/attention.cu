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

// RoPE of pairs (i, i + head_dim/2) of a head held by a warp (element lane + 32j in r[j]):
// with H = head_dim / 64 the pairs are r[j], r[j + H], and cs[j] holds their (cos, sin).
template <int H>
__device__ __forceinline__ void rope_halves(float (&r)[MAXD], const float2 (&cs)[MAXD]) {
#pragma unroll
    for (int j = 0; j < H; j++) {
        float c = cs[j].x, s = cs[j].y;
        float va = r[j], vb = r[j + H];
        r[j] = va * c - vb * s;
        r[j + H] = vb * c + va * s;
    }
}

// qk_rope_kv's work on one head held by a warp (element d = lane + 32j in r[j], head_dim a
// multiple of 32, and of 64 for rope == 1): with `norm`, the per-head RMSNorm with weights
// w[j], then RoPE with element d's pair's (cos, sin) in cs[j], rope == 1: pairs
// (i, i + head_dim/2); 2: pairs (2i, 2i + 1), adjacent lanes. The operations and their
// order are qk_rope_kv's but for the norm's sum of squares. Everything it reads is in
// registers, loaded by the kernel together with the query, so that its first keys wait for
// one memory round trip, not one per step. (cosf and sinf here, rather than a table, made
// the kernel 5 µs longer; loading the table and weights step by step, 1.4 µs.)
__device__ __forceinline__ void rope_head(float (&r)[MAXD], int head_dim, bool norm,
                                          const float (&w)[MAXD], float eps,
                                          const float2 (&cs)[MAXD], int rope, int lane) {
    if (norm) {
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXD; j++)
            if (32 * j < head_dim) ss += r[j] * r[j];
        ss = warp_sum(ss);
        float rs = (float)(1.0 / sqrt((double)ss / (double)head_dim + (double)eps));
#pragma unroll
        for (int j = 0; j < MAXD; j++)
            if (32 * j < head_dim) r[j] = r[j] * rs * w[j];
    }
    if (rope == 2) {
#pragma unroll
        for (int j = 0; j < MAXD; j++) {
            if (32 * j >= head_dim) break;
            float o = __shfl_xor_sync(0xffffffffu, r[j], 1);
            float c = cs[j].x, s = cs[j].y;
            r[j] = (lane & 1) ? r[j] * c + o * s : r[j] * c - o * s;
        }
        return;
    }
    switch (head_dim >> 6) {
        case 1: rope_halves<1>(r, cs); break;
        case 2: rope_halves<2>(r, cs); break;
        case 3: rope_halves<3>(r, cs); break;
        case 4: rope_halves<4>(r, cs); break;
    }
}

// Where fold_key finds value element d (= lane + 32j) of a key: its cache row, or registers.
struct VFromCache {
    const float* __restrict__ vr;
    __device__ __forceinline__ float operator()(int, int d) const { return vr[d]; }
};
struct VFromRegs {
    const float (&v)[MAXD];
    __device__ __forceinline__ float operator()(int j, int) const { return v[j]; }
};

// One key into a warp's running max m, sum l and weighted values acc (element lane + 32j in
// acc[j]): s holds the lane's part of q·k, scaled once summed over the warp.
template <class VAt>
__device__ __forceinline__ void fold_key(float s, float scale, float& m, float& l,
                                         float (&acc)[MAXD], int lane, int head_dim, VAt vat) {
    s = warp_sum(s) * scale;
    float mn = fmaxf(m, s);
    float corr = expf(m - mn);
    float p = expf(s - mn);
    l = l * corr + p;
#pragma unroll
    for (int j = 0; j < MAXD; j++) {
        int d = lane + 32 * j;
        if (d < head_dim) acc[j] = acc[j] * corr + p * vat(j, d);
    }
    m = mn;
}

// With rope != 0 (one token, the host checks the shape: head_dim a multiple of 32, of 64 for
// rope == 1; cs the rope table) the kernel does qk_rope_kv's work too, and q, kin, vin are
// the q/k/v products as they come: each block normalises (qn, kn non-null) and rotates its
// query head in registers, the block whose key range holds the token's own position `pos`
// does the same for that key's head, takes it and vin's values from registers, and (one
// block per key head) stores them in cache row `pos` through Kw, Vw. No block of the launch reads that row from the
// cache, so the read-only loads of K and V never meet the write.
extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ K,
                                     const float* __restrict__ V, float* __restrict__ out,
                                     float* __restrict__ part, int* __restrict__ counters,
                                     int start_pos, const int* __restrict__ pos_dev,
                                     int n_heads, int n_kv_heads, int head_dim, int window,
                                     float scale, int split_keys, int min_splits,
                                     u8* __restrict__ q8, int rope,
                                     const float* __restrict__ kin,
                                     const float* __restrict__ vin,
                                     const float* __restrict__ qn, const float* __restrict__ kn,
                                     float eps, const float2* __restrict__ cs, float* Kw,
                                     float* Vw) {
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
    // The token's own key and value (rope != 0, in the block whose range holds pos).
    bool own = rope && lo <= pos && pos < hi;
    if (rope) {
        // The cache rows of this warp's first 4 keys (lanes 8k..8k+7: key k, a 128-byte line
        // of its K and V rows each), asked of L1 now: the loop below starts only once the
        // rotation is done, and would otherwise wait for them then.
        int key = lo + warp + nw * (lane >> 3), line = lane & 7;
        if (key < (own ? pos : hi) && 32 * line < head_dim) {
            u64 e = (u64)key * width + (u64)kvh * head_dim + 32 * line;
            asm volatile("prefetch.global.L1 [%0];" ::"l"(K + e));
            asm volatile("prefetch.global.L1 [%0];" ::"l"(V + e));
        }
    }
    float kn_r[MAXD], vn_r[MAXD];
    if (rope) {
        // All of rope_head's inputs at once: the (cos, sin) of each element's pair at this
        // position (rope_table: head_dim / 2 pairs per position), the norm weights, the own
        // key and value.
        float2 csr[MAXD];
        float qw[MAXD], kw[MAXD];
        const float2* cs_row = cs + (u64)pos * (head_dim / 2);
        int half = head_dim / 2;
        u64 src = ((u64)t * n_kv_heads + kvh) * head_dim;
#pragma unroll
        for (int j = 0; j < MAXD; j++) {
            int d = lane + 32 * j;
            bool in = d < head_dim;
            int pair = rope == 1 ? (d < half ? d : d - half) : d >> 1;
            csr[j] = in ? cs_row[pair] : make_float2(1.0f, 0.0f);
            qw[j] = in && qn ? qn[d] : 1.0f;
            kw[j] = in && own && kn ? kn[d] : 1.0f;
            kn_r[j] = in && own ? kin[src + d] : 0.0f;
            vn_r[j] = in && own ? vin[src + d] : 0.0f;
        }
        rope_head(qr, head_dim, qn != nullptr, qw, eps, csr, rope, lane);
        if (own) {
            rope_head(kn_r, head_dim, kn != nullptr, kw, eps, csr, rope, lane);
            if (warp == 0 && h % group == 0) {
                u64 row = (u64)pos * width + (u64)kvh * head_dim;
#pragma unroll
                for (int j = 0; j < MAXD; j++) {
                    int d = lane + 32 * j;
                    if (d < head_dim) {
                        Kw[row + d] = kn_r[j];
                        Vw[row + d] = vn_r[j];
                    }
                }
            }
            hi = pos;  // the cache loop stops before it
        }
    }
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
        fold_key(s, scale, m, l, acc, lane, head_dim, VFromCache{vr});
    }
    // The own key comes last to the warp whose turn it is, as it would from the cache.
    if (own && warp == (pos - lo) % nw) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXD; j++)
            if (32 * j < head_dim) s += qr[j] * kn_r[j];
        fold_key(s, scale, m, l, acc, lane, head_dim, VFromRegs{vn_r});
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

