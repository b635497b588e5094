// The AVX2 8-bit lane kernel's inner loop alone (lanes16_tokens in tap_cpu_int4.cpp): per 4
// inputs, two weight registers loaded, then per token one broadcast of 4 activation bytes, two
// maddubs and two int16 adds, with the same inline-asm unit as the kernel. Weights and activations
// stay in L1, and nothing else runs: no block epilogue, no unpacking, no quantization, no stores.
// So its rate is a ceiling for the kernel on this CPU; bench_lane_loop_ceiling.py builds and runs it.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

static inline void maddubs_broadcast_add2(__m256i& a0, __m256i& a1, __m256i w0, __m256i w1, const int8_t* x) {
  __m256i b, p, q;
  asm("vpbroadcastd %[x], %[b]\n\t"
      "vpmaddubsw %[b], %[w0], %[p]\n\t"
      "vpmaddubsw %[b], %[w1], %[q]\n\t"
      "vpaddw %[p], %[a0], %[a0]\n\t"
      "vpaddw %[q], %[a1], %[a1]"
      : [a0] "+x"(a0), [a1] "+x"(a1), [b] "=&x"(b), [p] "=&x"(p), [q] "=&x"(q)
      : [w0] "x"(w0), [w1] "x"(w1), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
}

// One half block (32 inputs) of two groups of 8 rows for T tokens, `iterations` times; the int16
// sums are widened once per half block, as in the kernel.
template <int T>
__attribute__((noinline)) __m256i half_blocks(const __m256i* w, const int8_t* x, long iterations, int K) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i total = _mm256_setzero_si256();
  for (long it = 0; it < iterations; ++it) {
    __m256i sums[2 * T];
    for (int t = 0; t < 2 * T; ++t) sums[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int d = 0; d < 8; ++d) {
      const __m256i w0 = _mm256_load_si256(w + d), w1 = _mm256_load_si256(w + 8 + d);
      for (int t = 0; t < T; ++t) maddubs_broadcast_add2(sums[2 * t], sums[2 * t + 1], w0, w1, x + t * K + 4 * d + (it & 7) * 32);
    }
    for (int t = 0; t < 2 * T; ++t) total = _mm256_add_epi32(total, _mm256_madd_epi16(sums[t], ones));
  }
  return total;
}

int main(int argc, char** argv) {
  const long iterations = argc > 1 ? std::atol(argv[1]) : 20000000;
  alignas(32) static __m256i w[16];
  for (int i = 0; i < 16; ++i) w[i] = _mm256_set1_epi8(static_cast<char>(i));
  static int8_t x[4 * 1024];
  for (int i = 0; i < 4 * 1024; ++i) x[i] = static_cast<int8_t>(i % 7);
  const auto start = std::chrono::steady_clock::now();
  const __m256i total = half_blocks<3>(w, x, iterations, 1024);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double macs = double(iterations) * 8 * 3 * 2 * 32;  // 4-input steps x tokens x row groups x (8 rows x 4 inputs)
  // The checksum keeps the loop from being optimised away.
  std::printf("%.1f GMAC/s checksum %d\n", macs / seconds / 1e9, _mm256_extract_epi32(total, 0) & 1);
  return 0;
}
