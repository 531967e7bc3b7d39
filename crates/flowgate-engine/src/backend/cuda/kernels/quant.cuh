// GGUF block decoding, ported from flowgate-formats' quant/ (which is bit-exact against the
// python `gguf` package): `deq8<DT>(row, i, out)` writes elements i..i+8 of one row (i a
// multiple of 8, all eight inside the row). Eight consecutive elements always share one scale
// in every format here (sub-blocks are 16 or 32 wide), so the scale is decoded once per call.
// The float order of each formula follows the CPU reference (e.g. Q4_K: (d*sc)*q - dmin*m).

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_Q4_0 3
#define DT_Q4_1 4
#define DT_Q5_0 5
#define DT_Q5_1 6
#define DT_Q8_0 7
#define DT_Q4_K 8
#define DT_Q5_K 9
#define DT_Q6_K 10

// (`byte(k)` gives scale byte k: read from memory here, picked from registers by the 8-bit
// mat-vec, which loads a block's header at once.)
template <class Byte>
__device__ __forceinline__ void scale_min_k4_by(int j, Byte byte, int* sc, int* m) {
    if (j < 4) {
        *sc = byte(j) & 63;
        *m = byte(j + 4) & 63;
    } else {
        *sc = (byte(j + 4) & 0x0F) | ((byte(j - 4) >> 6) << 4);
        *m = (byte(j + 4) >> 4) | ((byte(j) >> 6) << 4);
    }
}

__device__ __forceinline__ void scale_min_k4(int j, const u8* s, int* sc, int* m) {
    scale_min_k4_by(j, [s](int k) { return (int)s[k]; }, sc, m);
}

template <int DT>
__device__ __forceinline__ void deq8(const u8* row, int i, float* o);

template <>
__device__ __forceinline__ void deq8<DT_F32>(const u8* row, int i, float* o) {
    const float* r = (const float*)row + i;
#pragma unroll
    for (int k = 0; k < 8; k++) o[k] = r[k];
}

template <>
__device__ __forceinline__ void deq8<DT_F16>(const u8* row, int i, float* o) {
    const u16* r = (const u16*)row + i;
#pragma unroll
    for (int k = 0; k < 8; k++) o[k] = h2f(r[k]);
}

template <>
__device__ __forceinline__ void deq8<DT_BF16>(const u8* row, int i, float* o) {
    const u16* r = (const u16*)row + i;
#pragma unroll
    for (int k = 0; k < 8; k++) o[k] = bf2f(r[k]);
}

template <>
__device__ __forceinline__ void deq8<DT_Q4_0>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 32) * 18;
    int j = i % 32;
    float d = h2f(ld16(b));
    const u8* qs = b + 2;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int q = j < 16 ? (qs[j + k] & 0x0F) : (qs[j - 16 + k] >> 4);
        o[k] = d * (float)(q - 8);
    }
}

template <>
__device__ __forceinline__ void deq8<DT_Q4_1>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 32) * 20;
    int j = i % 32;
    float d = h2f(ld16(b));
    float m = h2f(ld16(b + 2));
    const u8* qs = b + 4;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int q = j < 16 ? (qs[j + k] & 0x0F) : (qs[j - 16 + k] >> 4);
        o[k] = d * (float)q + m;
    }
}

template <>
__device__ __forceinline__ void deq8<DT_Q5_0>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 32) * 22;
    int j = i % 32;
    float d = h2f(ld16(b));
    u32 qh = (u32)b[2] | ((u32)b[3] << 8) | ((u32)b[4] << 16) | ((u32)b[5] << 24);
    const u8* qs = b + 6;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int jj = j + k;
        int q = jj < 16 ? (qs[jj] & 0x0F) : (qs[jj - 16] >> 4);
        q |= ((qh >> jj) & 1) << 4;
        o[k] = d * (float)(q - 16);
    }
}

