// Causal attention for many query tokens at once (prefill), flash-attention style: tiles of
// queries and keys in shared memory, scores kept in registers, an online softmax, nothing of
// size tokens × keys ever written to memory. FP32 throughout (CUDA cores, no tensor cores), so
// it agrees with the one-query kernel of attention.cu up to summation order.
//
// One block computes up to BQ = 64 query rows of one KV head. With grouped-query attention the
// rows are (token, head of the group) pairs, row r = token t0 + r / G, head kvh·G + r % G, for
// the TPB = ⌊64 / G⌋ tokens of the block, so that each key and value loaded into shared memory
// serves the G query heads that read it. Keys go
// through in tiles of BK: S = Q·Kᵀ (BQ × BK) in registers, causal / sliding-window mask,
// running max and sum per row, P (BQ × BK) through shared memory, O += P·V in registers.
//
// 256 threads as a 16 × 16 grid: thread (ty, tx) owns rows 4ty..4ty+3; in S the keys
// tx·KPT..tx·KPT+KPT-1, in O the float4 columns tx, tx+16, … (D/64 of them). The 16 threads
// sharing rows are half a warp, so row reductions are shuffles. Q and K are stored transposed
// (QT[d][r], KT[d][c]) so that each step of the S loop is two vector loads and 4·KPT FMAs.
#define FA_BQ 64
#define FA_THREADS 256

// Shared memory bytes of one block (must match the layout in `attention_tile`):
// QT [D][BQ+4], KT [D][BK+4], V [BK][D+4]; PT [BK][BQ+4] reuses KT's space once S is computed
// (D ≥ BK here, so it fits), which lets two blocks of head dim 128 share an SM.
#define FA_SMEM(D, BK) (4 * ((D) * (FA_BQ + 4) + (D) * ((BK) + 4) + (BK) * ((D) + 4)))

template <int D, int BK>
__device__ __forceinline__ void attention_tile(const float* __restrict__ q,
                                               const float* __restrict__ K,
                                               const float* __restrict__ V,
                                               float* __restrict__ out, int n_tokens,
                                               int start_pos, int n_heads, int n_kv_heads,
                                               int window, float scale) {
    constexpr int KPT = BK / 16;     // keys per thread in S
    constexpr int C4 = D / 64;       // float4 columns per thread in O
    constexpr int QS = FA_BQ + 4;    // row strides (floats) of the shared tiles
    constexpr int KS = BK + 4;
    constexpr int VS = D + 4;
    extern __shared__ float4 sm4[];
    float* sm = (float*)sm4;
    float* QT = sm;
    float* KT = QT + D * QS;
    float* Vs = KT + D * KS;
    float* PT = KT;  // after S: BK × QS ≤ D × KS floats
    static_assert(BK * QS <= D * KS, "P must fit in K's tile");

    const int G = n_heads / n_kv_heads;
    const int kvh = blockIdx.y;
    // Tiles with the most keys (the last tokens) first.
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int tpb = FA_BQ / G;  // tokens per block; rows tpb·G.. are unused
    const int t0 = tile * tpb;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const u64 width = (u64)n_kv_heads * D;

    // Q, scaled, transposed; rows past the last token are zero.
    for (int i = tid; i < FA_BQ * (D / 4); i += FA_THREADS) {
        int r = i / (D / 4), d4 = i % (D / 4);
        int t = t0 + r / G, h = kvh * G + r % G;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < tpb * G && t < n_tokens) v = *(const float4*)(q + ((u64)t * n_heads + h) * D + d4 * 4);
        QT[(d4 * 4 + 0) * QS + r] = v.x * scale;
        QT[(d4 * 4 + 1) * QS + r] = v.y * scale;
        QT[(d4 * 4 + 2) * QS + r] = v.z * scale;
        QT[(d4 * 4 + 3) * QS + r] = v.w * scale;
    }

    // This thread's rows: their positions and first visible keys.
    int pos[4], first[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = ty * 4 + i, t = t0 + r / G;
        pos[i] = r < tpb * G && t < n_tokens ? start_pos + t : -1;  // -1: no key is visible
        first[i] = window > 0 ? max(0, start_pos + t + 1 - window) : 0;
    }
    const int t_last = min(n_tokens - 1, t0 + tpb - 1);
    const int k_lo = window > 0 ? max(0, start_pos + t0 + 1 - window) : 0;
    const int k_hi = start_pos + t_last;  // inclusive

    float m[4], l[4], o[4][C4 * 4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int j = 0; j < C4 * 4; j++) o[i][j] = 0.f;
    }

    for (int k0 = k_lo; k0 <= k_hi; k0 += BK) {
        __syncthreads();  // the previous tile's KT, V and PT are no longer read
        for (int i = tid; i < BK * (D / 4); i += FA_THREADS) {
            int c = i / (D / 4), d4 = i % (D / 4);
            int key = k0 + c;
            float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
            if (key <= k_hi) {
                u64 off = (u64)key * width + (u64)kvh * D + d4 * 4;
                kv = *(const float4*)(K + off);
                vv = *(const float4*)(V + off);
            }
            KT[(d4 * 4 + 0) * KS + c] = kv.x;
            KT[(d4 * 4 + 1) * KS + c] = kv.y;
            KT[(d4 * 4 + 2) * KS + c] = kv.z;
            KT[(d4 * 4 + 3) * KS + c] = kv.w;
            *(float4*)(Vs + c * VS + d4 * 4) = vv;
        }
        __syncthreads();

        // S = Q·Kᵀ for 4 rows × KPT keys.
        float s[4][KPT];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < KPT; j++) s[i][j] = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; d++) {
            float4 qa = *(const float4*)(QT + d * QS + ty * 4);
            float qr[4] = {qa.x, qa.y, qa.z, qa.w};
            float kr[KPT];
            if constexpr (KPT == 4) {
                float4 ka = *(const float4*)(KT + d * KS + tx * 4);
                kr[0] = ka.x;
                kr[1] = ka.y;
                kr[2] = ka.z;
                kr[3] = ka.w;
            } else {
#pragma unroll
                for (int j = 0; j < KPT; j++) kr[j] = KT[d * KS + tx * KPT + j];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < KPT; j++) s[i][j] = fmaf(qr[i], kr[j], s[i][j]);
        }

        // Mask, online softmax, P into shared memory (transposed: PT[key][row]).
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < KPT; j++) {
                int key = k0 + tx * KPT + j;
                if (key > pos[i] || key < first[i]) s[i][j] = -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            float mn = fmaxf(m[i], mx);
            // A row that has seen no visible key yet keeps m = -inf: nothing to rescale.
            float corr = mn == -INFINITY ? 1.f : expf(m[i] - mn);
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < KPT; j++) {
                float p = mn == -INFINITY ? 0.f : expf(s[i][j] - mn);
                s[i][j] = p;
                sum += p;
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            l[i] = l[i] * corr + sum;
            m[i] = mn;
#pragma unroll
            for (int j = 0; j < C4 * 4; j++) o[i][j] *= corr;
        }
        __syncthreads();  // every thread is done reading KT: P goes over it
