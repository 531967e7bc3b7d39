// Rotary embeddings. `inv_freq` (one per rotated pair) already carries the model's scaling
// (linear, llama3 bands, or per-pair factors from `rope_freqs.weight`), computed on the host by
// models::rope. The angle is (float)position * inv_freq in f32, as in HF transformers.
// interleaved == 0: pairs (i, i + d/2) (NeoX / HF "rotate_half"); 1: pairs (2i, 2i + 1) (GPT-J).
extern "C" __global__ void rope(float* x, const float* inv_freq, int n_tokens, int n_heads,
                                int head_dim, int start_pos, int interleaved) {
    int half = head_dim / 2;
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 total = (u64)n_tokens * n_heads * half;
    if (idx >= total) return;
    int i = (int)(idx % half);
    u64 th = idx / half;
    int t = (int)(th / n_heads);
    float a = (float)(start_pos + t) * inv_freq[i];
    float c = cosf(a), s = sinf(a);
    float* h = x + th * head_dim;
    int ia = interleaved ? 2 * i : i;
    int ib = interleaved ? 2 * i + 1 : i + half;
    float va = h[ia], vb = h[ib];
    h[ia] = va * c - vb * s;
    h[ib] = vb * c + va * s;
}

// The attention block's middle, fused: one block per (head, token) (grid.x: the n_heads query
// heads, then the n_kv_heads key heads; grid.y: tokens at positions pos, pos + 1, …), one
// thread per rotated pair. Optionally the
// head's RMSNorm (qwen3: per-head q/k norms; same float order as rms_norm), then RoPE at
// position `pos`; query heads are rotated in place, key heads are rotated into k and into the
// cache row `pos` of kc, whose value row of vc gets v. Replaces up to two norms, two ropes and
// two cache copies.
extern "C" __global__ void qk_rope_kv(float* q, float* k, const float* v, const float* qn,
                                      const float* kn, float eps, int has_norm, float* kc,
                                      float* vc, const float* inv_freq, int n_heads,
                                      int n_kv_heads, int head_dim, int pos,
                                      const int* __restrict__ pos_dev, int interleaved) {
    grid_dep_enter();
    __shared__ float part[32];
    // A recorded decode step reads its position from device memory.
    if (pos_dev) pos = *pos_dev;
    // Token blockIdx.y of the call (grid.y = tokens): its rows of q, k, v and its position.
    q += (u64)blockIdx.y * n_heads * head_dim;
    k += (u64)blockIdx.y * n_kv_heads * head_dim;
    v += (u64)blockIdx.y * n_kv_heads * head_dim;
    pos += blockIdx.y;
    int hidx = blockIdx.x;
    bool isq = hidx < n_heads;
    int head = isq ? hidx : hidx - n_heads;
    float* x = (isq ? q : k) + (u64)head * head_dim;
    int half = head_dim / 2;
    int i = threadIdx.x;
    int ia = interleaved ? 2 * i : i;
    int ib = interleaved ? 2 * i + 1 : i + half;
    float va = 0.0f, vb = 0.0f;
    if (i < half) {
        va = x[ia];
        vb = x[ib];
    }
    if (has_norm) {
        float ss = warp_sum(va * va + vb * vb);
        int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        if (lane == 0) part[warp] = ss;
        __syncthreads();
        float tot = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) tot += part[w];
        float r = (float)(1.0 / sqrt((double)tot / (double)head_dim + (double)eps));
        const float* nw = isq ? qn : kn;
        if (i < half) {
            va = va * r * nw[ia];
            vb = vb * r * nw[ib];
        }
    }
    if (i >= half) return;
    float a = (float)pos * inv_freq[i];
    float c = cosf(a), s = sinf(a);
    float na = va * c - vb * s, nb = vb * c + va * s;
    x[ia] = na;
    x[ib] = nb;
    if (!isq) {
        u64 row = (u64)pos * n_kv_heads * head_dim + (u64)head * head_dim;
        kc[row + ia] = na;
        kc[row + ib] = nb;
        const float* vs = v + (u64)head * head_dim;
        vc[row + ia] = vs[ia];
        vc[row + ib] = vs[ib];
    }
}

// The (cos, sin) of every position p < n_pos and rotated pair i < half, at cs[p·half + i]:
// the angle (float)p · inv_freq[i] and its cosf and sinf, as rope and qk_rope_kv compute
// them. The decode attention kernel (attention.cu), which does qk_rope_kv's work itself,
// reads them instead of computing them on its way to the first key.
extern "C" __global__ void rope_table(float2* cs, const float* inv_freq, int half, int n_pos) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)n_pos * half) return;
    int i = (int)(idx % half);
    int p = (int)(idx / half);
    float a = (float)p * inv_freq[i];
    cs[idx] = make_float2(cosf(a), sinf(a));
}
