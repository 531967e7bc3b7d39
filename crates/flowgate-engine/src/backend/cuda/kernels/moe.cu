// MoE decode routed on the device (no host synchronisation per sparse layer): the router's
// softmax and top-k, and the weighted sum of the chosen experts' outputs. The experts'
// products themselves are the expert-indexed mat-vecs (matvec1x_*, matvec1q8x_*).

// Block-wide (value, index) maximum, ties to the lower index; every thread gets the result.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = sv[0]; i = si[0];
    for (int w = 1; w < nw; w++)
        if (sv[w] > v || (sv[w] == v && si[w] < i)) { v = sv[w]; i = si[w]; }
}

__device__ __forceinline__ float block_sum(float v, float* sv) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sv[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < nw; w++) s += sv[w];
    return s;
}

// One block: softmax over n ≤ 4096 logits, the k largest probabilities (ties to the lower
// index, as torch.topk and the host's route()), optionally renormalised to sum to one.
// Writes ids[0..k] (int) and w[0..k].
#define TOPK_MAXN 4096
// One block per token: block b reads logits[b·n ..] and writes ids[b·k ..], w[b·k ..].
// n ≤ 1024 and k ≤ 32 (every MoE of flowgate's families): one warp, 32 logits per lane in
// registers, k rounds of a shuffle argmax, no block synchronisation (the block version below
// took ~10 µs per token and layer: k + 2 block reductions).
__device__ __forceinline__ void router_topk_warp(const float* logits, int n, int k, int renorm,
                                                 int* ids, float* w) {
    int lane = threadIdx.x;
    float e[32];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < 32; c++) {
        int i = lane + 32 * c;
        e[c] = i < n ? logits[i] : -INFINITY;
        m = fmaxf(m, e[c]);
    }
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < 32; c++) {
        int i = lane + 32 * c;
        e[c] = i < n ? expf(e[c] - m) : -1.0f;
        if (i < n) s += e[c];
    }
    float sum = warp_sum(s);
    float mine = 0.0f;  // lane r: the r-th chosen probability
    for (int r = 0; r < k; r++) {
        float bv = -1.0f;
        int bi = n;
#pragma unroll
        for (int c = 0; c < 32; c++)
            if (e[c] > bv) {  // ascending index within a lane: ties keep the lower
                bv = e[c];
                bi = lane + 32 * c;
            }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
#pragma unroll
        for (int c = 0; c < 32; c++)
            if (lane + 32 * c == bi) e[c] = -1.0f;  // probabilities are ≥ 0: never again
        if (lane == r) {
            ids[r] = bi;
            mine = bv / sum;
        }
    }
    float t = warp_sum(lane < k ? mine : 0.0f);
    if (lane < k) w[lane] = renorm ? mine / t : mine;
}

extern "C" __global__ void router_topk(const float* logits, int n, int k, int renorm, int* ids,
                                       float* w) {
    grid_dep_enter();
    logits += (u64)blockIdx.x * n;
    ids += (u64)blockIdx.x * k;
    w += (u64)blockIdx.x * k;
    if (n <= 1024 && k <= 32) {
        if (threadIdx.x < 32) router_topk_warp(logits, n, k, renorm, ids, w);
        return;
    }
    __shared__ float p[TOPK_MAXN];
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float chosen[64];
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, logits[i]);
    int dummy = 0;
    block_argmax(m, dummy, sv, si);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(logits[i] - m);
        p[i] = e;
        s += e;
    }
    float sum = block_sum(s, sv);
    for (int r = 0; r < k; r++) {
        float v = -1.0f;
        int bi = n;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            if (p[i] > v) { v = p[i]; bi = i; }  // ascending i: ties keep the lower index
        block_argmax(v, bi, sv, si);
        if (threadIdx.x == 0) {
            ids[r] = bi;
            chosen[r] = v / sum;
            p[bi] = -1.0f;  // probabilities are ≥ 0: never picked again
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int r = 0; r < k; r++) t += chosen[r];
        for (int r = 0; r < k; r++) w[r] = renorm ? chosen[r] / t : chosen[r];
    }
}

// out[i] = Σ_j w[j] · ys[j·n + i]: the chosen experts' outputs weighted by their routing weights.
// A zero weight is an expert computed elsewhere (moe_split_mask): its ys were never written.
extern "C" __global__ void moe_combine(const float* ys, const float* w, int k, int n, float* out) {
    grid_dep_enter();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.0f;
    for (int j = 0; j < k; j++)
        if (w[j] != 0.0f) s += w[j] * ys[(u64)j * n + i];
    out[i] = s;
}

// Paged experts (--vram-budget): one launch points the layer's table entries at where the
// experts are read from (gate, up and down each: a device slot the host copied the expert
// into, or the expert's page-locked host memory, read in place over the link) and, for routes
// chosen on the host, writes the ids and weights the expert-indexed products and moe_combine
// read. Passed by value: no staging buffer to keep alive.
#define PAGE_MAX 64
// The table has four sections of n_experts u64: gate, up and down addresses, then 1 where
// the expert is in a device slot, 0 where it is read in place.
struct MoePage {
    int n;             // table entries to set
    int k;             // routes to write (0: none)
    int e[PAGE_MAX];   // expert ids of the entries
    int ids[PAGE_MAX];
    float w[PAGE_MAX];
    int r[PAGE_MAX];   // the entries' residency (1: a device slot)
    u64 a[3][PAGE_MAX];  // addresses of the entries' gate, up and down
};

extern "C" __global__ void moe_page(u64* table, int n_experts, MoePage p, int* ids, float* w) {
    int i = threadIdx.x;
    if (i < p.n) {
        int e = p.e[i];
        table[e] = p.a[0][i];
        table[n_experts + e] = p.a[1][i];
        table[2 * n_experts + e] = p.a[2][i];
        table[3 * n_experts + e] = (u64)p.r[i];
    }
    if (i < p.k) {
        ids[i] = p.ids[i];
        w[i] = p.w[i];
    }
}

