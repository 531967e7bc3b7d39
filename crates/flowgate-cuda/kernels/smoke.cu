// Smoke-test kernels for flowgate-cuda's NVRTC path (not model kernels).
extern "C" __global__ void axpy(unsigned int n, float a, const float* x, float* y) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = a * x[i] + y[i];
    }
}

extern "C" __global__ void fill_u32(unsigned int n, unsigned int v, unsigned int* out) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = v ^ i;
    }
}
