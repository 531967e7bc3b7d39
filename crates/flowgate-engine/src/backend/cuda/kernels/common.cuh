// Shared by every kernel family (prepended to each .cu before NVRTC compiles it: NVRTC has no
// include path for the embedded sources). No CUDA headers are needed: half and bfloat16
// conversions are done with PTX `cvt` and bit shifts.
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Little-endian u16 at a 2-byte-aligned address.
__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Jobs of one grouped mat-vec launch (matvec_quant.cu, matvec_q8.cu), passed by value: job j
// multiplies matrix w[j] (rows[j] rows) with vector x[j] into y[j].
#define MAXJ 16
struct MvJobs {
    u64 w[MAXJ];
    u64 x[MAXJ];
    u64 y[MAXJ];
    int rows[MAXJ];
};

// Programmatic dependent launch (Hopper and later). A kernel the host launches with the PDL
// attribute (`PDL_KERNELS` in backend/cuda/mod.rs) may start while the kernel before it on
// the stream is still finishing: until this returns it must not read anything earlier
// kernels wrote, nor write anything (weights, which never change, it may read). Returns once
// the previous grid has completed and its writes are visible; a no-op without the attribute.
__device__ __forceinline__ void grid_dep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel on the stream, if launched for PDL, start now rather than when this
// one ends: its blocks become resident beside this kernel's, and a mat-vec among them asks L2
// for its weights (prefetch_l2) while this kernel runs, then waits in grid_dep_wait() for this
// one to complete as before. Only the short kernels between mat-vecs call it (norms, RoPE,
// attention, SiLU·mul, adds, quantisation, routing), so at most the next mat-vec's weights are
// requested ahead: DRAM streams them while the short kernels are latency-bound. Safe for the
// chain: the next kernel launches only once all of this one's blocks are resident, and its
// grid_dep_wait() returns only after this grid has completed. Compiled in with
// -DFG_EARLY_LAUNCH (FLOWGATE_CUDA_EARLY_LAUNCH=0 leaves it out).
__device__ __forceinline__ void grid_dep_launch() {
#if defined(FG_EARLY_LAUNCH) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Entry of a short kernel between mat-vecs: lets the next kernel launch, then waits for the
// previous one.
__device__ __forceinline__ void grid_dep_enter() {
    grid_dep_launch();
    grid_dep_wait();
}

// Asks L2 to fetch [p, p + bytes) (128-byte lines spread over the 32 lanes of a warp): a
// PDL kernel's weights, requested before grid_dep_wait().
__device__ __forceinline__ void prefetch_l2(const void* p, u64 bytes, int lane) {
    const char* c = (const char*)p;
    for (u64 o = (u64)lane * 128; o < bytes; o += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c + o));
}