// Misses read in place, routed on the device (paging.rs, `moe_in_place`): of the k routes
// (ids, w), the misses (resident[id] == 0) in route order, m of them, the last split[m] are
// the CPU's; the GPU's routes (gids, gw) are the same with those replaced by id -1, weight 0
// (the products skip them, moe_combine adds nothing for them). The host reads the routes back
// and picks the same experts from the same table. One thread: k ≤ 64.
struct MoeSplit {
    int j[PAGE_MAX + 1];  // CPU experts for m misses
};

extern "C" __global__ void moe_split_mask(const u64* resident, const int* ids, const float* w,
                                          int k, MoeSplit split, int* gids, float* gw) {
    if (threadIdx.x != 0) return;
    int m = 0;
    for (int i = 0; i < k; i++) m += resident[ids[i]] == 0;
    int first_cpu = m - split.j[m];  // misses of rank ≥ this go to the CPU
    int rank = 0;
    for (int i = 0; i < k; i++) {
        int id = ids[i];
        bool cpu = false;
        if (resident[id] == 0) {
            cpu = rank >= first_cpu;
            rank++;
        }
        gids[i] = cpu ? -1 : id;
        gw[i] = cpu ? 0.0f : w[i];
    }
}

// Uniform routing drawn on the device (Routing::UniformRandom, a benchmarking aid): the same
// draw as `uniform_route` in models/moe.rs, which defines it — k distinct experts of n, each
// weighted 1/k, by the first k steps of a Fisher–Yates shuffle of 0..n driven by SplitMix64
// seeded with seed ^ layer << 40 ^ pos · 0x9E3779B97F4A7C15 (the swaps kept as a list, k ≤ 64).
// The position comes from the step slot (token, position) while a step is recorded as a
// graph, else from `pos`. One thread.
__device__ __forceinline__ int shuffled(const int* at, const int* val, int m, int i) {
    for (int t = 0; t < m; t++)
        if (at[t] == i) return val[t];
    return i;
}

__device__ __forceinline__ void shuffle_set(int* at, int* val, int* m, int i, int v) {
    for (int t = 0; t < *m; t++)
        if (at[t] == i) {
            val[t] = v;
            return;
        }
    at[*m] = i;
    val[*m] = v;
    (*m)++;
}

extern "C" __global__ void moe_uniform_routes(const int* step, int pos, u64 seed, int layer,
                                              int n, int k, int* ids, float* w) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    u64 p = (u64)(unsigned)(step ? step[1] : pos);
    u64 state = seed ^ ((u64)layer << 40) ^ (p * 0x9E3779B97F4A7C15ull);
    int at[2 * PAGE_MAX], val[2 * PAGE_MAX], m = 0;
    for (int i = 0; i < k; i++) {
        state += 0x9E3779B97F4A7C15ull;
        u64 z = state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        int j = i + (int)(z % (u64)(n - i));
        int vi = shuffled(at, val, m, i), vj = shuffled(at, val, m, j);
        shuffle_set(at, val, &m, i, vj);
        shuffle_set(at, val, &m, j, vi);
    }
    for (int i = 0; i < k; i++) {
        ids[i] = shuffled(at, val, m, i);
        w[i] = 1.0f / (float)k;
    }
}

// The CPU's share of a paged layer joins the stream (paging.rs, `join_cpu_share`): each
// block waits until the host raised `*flag` to `seq` (compared cyclically, as
// cuStreamWaitValue32's GEQ does), reading it over the link with acquire semantics, then
// adds the CPU's sum `part` (page-locked, device-mapped, read in place past the caches) into
// `out`. One operation instead of the stream's wait, a copy and an add, and the flag is seen
// within a read's round trip over the link (the stream's own wait passed ~8 µs later on the
// H100 box). A flag that never comes traps after 10 s rather than hang the stream (the host
// raises it even when the share failed).
__device__ __forceinline__ unsigned int ld_acquire_sys(const unsigned int* p) {
    unsigned int v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

extern "C" __global__ void moe_cpu_join(const unsigned int* flag, unsigned int seq,
                                        const float* part, float* out, int n) {
    if (threadIdx.x == 0) {
        u64 t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        while ((int)(ld_acquire_sys(flag) - seq) < 0) {
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            if (t - t0 > 10000000000ull) __trap();
        }
    }
    __syncthreads();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] += __ldcv(part + i);
}

// A paged layer's read-back without a host synchronisation: copies up to three device ranges
// (`n*` 4-byte words each, a null source skipped) into page-locked, device-mapped host memory
// at `dst + at*` bytes, then raises `*flag` to `seq` once every word is visible to the host
// (each thread fences its writes before the block's barrier; the flag is written last). The
// host spins on the flag instead of synchronising the stream: the kernel runs after all the
// work queued before it, so the flag also says that work is done. One block.
extern "C" __global__ void publish_back(const u32* a, int na, u64 at_a, const u32* b, int nb,
                                        u64 at_b, const u32* c, int nc, u64 at_c,
                                        unsigned char* dst, volatile u32* flag, u32 seq) {
    for (int i = threadIdx.x; i < na; i += blockDim.x)
        ((u32*)(dst + at_a))[i] = a[i];
    for (int i = threadIdx.x; i < nb; i += blockDim.x)
        ((u32*)(dst + at_b))[i] = b[i];
    for (int i = threadIdx.x; i < nc; i += blockDim.x)
        ((u32*)(dst + at_c))[i] = c[i];
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        *flag = seq;
    }
}
