// Host->device copy rate of expert-sized copies from differently allocated host memory,
// alone and while CPU threads stream through other memory (as CPU experts do).
// nvcc -O2 -arch=sm_90 -o /tmp/h2d_bench tools/device/h2d_bench.cu -lpthread
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <thread>
#include <time.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1);} } while (0)
static const size_t POOL = 2ull << 30, PART = 884736, EXPERT = 3 * PART;
static std::atomic<bool> stop{false};
static std::atomic<long> sink{0};

static std::atomic<long> read_bytes{0};
static void reader(char* p, size_t n) {
  long s = 0, bytes = 0;
  const long* q = (const long*)p;
  while (!stop.load(std::memory_order_relaxed)) {
    for (size_t i = 0; i + 8 <= n / 8 && !stop.load(std::memory_order_relaxed); i += 8) {
      s += q[i] + q[i + 1] + q[i + 2] + q[i + 3] + q[i + 4] + q[i + 5] + q[i + 6] + q[i + 7];
      bytes += 64;
    }
  }
  sink += s;
  read_bytes += bytes;
}
static double now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static double run(const char* name, char* host, char* dev, int parts_per_copy, int n_experts, cudaStream_t st) {
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  size_t n_slots = POOL / EXPERT;
  srand(7);
  CK(cudaEventRecord(a, st));
  for (int i = 0; i < n_experts; i++) {
    size_t x = (size_t)rand() % n_slots;
    size_t d = (size_t)(i % 64) * EXPERT;
    if (parts_per_copy == 1) CK(cudaMemcpyAsync(dev + d, host + x * EXPERT, EXPERT, cudaMemcpyHostToDevice, st));
    else if (parts_per_copy == 2) {  // three equally spaced parts (as a layer's merged tensors) in one 2-D copy
      size_t pitch = 128 * PART, ee = (size_t)rand() % 128 + 128 * ((size_t)rand() % 5);
      if (ee * PART + 2 * pitch + PART > POOL) ee %= 128;
      CK(cudaMemcpy2DAsync(dev + d, PART, host + ee * PART, pitch, PART, 3, cudaMemcpyHostToDevice, st));
    }
    else for (int p = 0; p < 3; p++) CK(cudaMemcpyAsync(dev + d + p * PART, host + x * EXPERT + p * PART, PART, cudaMemcpyHostToDevice, st));
  }
  CK(cudaEventRecord(b, st)); CK(cudaEventSynchronize(b));
  float ms; CK(cudaEventElapsedTime(&ms, a, b));
  double gbs = (double)n_experts * EXPERT / (ms * 1e6);
  printf("%-34s %s  %6.1f us/expert  %5.1f GB/s\n", name, parts_per_copy == 1 ? "1 copy " : parts_per_copy == 2 ? "2-D    " : "3 parts", 1e3 * ms / n_experts, gbs);
  return gbs;
}

// Zero-copy: a kernel streaming page-locked host memory through the device's mapping (what a
// mat-vec over weights left in host RAM would read), 16-byte loads, grid-stride.
__global__ void read_mapped(const int4* p, size_t n, int* out) {
  int4 acc = make_int4(0, 0, 0, 0);
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    int4 v = p[i];
    acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678) out[0] = 1;
}

int main() {
  char* dev; CK(cudaMalloc(&dev, 64 * EXPERT));
  cudaStream_t st; CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::vector<std::pair<const char*, char*>> srcs;
  char* h1; CK(cudaHostAlloc(&h1, POOL, cudaHostAllocDefault)); memset(h1, 1, POOL); srcs.push_back({"cudaHostAlloc", h1});
  char* h2 = (char*)mmap(0, POOL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  madvise(h2, POOL, MADV_NOHUGEPAGE); memset(h2, 2, POOL); CK(cudaHostRegister(h2, POOL, 0)); srcs.push_back({"anon 4K pages + register", h2});
  char* h3 = (char*)mmap(0, POOL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  madvise(h3, POOL, MADV_HUGEPAGE); memset(h3, 3, POOL); CK(cudaHostRegister(h3, POOL, 0)); srcs.push_back({"anon THP + register", h3});
  int fd = open("/tmp/moe30b.gguf", O_RDONLY);
  if (fd >= 0) {
    char* h4 = (char*)mmap(0, POOL, PROT_READ, MAP_SHARED, fd, 1ull << 30);
    if (h4 != MAP_FAILED) { long s = 0; for (size_t i = 0; i < POOL; i += 4096) s += h4[i]; sink += s;
      if (cudaHostRegister(h4, POOL, cudaHostRegisterReadOnly) == cudaSuccess) srcs.push_back({"file mmap (page cache) + register", h4});
      else printf("file mmap register failed\n"); }
  }
  char* burn = (char*)malloc(POOL); memset(burn, 5, POOL);
  for (int warm = 0; warm < 1; warm++) run("warm-up", h1, dev, 1, 200, st);
  for (auto& s : srcs) { run(s.first, s.second, dev, 3, 400, st); run(s.first, s.second, dev, 1, 400, st); run(s.first, s.second, dev, 2, 400, st); }
  for (int threads : {4, 8, 12, 16}) {
    stop = false; std::vector<std::thread> ts;
    for (int t = 0; t < threads; t++) ts.emplace_back(reader, burn + (size_t)t * (POOL / threads), POOL / threads);
    usleep(100000);
    printf("-- while %d CPU threads stream through other memory\n", threads);
    read_bytes = 0; double t0 = now();
    for (auto& s : srcs) { run(s.first, s.second, dev, 3, 400, st); run(s.first, s.second, dev, 1, 400, st); }
    stop = true; for (auto& t : ts) t.join();
    printf("   the %d threads read %.1f GB/s meanwhile\n", threads, read_bytes / (now() - t0) / 1e9);
    stop = false; ts.clear(); read_bytes = 0; t0 = now();
    for (int t = 0; t < threads; t++) ts.emplace_back(reader, burn + (size_t)t * (POOL / threads), POOL / threads);
    usleep(300000); stop = true; for (auto& t : ts) t.join();
    printf("   the %d threads alone: %.1f GB/s\n", threads, read_bytes / (now() - t0) / 1e9);
  }
  // Zero-copy reads of 1 GiB of mapped page-locked memory by a kernel.
  {
    int* flag; CK(cudaMalloc(&flag, 4));
    cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    for (int blocks : {132, 264, 528, 1056}) {
      for (int threads : {256, 1024}) {
        CK(cudaEventRecord(a, st));
        read_mapped<<<blocks, threads, 0, st>>>((const int4*)h1, (1ull << 30) / 16, flag);
        CK(cudaEventRecord(b, st)); CK(cudaEventSynchronize(b));
        float ms; CK(cudaEventElapsedTime(&ms, a, b));
        printf("zero-copy kernel read of 1 GiB (cudaHostAlloc), %d blocks x %d threads: %.1f GB/s\n", blocks, threads, (1ull << 30) / (ms * 1e6));
      }
    }
  }
  // One large copy for the link's ceiling.
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b)); char* big; CK(cudaMalloc(&big, 1ull << 30));
  CK(cudaEventRecord(a, st)); CK(cudaMemcpyAsync(big, h1, 1ull << 30, cudaMemcpyHostToDevice, st)); CK(cudaEventRecord(b, st)); CK(cudaEventSynchronize(b));
  float ms; CK(cudaEventElapsedTime(&ms, a, b)); printf("one 1 GiB copy from cudaHostAlloc: %.1f GB/s\n", (1ull << 30) / (ms * 1e6));
  return 0;
}
