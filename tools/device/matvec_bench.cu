// Microbenchmark of the Q4_K decode mat-vec variants (nvcc on the device machine):
//   nvcc -O3 -arch=sm_90 -Xptxas -v -o /tmp/mvb tools/device/matvec_bench.cu && /tmp/mvb
// The kernels are the embedded sources (common.cuh, quant.cuh, matvec_quant.cu) plus candidate
// variants; each is timed with events over matrices that together exceed the L2 cache.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>
#include "../../crates/flowgate-engine/src/backend/cuda/kernels/common.cuh"
#include "../../crates/flowgate-engine/src/backend/cuda/kernels/quant.cuh"
#include "../../crates/flowgate-engine/src/backend/cuda/kernels/matvec_quant.cu"
#include "../../crates/flowgate-engine/src/backend/cuda/kernels/matvec_q8.cu"

// Variant B: one warp per row, no unroll (the first version).
__global__ void mv_b(const u8* W, u64 row_bytes, const float* x, float* y, int rows, int cols) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + warp;
    if (r >= rows) return;
    const u8* row = W + (u64)r * row_bytes;
    float acc = 0.f;
    for (int base = lane * 8; base < cols; base += 256) {
        float w[8];
        deq8<DT_Q4_K>(row, base, w);
        const float4* xv = (const float4*)(x + base);
        float4 a = xv[0], b = xv[1];
        acc += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[r] = acc;
}

// Variant C: a lane takes 16 bytes of one Q4_K block's quants (32 weights: 16 of sub-block 2j
// and 16 of 2j+1); 8 lanes cover one block, a warp 4 blocks per step. One row per warp.
__global__ void mv_c(const u8* W, u64 row_bytes, const float* x, float* y, int rows, int cols) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + warp;
    if (r >= rows) return;
    const u8* row = W + (u64)r * row_bytes;
    int nb = cols / 256;
    int j = (lane & 7) >> 1;         // 64-element group 0..3
    int half = lane & 1;              // bytes 0..15 or 16..31 of the group
    float acc = 0.f;
    for (int blk = lane >> 3; blk < nb; blk += 4) {
        const u8* b = row + (u64)blk * 144;
        float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
        int sc0, m0, sc1, m1;
        scale_min_k4(2 * j, b + 4, &sc0, &m0);
        scale_min_k4(2 * j + 1, b + 4, &sc1, &m1);
        float d0 = d * sc0, mm0 = dmin * m0, d1 = d * sc1, mm1 = dmin * m1;
        uint4 q = *(const uint4*)(b + 16 + 32 * j + 16 * half);
        const float* x0 = x + blk * 256 + 64 * j + 16 * half;
        const float* x1 = x0 + 32;
        u32 qs[4] = {q.x, q.y, q.z, q.w};
        float s0 = 0.f, s1 = 0.f, xs0 = 0.f, xs1 = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float4 a = *(const float4*)(x0 + 4 * k);
            float4 c = *(const float4*)(x1 + 4 * k);
            u32 v = qs[k];
            s0 += (float)(v & 15) * a.x + (float)((v >> 8) & 15) * a.y + (float)((v >> 16) & 15) * a.z + (float)((v >> 24) & 15) * a.w;
            s1 += (float)((v >> 4) & 15) * c.x + (float)((v >> 12) & 15) * c.y + (float)((v >> 20) & 15) * c.z + (float)((v >> 28) & 15) * c.w;
            xs0 += a.x + a.y + a.z + a.w;
            xs1 += c.x + c.y + c.z + c.w;
        }
        acc += d0 * s0 - mm0 * xs0 + d1 * s1 - mm1 * xs1;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[r] = acc;
}