template <>
__device__ __forceinline__ void deq8<DT_Q5_1>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 32) * 24;
    int j = i % 32;
    float d = h2f(ld16(b));
    float m = h2f(ld16(b + 2));
    u32 qh = (u32)b[4] | ((u32)b[5] << 8) | ((u32)b[6] << 16) | ((u32)b[7] << 24);
    const u8* qs = b + 8;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int jj = j + k;
        int q = jj < 16 ? (qs[jj] & 0x0F) : (qs[jj - 16] >> 4);
        q |= ((qh >> jj) & 1) << 4;
        o[k] = d * (float)q + m;
    }
}

template <>
__device__ __forceinline__ void deq8<DT_Q8_0>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 32) * 34;
    int j = i % 32;
    float d = h2f(ld16(b));
    // 2-byte aligned: four u16 loads.
    const u16* q16 = (const u16*)(b + 2 + j);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        u16 v = q16[k];
        o[2 * k] = (float)(i8)(v & 0xFF) * d;
        o[2 * k + 1] = (float)(i8)(v >> 8) * d;
    }
}

template <>
__device__ __forceinline__ void deq8<DT_Q4_K>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 256) * 144;
    int e = i % 256;
    int sub = e / 32, l = e % 32;
    float d = h2f(ld16(b));
    float dmin = h2f(ld16(b + 2));
    int sc, m;
    scale_min_k4(sub, b + 4, &sc, &m);
    float d1 = d * (float)sc;
    float m1 = dmin * (float)m;
    // Blocks are 144 bytes (16-aligned) and l is a multiple of 8: two aligned u32 loads.
    const u32* q32 = (const u32*)(b + 16 + 32 * (sub / 2) + l);
    int shift = (sub & 1) * 4;
#pragma unroll
    for (int w = 0; w < 2; w++) {
        u32 v = q32[w] >> shift;
#pragma unroll
        for (int k = 0; k < 4; k++) o[4 * w + k] = d1 * (float)((v >> (8 * k)) & 0x0F) - m1;
    }
}

template <>
__device__ __forceinline__ void deq8<DT_Q5_K>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 256) * 176;
    int e = i % 256;
    int sub = e / 32, l = e % 32;
    float d = h2f(ld16(b));
    float dmin = h2f(ld16(b + 2));
    int sc, m;
    scale_min_k4(sub, b + 4, &sc, &m);
    float d1 = d * (float)sc;
    float m1 = dmin * (float)m;
    const u8* qh = b + 16;
    const u8* qs = b + 48 + 32 * (sub / 2);
    int shift = (sub & 1) * 4;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int q = ((qs[l + k] >> shift) & 0x0F) | (((qh[l + k] >> sub) & 1) << 4);
        o[k] = d1 * (float)q - m1;
    }
}

template <>
__device__ __forceinline__ void deq8<DT_Q6_K>(const u8* row, int i, float* o) {
    const u8* b = row + (i / 256) * 210;
    int e = i % 256;
    int h = e / 128, r = e % 128;
    int quarter = r / 32, l = r % 32;
    const u8* ql = b + 64 * h + 32 * (quarter % 2) + l;
    const u8* qh = b + 128 + 32 * h + l;
    float d = h2f(ld16(b + 208));
    float ds = d * (float)(i8)b[192 + e / 16];
    int lshift = quarter < 2 ? 0 : 4;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int lo = (ql[k] >> lshift) & 0x0F;
        int hi = (qh[k] >> (2 * quarter)) & 3;
        o[k] = ds * (float)((lo | (hi << 4)) - 32);
    }
}

// One element of a float row (tails of rows whose width is not a multiple of 8).
template <int DT>
__device__ __forceinline__ float deq1(const u8* row, int i) {
    if (DT == DT_F32) return ((const float*)row)[i];
    if (DT == DT_F16) return h2f(((const u16*)row)[i]);
    if (DT == DT_BF16) return bf2f(((const u16*)row)[i]);
    return 0.0f;
}
