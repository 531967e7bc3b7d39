// Host-side cost of the driver calls a paged layer makes (expert copies, events, launches),
// alone and while K threads spin waiting for work as the CPU expert team does: is the decode
// thread's queueing slow because of the calls themselves or because of the spinners?
// nvcc -O2 -arch=sm_90 -o /tmp/call_cost tools/device/call_cost.cu -lpthread -lcuda
#include <cuda.h>
#include <cuda_runtime.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1);} } while (0)
static const size_t PART = 884736, EXPERT = 3 * PART, PITCH = 64ull << 20;

__global__ void empty_kernel(int* p) { if (p && threadIdx.x == 1000) *p = 1; }

static std::atomic<bool> stop{false};
static std::atomic<unsigned long> gen{0};
// mode 0: spin on a shared counter with pause (the team's idle loop); 1: private spin with
// pause; 2: stream through 64 MiB of memory (a worker computing).
static void spinner(int mode, char* mem) {
  unsigned long seen = gen.load();
  volatile long sink = 0;
  while (!stop.load(std::memory_order_relaxed)) {
    if (mode == 0) {
      if (gen.load(std::memory_order_acquire) != seen) seen = gen.load();
      _mm_pause();
    } else if (mode == 1) {
      for (int i = 0; i < 64; i++) _mm_pause();
    } else {
      const long* q = (const long*)mem;
      long s = 0;
      for (size_t i = 0; i < (64u << 20) / 8; i += 8) s += q[i];
      sink += s;
    }
  }
}

static double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Stat { std::vector<double> v; void add(double x) { v.push_back(x); }
  double med() { std::sort(v.begin(), v.end()); return v.empty() ? 0 : v[v.size() / 2]; }
  double mean() { double s = 0; for (double x : v) s += x; return v.empty() ? 0 : s / v.size(); } };

int main() {
  CK(cudaSetDevice(0));
  char* host;
  CK(cudaHostAlloc((void**)&host, 3 * PITCH, cudaHostAllocPortable | cudaHostAllocMapped));
  for (size_t i = 0; i < 3 * PITCH; i += 4096) host[i] = (char)i;
  char* dev;
  CK(cudaMalloc((void**)&dev, 64ull << 20));
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int* flag;
  CK(cudaMalloc((void**)&flag, 4));
  char* mem = (char*)aligned_alloc(4096, 64u << 20);
  for (size_t i = 0; i < (64u << 20); i += 64) mem[i] = 1;
  std::vector<char> cpu_src(8192, 1), cpu_dst(8192);
  const char* modes[] = {"shared-spin", "private-spin", "streaming"};
  for (int mode = 0; mode < 3; mode++) {
    for (int k : {0, 8, 12, 14}) {
      if (mode > 0 && k == 0) continue;
      stop = false;
      std::vector<std::thread> ts;
      for (int i = 0; i < k; i++) ts.emplace_back(spinner, mode, mem);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      Stat c2d, c1d, evc, evr, lau, syn, cpu, wake;
      for (int it = 0; it < 400; it++) {
        // 3 expert copies (2-D, the paged layer's form), then an event record and a launch.
        for (int x = 0; x < 3; x++) {
          double t0 = now_us();
          CK(cudaMemcpy2DAsync(dev + x * EXPERT, PART, host + (it % 20) * EXPERT + x * PART, PITCH, PART, 3,
                               cudaMemcpyHostToDevice, s));
          c2d.add(now_us() - t0);
        }
        double t0 = now_us();
        CK(cudaMemcpyAsync(dev + 9 * EXPERT, host + (it % 7) * 4096, 8192, cudaMemcpyHostToDevice, s));
        c1d.add(now_us() - t0);
        cudaEvent_t ev;
        t0 = now_us();
        CK(cudaEventCreateWithFlags(&ev, 0));
        evc.add(now_us() - t0);
        t0 = now_us();
        CK(cudaEventRecord(ev, s));
        evr.add(now_us() - t0);
        t0 = now_us();
        empty_kernel<<<1, 32, 0, s>>>(flag);
        lau.add(now_us() - t0);
        CK(cudaStreamSynchronize(s));
        CK(cudaEventDestroy(ev));
        // Round trip: an idle stream gets a kernel, the host waits for it.
        t0 = now_us();
        empty_kernel<<<1, 32, 0, s>>>(flag);
        CK(cudaStreamSynchronize(s));
        wake.add(now_us() - t0);
        // The same thread's plain CPU work: 8 KiB copied 64 times.
        t0 = now_us();
        for (int r = 0; r < 64; r++) { std::copy(cpu_src.begin(), cpu_src.end(), cpu_dst.begin()); cpu_src[r] ^= cpu_dst[8191 - r]; }
        cpu.add(now_us() - t0);
      }
      stop = true;
      for (auto& t : ts) t.join();
      printf("%-13s k=%2d  memcpy2D %6.2f/%6.2f  memcpy8K %5.2f/%5.2f  evCreate %5.2f/%5.2f  evRecord %5.2f/%5.2f  launch %5.2f/%5.2f  launch+sync %6.2f/%6.2f  cpu %6.2f/%6.2f us (median/mean)\n",
             modes[mode], k, c2d.med(), c2d.mean(), c1d.med(), c1d.mean(), evc.med(), evc.mean(), evr.med(), evr.mean(),
             lau.med(), lau.mean(), wake.med(), wake.mean(), cpu.med(), cpu.mean());
      fflush(stdout);
    }
  }
  return 0;
}
