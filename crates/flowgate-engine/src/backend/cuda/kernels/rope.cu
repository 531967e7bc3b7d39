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