#pragma unroll
        for (int j = 0; j < KPT; j++)
            *(float4*)(PT + (tx * KPT + j) * QS + ty * 4) =
                make_float4(s[0][j], s[1][j], s[2][j], s[3][j]);
        __syncthreads();

        // O += P·V.
#pragma unroll 4
        for (int c = 0; c < BK; c++) {
            float4 pa = *(const float4*)(PT + c * QS + ty * 4);
            float pr[4] = {pa.x, pa.y, pa.z, pa.w};
#pragma unroll
            for (int cc = 0; cc < C4; cc++) {
                float4 va = *(const float4*)(Vs + c * VS + (tx + 16 * cc) * 4);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    o[i][cc * 4 + 0] = fmaf(pr[i], va.x, o[i][cc * 4 + 0]);
                    o[i][cc * 4 + 1] = fmaf(pr[i], va.y, o[i][cc * 4 + 1]);
                    o[i][cc * 4 + 2] = fmaf(pr[i], va.z, o[i][cc * 4 + 2]);
                    o[i][cc * 4 + 3] = fmaf(pr[i], va.w, o[i][cc * 4 + 3]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = ty * 4 + i;
        int t = t0 + r / G, h = kvh * G + r % G;
        if (r >= tpb * G || t >= n_tokens) continue;
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        float* dst = out + ((u64)t * n_heads + h) * D;
#pragma unroll
        for (int cc = 0; cc < C4; cc++)
            *(float4*)(dst + (tx + 16 * cc) * 4) =
                make_float4(o[i][cc * 4 + 0] * inv, o[i][cc * 4 + 1] * inv,
                            o[i][cc * 4 + 2] * inv, o[i][cc * 4 + 3] * inv);
    }
}

// Grid (ceil(n_tokens / ⌊64 / G⌋), n_kv_heads), 256 threads, FA_SMEM(D, BK) bytes of dynamic
// shared memory. q: [n_tokens][n_heads][D]; K, V: [positions][n_kv_heads][D] (the cache, keys
// 0..start_pos + n_tokens written); out like q. Requires n_heads % n_kv_heads == 0, G ≤ 64.
#define FA_ENTRY(D, BK)                                                                       \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2)                               \
        attention_prefill_##D##_##BK(const float* __restrict__ q, const float* __restrict__ K, \
                                     const float* __restrict__ V, float* __restrict__ out,    \
                                     int n_tokens, int start_pos, int n_heads,                \
                                     int n_kv_heads, int window, float scale) {               \
        attention_tile<D, BK>(q, K, V, out, n_tokens, start_pos, n_heads, n_kv_heads, window, \
                              scale);                                                         \
    }

FA_ENTRY(64, 64)
FA_ENTRY(128, 64)
FA_ENTRY(128, 32)