// Variant R: R rows per warp; the 8 activations a lane needs are loaded once for all R rows
// (less L1 traffic per weight byte) and R weight streams are in flight per lane.
template <int DT, int R>
__global__ void mv_rows(const u8* __restrict__ W, u64 row_bytes, const float* __restrict__ x,
                        float* __restrict__ y, int rows, int cols) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r0 = (blockIdx.x * (blockDim.x >> 5) + warp) * R;
    if (r0 >= rows) return;
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = 0.f;
    for (int base = lane * 8; base < cols; base += 256) {
        float4 a = *(const float4*)(x + base);
        float4 b = *(const float4*)(x + base + 4);
#pragma unroll
        for (int i = 0; i < R; i++) {
            if (r0 + i < rows) {
                float w[8];
                deq8<DT>(W + (u64)(r0 + i) * row_bytes, base, w);
                acc[i] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < R; i++) {
        float v = warp_sum(acc[i]);
        if (lane == 0 && r0 + i < rows) y[r0 + i] = v;
    }
}

static void bench_shape(int rows, int cols) {
    const int nmat = 6;
    const u64 row_bytes = cols / 256 * 144, bytes = row_bytes * rows;
    // Enough copies that the set exceeds the 50 MB L2.
    int copies = (int)((200ull << 20) / bytes) + 2;
    std::vector<u8> h(bytes);
    srand(1);
    for (u64 i = 0; i < bytes; i++) h[i] = rand() & 255;
    for (u64 b = 0; b < bytes; b += 144) { u16 d = 0x0CEA, m = 0x068D; memcpy(&h[b], &d, 2); memcpy(&h[b + 2], &m, 2); }
    std::vector<u8*> W(copies);
    for (int i = 0; i < copies; i++) { cudaMalloc(&W[i], bytes); cudaMemcpy(W[i], h.data(), bytes, cudaMemcpyHostToDevice); }
    std::vector<float> hx(cols * 8);
    for (auto& v : hx) v = (rand() / (float)RAND_MAX) - 0.5f;
    float *x, *y, *yref;
    cudaMalloc(&x, hx.size() * 4); cudaMalloc(&y, rows * 8 * 4); cudaMalloc(&yref, rows * 8 * 4);
    cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice);
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    std::vector<float> ref(rows), got(rows);
    printf("-- %d x %d Q4_K (%.1f MB), %d copies\n", rows, cols, bytes / 1e6, copies);
    auto run = [&](const char* name, auto launch) {
        for (int i = 0; i < 3; i++) launch(W[i % copies]);
        cudaEventRecord(e0);
        const int reps = 200;
        for (int i = 0; i < reps; i++) launch(W[i % copies]);
        cudaEventRecord(e1); cudaEventSynchronize(e1);
        float ms; cudaEventElapsedTime(&ms, e0, e1);
        launch(W[0]); cudaMemcpy(got.data(), y, rows * 4, cudaMemcpyDeviceToHost);
        double num = 0, den = 0;
        for (int i = 0; i < rows; i++) { num += (got[i] - ref[i]) * (double)(got[i] - ref[i]); den += ref[i] * (double)ref[i]; }
        printf("%-34s %8.2f us  %7.0f GB/s  rel err %.1e  %s\n", name, ms * 1e3 / reps, bytes / (ms / reps * 1e-3) / 1e9, sqrt(num / den), cudaGetErrorString(cudaGetLastError()));
    };
    mv_b<<<(rows + 7) / 8, 256>>>(W[0], row_bytes, x, yref, rows, cols);
    cudaMemcpy(ref.data(), yref, rows * 4, cudaMemcpyDeviceToHost);
    run("B warp/row, 8 elems/lane", [&](u8* w) { mv_b<<<(rows + 7) / 8, 256>>>(w, row_bytes, x, y, rows, cols); });
    run("A matvec_q4_k (batch) wpr=1", [&](u8* w) { matvec_q4_k<<<(rows + 7) / 8, 256>>>(w, row_bytes, x, y, rows, cols, 1, rows, 1); });
    run("C warp/row, 16 B/lane", [&](u8* w) { mv_c<<<(rows + 7) / 8, 256>>>(w, row_bytes, x, y, rows, cols); });
    run("R 2 rows/warp", [&](u8* w) { mv_rows<DT_Q4_K, 2><<<(rows + 15) / 16, 256>>>(w, row_bytes, x, y, rows, cols); });
    run("R 4 rows/warp", [&](u8* w) { mv_rows<DT_Q4_K, 4><<<(rows + 31) / 32, 256>>>(w, row_bytes, x, y, rows, cols); });
    run("R 2 rows/warp, 4 warps/block", [&](u8* w) { mv_rows<DT_Q4_K, 2><<<(rows + 7) / 8, 128>>>(w, row_bytes, x, y, rows, cols); });
    for (int wpr : {1, 2, 4, 8}) {
        char name[64];
        snprintf(name, sizeof name, "matvec1_q4_k wpr=%d", wpr);
        run(name, [&](u8* w) { matvec1_q4_k<<<(rows + 8 / wpr - 1) / (8 / wpr), 256>>>(w, row_bytes, x, y, rows, cols, wpr); });
    }
    // int8 activations (matvec_q8.cu): quantise x once, then the dp4a kernels.
    u8* xq;
    cudaMalloc(&xq, cols + cols / 8 + 16);
    QuantJobs qj;
    qj.x[0] = (u64)x; qj.q[0] = (u64)xq;
    run("quantize_q8 + q8 R=1 (256 thr)", [&](u8* w) {
        quantize_q8<<<(cols / 32 + 7) / 8, 256>>>(qj, cols);
        MvJobs j; j.w[0] = (u64)w; j.x[0] = (u64)xq; j.y[0] = (u64)y; j.rows[0] = rows;
        matvec1q8_q4_k<<<dim3((rows + 7) / 8, 1), 256>>>(j, row_bytes, cols);
    });
    quantize_q8<<<(cols / 32 + 7) / 8, 256>>>(qj, cols);
    run("q8 R=1 (256 thr)", [&](u8* w) {
        MvJobs j; j.w[0] = (u64)w; j.x[0] = (u64)xq; j.y[0] = (u64)y; j.rows[0] = rows;
        matvec1q8_q4_k<<<dim3((rows + 7) / 8, 1), 256>>>(j, row_bytes, cols);
    });
    run("q8 R=1 (128 thr)", [&](u8* w) {
        MvJobs j; j.w[0] = (u64)w; j.x[0] = (u64)xq; j.y[0] = (u64)y; j.rows[0] = rows;
        matvec1q8_q4_k<<<dim3((rows + 3) / 4, 1), 128>>>(j, row_bytes, cols);
    });
    run("q8 R=2 (256 thr)", [&](u8* w) {
        MvJobs j; j.w[0] = (u64)w; j.x[0] = (u64)xq; j.y[0] = (u64)y; j.rows[0] = rows;
        matvec1q8r2_q4_k<<<dim3((rows + 15) / 16, 1), 256>>>(j, row_bytes, cols);
    });
    run("q8 R=2 (128 thr)", [&](u8* w) {
        MvJobs j; j.w[0] = (u64)w; j.x[0] = (u64)xq; j.y[0] = (u64)y; j.rows[0] = rows;
        matvec1q8r2_q4_k<<<dim3((rows + 7) / 8, 1), 128>>>(j, row_bytes, cols);
    });
    cudaFree(xq);
    for (auto p : W) cudaFree(p);
    cudaFree(x); cudaFree(y); cudaFree(yref);
}

int main() {
    bench_shape(14336, 4096);
    bench_shape(4096, 14336);
    bench_shape(4096, 4096);
    bench_shape(1024, 4096);
    bench_shape(768, 2048);
    bench_shape(2048, 768);
    bench_shape(128256, 4096);
    return 0;
}
