// TAP's CPU kernels on x86 with AVX-512 VNNI: the plane and head products of few-token calls
// (decode), the unpack of planes to bfloat16 or float32 for a many-token call's dense GEMM, and the
// routed rows' residual products of a many-token call (matmul_w4_many, 16 rows per register).
// On x86 with AVX2 + FMA + F16C but no VNNI, the same file builds with the same layouts and the
// same integer sums, VNNI's dot product done by maddubs + madd (see dot_wide) and the head's by
// madd on int16 (see the AVX2 tile_w8); matmul_w4_many there is the 8-row lane kernel
// (lane8_rows_w4, two groups of 8 rows per pass at 8 bits: lane16_rows_w4), which also takes
// 15-bit activations (matmul_w4_lanes) for a many-token call's base products.
//
// Why: torch's CPU int4 kernel widens every 4-bit weight to bfloat16 before multiplying and
// reads several rows as separate streams; on 2 Zen 4 cores it moves about 16 GB/s of weights.
// Here 4-bit codes (and the int8 output head) are multiplied by integer activations with VNNI's
// u8 x s8 dot products, and each tile of rows is one contiguous stream.
//
// Activations are quantized when a call starts. matmul_w4: per block of 64 inputs, to 15 bits
// (wide, two dot products per weight byte: signed high byte, low byte in [0, 127]) or to 8 bits,
// for all blocks or per block by how peaked its values are (see quantize_blocks).
// matmul_w8: per token, to 15 bits offset to unsigned. matmul_w4_many: per block, to 8 bits.
// matmul_w4_lanes: per block, to 15 bits (wide) or 8.
// Integer sums are exact; the result differs from float32 by the activation rounding only
// (relative ~1e-4 at 15 bits).
//
// Layouts (made by tap_runtime/kernels/vnni.py): rows in tiles of kTileRows, padded. 4-bit plane:
// chunks of 16 blocks of 64 inputs, one after the other; within a chunk, tiles one after the other;
// within a tile, for each block, each row's 32 bytes, byte t = input t (low nibble) and t + 32
// (high nibble). float16 scales and zero points follow the same chunk and tile order: within a
// chunk's tile, each row's groups of that chunk. int8 rows: tiles
// one after the other; within a tile, for each 32 inputs, each row's 32 bytes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#include <string>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#define TAP_VNNI 1
#endif
// The plane and head products also build for AVX2 CPUs (AVX2 + FMA + F16C), with the VNNI dot
// product emulated by maddubs + madd; see the ISA notes at dot_wide and tile_w8.
#if defined(TAP_VNNI) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define TAP_PLANES 1
#endif

namespace {

constexpr int64_t kBlock = 64;
#ifndef TILE_ROWS
#define TILE_ROWS 4
#endif
// Rows are stored in tiles of kTileRows: for each 32-byte chunk of input, the tile's rows follow
// each other, so a tile is one contiguous stream. Four rows read as four separate streams ran at
// half the memory speed of one stream on Zen 4 (the hardware prefetcher tracks them poorly).
constexpr int kTileRows = TILE_ROWS;
// 4-bit planes are stored in chunks of 16 blocks (1,024 inputs): a chunk's activations (2 KiB at
// 15 bits) stay in L1 while its weights stream past. With Qwen2.5-1.5B's 8,960-input down
// projection in one piece (17.5 KiB of activations per tile), the weights ran at half speed.
constexpr int64_t kChunkBlocks = 16;

// One stored plane as dequantize_tiles reads it (all planes of a call share N, K, group size
// and the padded row count, as the nested planes of one linear do).
struct PlaneView {
  const uint8_t* weight;
  const at::Half* scales;
  const at::Half* zeros;
  const uint8_t* levels;  // the plane's level table, or nullptr for even codes
};

// A plane's codes may stand for a table of 16 levels (PlaneSpec.levels, format 7) in eighths of
// a code step: each kernel looks a register of codes up with one byte shuffle (vpshufb) and
// multiplies the plane's scales by kLevelUnit. The levels reach 120, so on AVX2 a pair sum of
// maddubs (2 x 120 x 128) still fits int16 but two such sums do not: with a table, every
// maddubs result is widened (madd) before it is added (the Lut template arguments below).
constexpr int kMaxLevel = 120;
constexpr float kLevelUnit = 0.125f;
inline float code_unit(const uint8_t* levels) { return levels ? kLevelUnit : 1.f; }
inline __m256i level_register(const uint8_t* levels) {
  return levels ? _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(levels))) : _mm256_setzero_si256();
}

bool compiled_with_vnni() {
#if defined(TAP_VNNI)
  return true;
#else
  return false;
#endif
}

// Which build this is: "avx512-vnni", "avx2" (AVX2 + FMA + F16C, the same products with
// maddubs/madd in place of VNNI's dot product, and no many-token lane kernel), or "" (no plane
// kernels on this CPU).
std::string instruction_set() {
#if defined(TAP_VNNI)
  return "avx512-vnni";
#elif defined(TAP_PLANES)
  return "avx2";
#else
  return "";
#endif
}

#if defined(TAP_PLANES)

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t horizontal_sum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float horizontal_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif

#if defined(TAP_VNNI)

inline float horizontal_max(__m512 v) { return _mm512_reduce_max_ps(v); }

// x (M, K) float32 -> per block of 64: codes, the block's scale and the sum of its quantized
// inputs (scale x the codes' sum) for the zero-point term. With that sum a product is exactly
// the dequantized plane times the quantized activations, sum (c - z) q. The exact float sum
// instead multiplies the activations' rounding errors by the codes c (0..15) rather than by
// c - z: on SmolLM2's inputs, 2.2-2.6x the error (8-bit activations: 0.4-2.2e-2 of the product
// against 0.2-0.8e-2). A block whose peak exceeds `wide_above` times its RMS is quantized to 15
// bits (int8 high byte, low byte in [0, 127]; wide[block] = 1), the others to 8 bits in the high
// byte (wide[block] = 0). wide_above 0 makes every block 15-bit (every block's peak is at least
// its RMS); infinity makes every block 8-bit.
void quantize_blocks(const float* x, int64_t M, int64_t K, float wide_above, int8_t* high, int8_t* low, float* scales,
                     float* sums, uint8_t* wide) {
  const int64_t blocks = K / kBlock;
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i low_bits = _mm512_set1_epi32(127);
  const bool all_wide = wide_above <= 0.f, none_wide = std::isinf(wide_above);
  // peak > wide_above * rms  <=>  peak^2 * 64 > wide_above^2 * sum of squares
  const float limit = wide_above * wide_above / static_cast<float>(kBlock);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + m * K + b * kBlock;
      __m512 v[4], amax = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm512_loadu_ps(src + 16 * i);
        amax = _mm512_max_ps(amax, _mm512_and_ps(v[i], sign_mask));
        squares = _mm512_fmadd_ps(v[i], v[i], squares);
      }
      const float peak = horizontal_max(amax);
      bool is_wide = all_wide;
      if (!all_wide && !none_wide) is_wide = peak * peak > limit * _mm512_reduce_add_ps(squares);
      const float scale = peak / (is_wide ? 16383.f : 127.f);
      const __m512 inverse = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      __m512i code_total = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inverse));  // round to nearest even
        code_total = _mm512_add_epi32(code_total, q);
        if (is_wide) {
          // floor(q / 128) and q mod 128: q = 128 * high + low with low in [0, 127]
          _mm_storeu_si128(reinterpret_cast<__m128i*>(high + m * K + b * kBlock + 16 * i), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 7)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(low + m * K + b * kBlock + 16 * i), _mm512_cvtepi32_epi8(_mm512_and_si512(q, low_bits)));
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(high + m * K + b * kBlock + 16 * i), _mm512_cvtepi32_epi8(q));
        }
      }
      scales[m * blocks + b] = scale;
      sums[m * blocks + b] = scale * static_cast<float>(_mm512_reduce_add_epi32(code_total));
      wide[m * blocks + b] = is_wide ? 1 : 0;
    }
  }
}

// x (M, K) float32 -> per token one scale, 15-bit codes offset by 2^14 to [1, 32767], as high and
// low unsigned bytes.
void quantize_tokens(const float* x, int64_t M, int64_t K, uint8_t* high, uint8_t* low, float* scales) {
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i offset = _mm512_set1_epi32(16384), low_bits = _mm512_set1_epi32(127);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_and_ps(_mm512_loadu_ps(src + k), sign_mask));
    const float scale = horizontal_max(amax) / 16383.f;
    const __m512 inverse = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    for (int64_t k = 0; k < K; k += 16) {
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + k), inverse)), offset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(high + m * K + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(q, 7)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(low + m * K + k), _mm512_cvtepi32_epi8(_mm512_and_si512(q, low_bits)));
    }
    scales[m] = scale;
  }
}


#elif defined(TAP_PLANES)

// 64 int32 in 8 registers (values within int8) -> 64 bytes in order. packs works within each
// 128-bit lane, so the dwords come out as (a0-3, b0-3, c0-3, d0-3 | a4-7, ...) and one permute
// puts them back in order.
inline void store_bytes64(int8_t* dst, const __m256i q[8]) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i = 0; i < 2; ++i) {
    const __m256i a = _mm256_packs_epi32(q[4 * i], q[4 * i + 1]);
    const __m256i b = _mm256_packs_epi32(q[4 * i + 2], q[4 * i + 3]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * i), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order));
  }
}

// As the AVX-512 quantize_blocks above, 8 lanes at a time.
void quantize_blocks(const float* x, int64_t M, int64_t K, float wide_above, int8_t* high, int8_t* low, float* scales,
                     float* sums, uint8_t* wide) {
  const int64_t blocks = K / kBlock;
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i low_bits = _mm256_set1_epi32(127);
  const bool all_wide = wide_above <= 0.f, none_wide = std::isinf(wide_above);
  const float limit = wide_above * wide_above / static_cast<float>(kBlock);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + m * K + b * kBlock;
      __m256 v[8], amax = _mm256_setzero_ps(), squares = _mm256_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_loadu_ps(src + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], sign_mask));
        squares = _mm256_fmadd_ps(v[i], v[i], squares);
      }
      const float peak = horizontal_max(amax);
      bool is_wide = all_wide;
      if (!all_wide && !none_wide) is_wide = peak * peak > limit * horizontal_sum(squares);
      const float scale = peak / (is_wide ? 16383.f : 127.f);
      const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      __m256i q[8];
      __m256i code_total = _mm256_setzero_si256();
      for (int i = 0; i < 8; ++i) {
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // round to nearest even
        code_total = _mm256_add_epi32(code_total, q[i]);
      }
      int8_t* h = high + m * K + b * kBlock;
      if (is_wide) {
        __m256i part[8];
        for (int i = 0; i < 8; ++i) part[i] = _mm256_srai_epi32(q[i], 7);  // floor(q / 128)
        store_bytes64(h, part);
        for (int i = 0; i < 8; ++i) part[i] = _mm256_and_si256(q[i], low_bits);  // q mod 128
        store_bytes64(low + m * K + b * kBlock, part);
      } else {
        store_bytes64(h, q);
      }
      scales[m * blocks + b] = scale;
      sums[m * blocks + b] = scale * static_cast<float>(horizontal_sum_epi32(code_total));
      wide[m * blocks + b] = is_wide ? 1 : 0;
    }
  }
}

// x (M, K) float32 -> per token one scale, 15-bit codes offset by 2^14 to [1, 32767] as int16
// (the AVX2 head product multiplies them with madd_epi16; see tile_w8 below).
void quantize_tokens(const float* x, int64_t M, int64_t K, int16_t* codes, float* scales) {
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i offset = _mm256_set1_epi32(16384);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * K;
    __m256 amax = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(src + k), sign_mask));
    const float scale = horizontal_max(amax) / 16383.f;
    const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    for (int64_t k = 0; k < K; k += 16) {
      const __m256i a = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + k), inverse)), offset);
      const __m256i b = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + k + 8), inverse)), offset);
      // packs keeps 128-bit lanes apart: (a0-3, b0-3 | a4-7, b4-7); 0xD8 orders the quadwords.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + m * K + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    scales[m] = scale;
  }
}

#endif

#if defined(TAP_PLANES)

// The 4-bit products' integer dot products of one row's 32-byte block: w_low / w_high the row's
// codes (inputs t and t + 32), h_* the activations' signed high bytes, l_* their low bytes in
// [0, 127]. VNNI: four (two) dpbusd. AVX2: maddubs multiplies unsigned by signed bytes and adds
// pairs into int16 with saturation, which 4-bit codes cannot reach (|2 * 15 * 128| = 3,840, and
// the sum of two such results 7,680); madd then adds pairs into int32, by 128 for the high bytes.
template <bool Lut>
inline __m256i dot_wide(__m256i w_low, __m256i w_high, __m256i h_low, __m256i h_high, __m256i l_low, __m256i l_high) {
#if defined(TAP_VNNI)
  __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_low, h_low);
  dot = _mm256_dpbusd_epi32(dot, w_high, h_high);
  dot = _mm256_slli_epi32(dot, 7);
  dot = _mm256_dpbusd_epi32(dot, w_low, l_low);
  return _mm256_dpbusd_epi32(dot, w_high, l_high);
#else
  if constexpr (Lut) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i high = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w_low, h_low), ones),
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(w_high, h_high), ones));
    const __m256i low = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w_low, l_low), ones),
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(w_high, l_high), ones));
    return _mm256_add_epi32(_mm256_slli_epi32(high, 7), low);
  }
  const __m256i high = _mm256_add_epi16(_mm256_maddubs_epi16(w_low, h_low), _mm256_maddubs_epi16(w_high, h_high));
  const __m256i low = _mm256_add_epi16(_mm256_maddubs_epi16(w_low, l_low), _mm256_maddubs_epi16(w_high, l_high));
  return _mm256_add_epi32(_mm256_madd_epi16(high, _mm256_set1_epi16(128)), _mm256_madd_epi16(low, _mm256_set1_epi16(1)));
#endif
}

template <bool Lut>
inline __m256i dot_narrow(__m256i w_low, __m256i w_high, __m256i h_low, __m256i h_high) {
#if defined(TAP_VNNI)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w_low, h_low), w_high, h_high);
#else
  if constexpr (Lut) {
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w_low, h_low), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(w_high, h_high), ones));
  }
  const __m256i sum = _mm256_add_epi16(_mm256_maddubs_epi16(w_low, h_low), _mm256_maddubs_epi16(w_high, h_high));
  return _mm256_madd_epi16(sum, _mm256_set1_epi16(1));
#endif
}

// Per-block multipliers (weight scale x activation scale) of one row's blocks in one chunk, and
// those blocks' zero-point term. srow / zrow: the row's scales and zeros for this chunk (group j
// of the chunk at index j); xs / xsum: the chunk's activation scales and sums; unit: what one
// step of the codes' values is worth in code steps (kLevelUnit for a level table, else 1).
inline float prepare_blocks(const at::Half* srow, const at::Half* zrow, int64_t count, int64_t blocks_per_group,
                            const float* xs, const float* xsum, float* block_scale, float unit) {
  if (blocks_per_group == 1) {
    const __m256 units = _mm256_set1_ps(unit);
    __m256 total = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= count; j += 8) {
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow + j)));
      const __m256 zero = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zrow + j)));
      _mm256_storeu_ps(block_scale + j, _mm256_mul_ps(_mm256_mul_ps(scale, units), _mm256_loadu_ps(xs + j)));
      total = _mm256_fmadd_ps(_mm256_mul_ps(scale, zero), _mm256_loadu_ps(xsum + j), total);
    }
    float rest = horizontal_sum(total);
    for (; j < count; ++j) {
      const float scale = _cvtsh_ss(srow[j].x), zero = _cvtsh_ss(zrow[j].x);
      block_scale[j] = scale * unit * xs[j];
      rest += scale * zero * xsum[j];
    }
    return rest;
  }
  float total = 0.f;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t g = j / blocks_per_group;
    const float scale = _cvtsh_ss(srow[g].x), zero = _cvtsh_ss(zrow[g].x);
    block_scale[j] = scale * unit * xs[j];
    total += scale * zero * xsum[j];
  }
  return total;
}

// Where row r of tile `tile`'s scales (or zeros) for chunk `chunk` start: the group parameters
// follow the weights' chunk and tile order, so a tile's are read with its weights.
inline int64_t chunk_params(int64_t padded_rows, int64_t blocks, int64_t blocks_per_group, int64_t chunk, int64_t tile, int r) {
  const int64_t b0 = chunk * kChunkBlocks;
  const int64_t count = std::min(kChunkBlocks, blocks - b0) / blocks_per_group;
  return padded_rows * (b0 / blocks_per_group) + (tile * kTileRows + r) * count;
}

// R rows from n0, one token. Mode kWide: every block's activations carry 15 bits as a signed
// high byte and a low byte in [0, 127], two VNNI dot products each; kNarrow: 8 bits, one dot
// product; kMixed: per block, as wide[b] says.
enum ActivationMode { kNarrow = 0, kWide = 1, kMixed = 2 };

// Lut: the codes stand for the levels in `table` (level_register), looked up after the split.
template <int R, int Mode, bool Lut>
inline void tile_w4(const uint8_t* weight, const int8_t* xh, const int8_t* xl, const uint8_t* wide, const float* block_scale,
                    int64_t blocks, int64_t scale_stride, float* acc_out, __m256i table) {
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i h_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + b * kBlock));
    const __m256i h_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + b * kBlock + 32));
    const bool block_wide = Mode == kWide || (Mode == kMixed && wide[b]);
    if (block_wide) {
      const __m256i l_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl + b * kBlock));
      const __m256i l_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl + b * kBlock + 32));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + (b * R + r) * 32));
        __m256i w_low = _mm256_and_si256(raw, low_mask);
        __m256i w_high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_mask);
        if constexpr (Lut) w_low = _mm256_shuffle_epi8(table, w_low), w_high = _mm256_shuffle_epi8(table, w_high);
        const __m256i dot = dot_wide<Lut>(w_low, w_high, h_low, h_high, l_low, l_high);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(block_scale + r * scale_stride + b), acc[r]);
      }
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + (b * R + r) * 32));
        __m256i w_low = _mm256_and_si256(raw, low_mask);
        __m256i w_high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_mask);
        if constexpr (Lut) w_low = _mm256_shuffle_epi8(table, w_low), w_high = _mm256_shuffle_epi8(table, w_high);
        const __m256i dot = dot_narrow<Lut>(w_low, w_high, h_low, h_high);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(block_scale + r * scale_stride + b), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) acc_out[r] = horizontal_sum(acc[r]);
}

// Where tile `tile`'s bytes for chunk `chunk` start in a plane of `padded_rows` rows (see the
// layout note at the top).
inline const uint8_t* chunk_tile(const uint8_t* weight, int64_t padded_rows, int64_t blocks, int64_t chunk, int64_t tile) {
  const int64_t b0 = chunk * kChunkBlocks;
  const int64_t count = std::min(kChunkBlocks, blocks - b0);
  return weight + 32 * (padded_rows * b0 + tile * kTileRows * count);
}

// Rows [row_begin, row_end) of a view starting at tile first_tile of the stored plane, for all M
// tokens, a chunk of input blocks at a time (so the chunk's activations stay in L1 while the
// weights stream past), accumulating into out.
template <int Mode, bool Lut>
void rows_w4(const uint8_t* weight, int64_t padded_rows, int64_t first_tile, const at::Half* scales, const at::Half* zeros,
             int64_t N, int64_t K, int64_t group_size, const int8_t* xh, const int8_t* xl, const uint8_t* wide, const float* xs,
             const float* xsum, int64_t M, float* out, int64_t row_begin, int64_t row_end, const uint8_t* levels) {
  const __m256i table = level_register(levels);
  const float unit = code_unit(levels);
  const int64_t blocks = K / kBlock;
  const int64_t groups = K / group_size;
  const int64_t blocks_per_group = group_size / kBlock;
  const int64_t chunks = (blocks + kChunkBlocks - 1) / kChunkBlocks;
  constexpr int R = kTileRows;
  float block_scale[R * kChunkBlocks];
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b0 = c * kChunkBlocks, count = std::min(kChunkBlocks, blocks - b0);
    for (int64_t n0 = row_begin; n0 < row_end; n0 += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, row_end - n0));
      const uint8_t* tile = chunk_tile(weight, padded_rows, blocks, c, first_tile + n0 / R);
      for (int64_t m = 0; m < M; ++m) {
        float offset[R] = {}, dots[R];
        for (int r = 0; r < rows; ++r)
        {
          const int64_t at = chunk_params(padded_rows, blocks, blocks_per_group, c, first_tile + n0 / R, r);
          offset[r] = prepare_blocks(scales + at, zeros + at, count, blocks_per_group, xs + m * blocks + b0,
                                     xsum + m * blocks + b0, block_scale + r * kChunkBlocks, unit);
        }
        tile_w4<R, Mode, Lut>(tile, xh + m * K + b0 * kBlock, Mode != kNarrow ? xl + m * K + b0 * kBlock : nullptr,
                              wide + m * blocks + b0, block_scale, count, kChunkBlocks, dots, table);
        float* o = out + m * N + n0;
        for (int r = 0; r < rows; ++r) o[r] = (c == 0 ? 0.f : o[r]) + dots[r] - offset[r];
      }
    }
  }
}


#endif

#if defined(TAP_VNNI)

// R rows of an int8 row-scaled matrix (the output head), one token. The token is quantized with
// one scale to 15 bits and offset by 2^14, so both of its bytes are unsigned and the int8 weights
// can be VNNI's signed operand; the caller takes the offset back with each row's code sum. Integer
// sums are flushed to float every 256 inputs, before int32 could overflow.
template <int R>
inline void tile_w8(const int8_t* weight, int64_t K, const uint8_t* xh, const uint8_t* xl, float* dots) {
  constexpr int64_t kFlush = 256;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += kFlush) {
    const int64_t k1 = std::min(K, k0 + kFlush);
    __m256i high[R], low[R];
    for (int r = 0; r < R; ++r) { high[r] = _mm256_setzero_si256(); low[r] = _mm256_setzero_si256(); }
    for (int64_t k = k0; k < k1; k += 32) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + k));
      const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xl + k));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + k * R + r * 32));
        high[r] = _mm256_dpbusd_epi32(high[r], h, w);
        low[r] = _mm256_dpbusd_epi32(low[r], l, w);
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_add_ps(acc[r], _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(high[r], 7), low[r])));
  }
  for (int r = 0; r < R; ++r) dots[r] = horizontal_sum(acc[r]);
}

void rows_w8(const int8_t* weight, const float* row_scales, const int32_t* row_sums, int64_t N, int64_t K,
             const uint8_t* xh, const uint8_t* xl, const float* x_scale, int64_t M, float* out, int64_t row_begin,
             int64_t row_end) {
  constexpr int R = kTileRows;
  for (int64_t n0 = row_begin; n0 < row_end; n0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, row_end - n0));
    for (int64_t m = 0; m < M; ++m) {
      float dots[R];
      tile_w8<R>(weight + n0 * K, K, xh + m * K, xl + m * K, dots);
      for (int r = 0; r < rows; ++r)
        out[m * N + n0 + r] = (dots[r] - 16384.f * static_cast<float>(row_sums[n0 + r])) * row_scales[n0 + r] * x_scale[m];
    }
  }
}


#elif defined(TAP_PLANES)

// AVX2's head product: the token's 15-bit offset codes (int16, [1, 32767]) times int8 weights
// widened to int16, with madd_epi16. maddubs would saturate here: the codes' high bytes reach
// 255, and 2 * 255 * 128 exceeds int16. Integer sums are flushed to float every 1,024 inputs
// (at most 32 * 2 * 2 * 32767 * 128 per lane, below 2^31).
template <int R>
inline void tile_w8(const int8_t* weight, int64_t K, const int16_t* x, float* dots) {
  constexpr int64_t kFlush = 1024;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += kFlush) {
    const int64_t k1 = std::min(K, k0 + kFlush);
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 32) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k + 16));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int8_t* w = weight + k * R + r * 32;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
        sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(_mm256_madd_epi16(x0, w0), _mm256_madd_epi16(x1, w1)));
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm256_add_ps(acc[r], _mm256_cvtepi32_ps(sum[r]));
  }
  for (int r = 0; r < R; ++r) dots[r] = horizontal_sum(acc[r]);
}

void rows_w8(const int8_t* weight, const float* row_scales, const int32_t* row_sums, int64_t N, int64_t K, const int16_t* x,
             const float* x_scale, int64_t M, float* out, int64_t row_begin, int64_t row_end) {
  constexpr int R = kTileRows;
  for (int64_t n0 = row_begin; n0 < row_end; n0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, row_end - n0));
    for (int64_t m = 0; m < M; ++m) {
      float dots[R];
      tile_w8<R>(weight + n0 * K, K, x + m * K, dots);
      for (int r = 0; r < rows; ++r)
        out[m * N + n0 + r] = (dots[r] - 16384.f * static_cast<float>(row_sums[n0 + r])) * row_scales[n0 + r] * x_scale[m];
    }
  }
}

#endif

#if defined(TAP_PLANES)

// Rows of tiles [tile_begin, tile_end) of a view -> the sum over the planes of (q - zero) * scale
// as float32 or bfloat16 (round to nearest even, once, from the float32 sum), 8 lanes at a time:
// the dense path's matrix on CPUs whose bfloat16 GEMM is slower than float32 (no AVX512_BF16),
// and every dense matrix on an AVX2 build. Same layout walk as the AVX-512 dequantize_tiles.
template <typename Out>
void dequantize_tiles_avx2(const PlaneView* planes, int plane_count, int64_t padded_rows, int64_t first_tile, int64_t N,
                           int64_t K, int64_t group_size, Out* out, int64_t tile_begin, int64_t tile_end) {
  const int64_t blocks = K / kBlock, blocks_per_group = group_size / kBlock;
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t n = t * kTileRows + r;
      if (n >= N) break;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t c = b / kChunkBlocks, j = b - c * kChunkBlocks;
        const int64_t at = chunk_params(padded_rows, blocks, blocks_per_group, c, first_tile + t, r) + j / blocks_per_group;
        const int64_t offset = (chunk_tile(planes[0].weight, padded_rows, blocks, c, first_tile + t) - planes[0].weight) +
                               (j * kTileRows + r) * 32;
        __m256 acc[8];  // acc[i]: inputs 8i .. 8i + 7 of the block
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int p = 0; p < plane_count; ++p) {
          const float s = _cvtsh_ss(planes[p].scales[at].x);
          const __m256 scale = _mm256_set1_ps(s * code_unit(planes[p].levels)), shift = _mm256_set1_ps(-s * _cvtsh_ss(planes[p].zeros[at].x));
          const uint8_t* levels = planes[p].levels;
          const __m128i table = levels ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(levels)) : _mm_setzero_si128();
          for (int i = 0; i < 4; ++i) {
            // byte t of the block: input t (low nibble), input t + 32 (high nibble)
            const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(planes[p].weight + offset + 8 * i));
            __m128i lo = _mm_and_si128(raw, low_mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
            if (levels) lo = _mm_shuffle_epi8(table, lo), hi = _mm_shuffle_epi8(table, hi);
            acc[i] = _mm256_add_ps(acc[i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), scale, shift));
            acc[4 + i] = _mm256_add_ps(acc[4 + i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), scale, shift));
          }
        }
        Out* dst = out + n * K + b * kBlock;
        if constexpr (sizeof(Out) == 4) {
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(dst) + 8 * i, acc[i]);
        } else {
          const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
          for (int i = 0; i < 4; ++i) {
            __m256i half[2];
            for (int h = 0; h < 2; ++h) {
              const __m256i bits = _mm256_castps_si256(acc[2 * i + h]);
              const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
              half[h] = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, lsb)), 16);
            }
            // packus keeps 128-bit lanes apart: (a0-3, b0-3 | a4-7, b4-7); 0xD8 orders the quadwords.
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * i), _mm256_permute4x64_epi64(_mm256_packus_epi32(half[0], half[1]), 0xD8));
          }
        }
      }
    }
  }
}

// Many-token products on AVX2 (built wherever the plane kernels are): 8 rows per register, one
// row per 32-bit lane. For each group of 8 rows and block of 64 inputs the rows' packed bytes are
// read from their two 4-row tiles as stored, transposed (8 x 8 dwords) and split into nibbles
// once per call, then multiplied by every token: maddubs takes 4 unsigned codes of 8 rows times
// one token's 4 signed activation bytes (broadcast) and adds pairs into int16. Eight such sums
// fit int16 (8 x 2 x 15 x 128 = 30,720), so each half block takes one madd into int32.
// Narrow: 8-bit activations per block of 64 (matmul_w4's kNarrow codes). Wide: 15 bits as a
// signed high byte and a low byte in [0, 127] (kWide's codes), two maddubs per weight dword: the
// same integer sums as matmul_w4 in kWide mode, with no unpacked float copy of the plane.
constexpr int kLanes8 = 8;

// The 16 registers of rows [n0, n0 + 8) for block jb of a chunk: w[d] holds inputs 4d..4d+3
// (low nibbles), w[8 + d] inputs 32+4d..32+4d+3 (high nibbles), one row per dword lane. Rows at
// or past `rows` are zero. levels: the plane's level table (the codes looked up), or nullptr.
inline void unpack_lanes8(const uint8_t* chunk, int64_t tile_bytes, int64_t jb, int rows, __m256i* w, const uint8_t* levels) {
  __m256i r[8];
  for (int i = 0; i < 8; ++i)
    r[i] = i < rows ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + (i / kTileRows) * tile_bytes + (jb * kTileRows + i % kTileRows) * 32))
                    : _mm256_setzero_si256();
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);      // rows 2i, 2i+1: dwords 0, 1 | 4, 5
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);  // dwords 2, 3 | 6, 7
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);      // dword 0 | 4
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);      // dword 1 | 5
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);  // dword 2 | 6
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);  // dword 3 | 7
  }
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  for (int d = 0; d < 4; ++d) {
    const __m256i first = _mm256_permute2x128_si256(u[d], u[4 + d], 0x20);   // dword d, rows 0..7
    const __m256i second = _mm256_permute2x128_si256(u[d], u[4 + d], 0x31);  // dword d + 4
    w[d] = _mm256_and_si256(first, low_mask);
    w[8 + d] = _mm256_and_si256(_mm256_srli_epi16(first, 4), low_mask);
    w[4 + d] = _mm256_and_si256(second, low_mask);
    w[12 + d] = _mm256_and_si256(_mm256_srli_epi16(second, 4), low_mask);
  }
  if (levels) {
    const __m256i table = level_register(levels);
    for (int i = 0; i < 16; ++i) w[i] = _mm256_shuffle_epi8(table, w[i]);
  }
}

// acc + maddubs(w, the 4 signed bytes at x broadcast), as one unit: written with intrinsics, GCC
// hoisted every maddubs of a half block ahead of the adds and spilled the products to the stack.
inline __m256i maddubs_broadcast_add(__m256i acc, __m256i w, const int8_t* x) {
  __m256i product;
  asm("vpbroadcastd %[x], %[p]\n\t"
      "vpmaddubsw %[p], %[w], %[p]\n\t"
      "vpaddw %[p], %[acc], %[acc]"
      : [acc] "+x"(acc), [p] "=&x"(product)
      : [w] "x"(w), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// The same for levels (int32 acc): each maddubs result widened by madd before it is added,
// since two of them could exceed int16 (see kMaxLevel).
inline __m256i maddubs_broadcast_add_wide(__m256i acc, __m256i w, const int8_t* x, __m256i ones) {
  __m256i product;
  asm("vpbroadcastd %[x], %[p]\n\t"
      "vpmaddubsw %[p], %[w], %[p]\n\t"
      "vpmaddwd %[ones], %[p], %[p]\n\t"
      "vpaddd %[p], %[acc], %[acc]"
      : [acc] "+x"(acc), [p] "=&x"(product)
      : [w] "x"(w), [ones] "x"(ones), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// T tokens from m, one group of 8 rows: out[m + t, n0 .. n0 + rows). wbuf: the group's unpacked
// registers, 16 per block; ws / wz: each block's scale and scale x zero, 8 lanes.
// out_rows: token t's output row is out_rows[m + t] (nullptr: m + t); accumulate: added to what
// the row holds (the routed residual products of a prefill, into the base product's rows).
template <int T, bool Wide, bool Lut>
inline void lanes8_tokens(const __m256i* wbuf, const float* ws, const float* wz, int64_t blocks, int64_t K, const int8_t* xh,
                          const int8_t* xl, const float* xs, const float* xsum, int64_t m, float* out, int64_t N, int64_t n0,
                          __m256i store_mask, bool full, const int64_t* out_rows, bool accumulate) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dot[T];
    for (int half = 0; half < 2; ++half) {
      __m256i high[T], low[T];
      for (int t = 0; t < T; ++t) high[t] = low[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int d = 0; d < 8; ++d) {
        const __m256i w = _mm256_load_si256(wbuf + b * 16 + half * 8 + d);
        const int64_t at = b * kBlock + half * 32 + 4 * d;
        for (int t = 0; t < T; ++t) {
          if constexpr (Lut) {
            high[t] = maddubs_broadcast_add_wide(high[t], w, xh + (m + t) * K + at, ones);
            if constexpr (Wide) low[t] = maddubs_broadcast_add_wide(low[t], w, xl + (m + t) * K + at, ones);
          } else {
            high[t] = maddubs_broadcast_add(high[t], w, xh + (m + t) * K + at);
            if constexpr (Wide) low[t] = maddubs_broadcast_add(low[t], w, xl + (m + t) * K + at);
          }
        }
      }
      for (int t = 0; t < T; ++t) {
        __m256i part;
        if constexpr (Lut) {  // already int32
          part = Wide ? _mm256_add_epi32(_mm256_slli_epi32(high[t], 7), low[t]) : high[t];
        } else {
          part = _mm256_madd_epi16(high[t], Wide ? _mm256_set1_epi16(128) : ones);
          if constexpr (Wide) part = _mm256_add_epi32(part, _mm256_madd_epi16(low[t], ones));
        }
        dot[t] = half == 0 ? part : _mm256_add_epi32(dot[t], part);
      }
    }
    const __m256 scale = _mm256_loadu_ps(ws + b * kLanes8), shift = _mm256_loadu_ps(wz + b * kLanes8);
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_mul_ps(scale, _mm256_set1_ps(xs[(m + t) * blocks + b])), acc[t]);
      acc[t] = _mm256_fnmadd_ps(shift, _mm256_set1_ps(xsum[(m + t) * blocks + b]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    float* o = out + (out_rows ? out_rows[m + t] : m + t) * N + n0;
    if (accumulate) acc[t] = _mm256_add_ps(full ? _mm256_loadu_ps(o) : _mm256_maskload_ps(o, store_mask), acc[t]);
    if (full) _mm256_storeu_ps(o, acc[t]);
    else _mm256_maskstore_ps(o, store_mask, acc[t]);
  }
}

// The registers and block parameters of rows [n0, n0 + 8) (fewer at the end of the view) into
// the caller's scratch: wbuf 16 registers per block, ws / wz 8 + 8 floats per block (zero past
// the view's end). Returns how many rows the group has. levels: the plane's level table or nullptr.
inline int prepare_lane8_group(const uint8_t* weight, int64_t padded_rows, int64_t first_tile, const at::Half* scales,
                               const at::Half* zeros, int64_t blocks_per_group, int64_t N, int64_t K, int64_t n0, __m256i* wbuf,
                               float* ws, float* wz, const uint8_t* levels) {
  const float unit = code_unit(levels);
  const int64_t blocks = K / kBlock;
  const int rows = static_cast<int>(std::min<int64_t>(kLanes8, N - n0));
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t c = b0 / kChunkBlocks, count = std::min(kChunkBlocks, blocks - b0);
    const uint8_t* chunk = chunk_tile(weight, padded_rows, blocks, c, first_tile + n0 / kTileRows);
    for (int64_t jb = 0; jb < count; ++jb) unpack_lanes8(chunk, 32 * kTileRows * count, jb, rows, wbuf + (b0 + jb) * 16, levels);
    for (int i = 0; i < kLanes8; ++i) {
      for (int64_t j = 0; j < count; ++j) ws[(b0 + j) * kLanes8 + i] = wz[(b0 + j) * kLanes8 + i] = 0.f;
      if (i >= rows) continue;
      const int64_t n = n0 + i;
      const int64_t at = chunk_params(padded_rows, blocks, blocks_per_group, c, first_tile + n / kTileRows, static_cast<int>(n % kTileRows));
      for (int64_t j = 0; j < count; ++j) {
        const int64_t g = at + j / blocks_per_group;
        const float s = _cvtsh_ss(scales[g].x);
        ws[(b0 + j) * kLanes8 + i] = s * unit;
        wz[(b0 + j) * kLanes8 + i] = s * _cvtsh_ss(zeros[g].x);
      }
    }
  }
  return rows;
}

inline __m256i rows_store_mask(int rows) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Rows [n0, n0 + 8) (fewer at the end of the view) for all M tokens, into out (M, N). wbuf, ws
// and wz are the caller's scratch for 16 registers and 8 + 8 floats per block.
template <bool Wide, bool Lut>
void lane8_rows_w4(const uint8_t* weight, int64_t padded_rows, int64_t first_tile, const at::Half* scales, const at::Half* zeros,
                   int64_t blocks_per_group, int64_t N, int64_t K, const int8_t* xh, const int8_t* xl, const float* xs,
                   const float* xsum, int64_t M, float* out, int64_t n0, __m256i* wbuf, float* ws, float* wz,
                   const int64_t* out_rows, bool accumulate, const uint8_t* levels) {
  const int64_t blocks = K / kBlock;
  const int rows = prepare_lane8_group(weight, padded_rows, first_tile, scales, zeros, blocks_per_group, N, K, n0, wbuf, ws, wz, levels);
  const __m256i store_mask = rows_store_mask(rows);
  const bool full = rows == kLanes8;
  constexpr int T = Wide ? 3 : 4;
  int64_t m = 0;
  for (; m + T <= M; m += T) lanes8_tokens<T, Wide, Lut>(wbuf, ws, wz, blocks, K, xh, xl, xs, xsum, m, out, N, n0, store_mask, full, out_rows, accumulate);
  for (; m < M; ++m) lanes8_tokens<1, Wide, Lut>(wbuf, ws, wz, blocks, K, xh, xl, xs, xsum, m, out, N, n0, store_mask, full, out_rows, accumulate);
}

// Two maddubs products of one broadcast: a0 += maddubs(w0, x), a1 += maddubs(w1, x), the 4 signed
// bytes at x loaded once for both (one asm unit, for the reason given at maddubs_broadcast_add).
inline void maddubs_broadcast_add2(__m256i& a0, __m256i& a1, __m256i w0, __m256i w1, const int8_t* x) {
  __m256i b, p, q;
  asm("vpbroadcastd %[x], %[b]\n\t"
      "vpmaddubsw %[b], %[w0], %[p]\n\t"
      "vpmaddubsw %[b], %[w1], %[q]\n\t"
      "vpaddw %[p], %[a0], %[a0]\n\t"
      "vpaddw %[q], %[a1], %[a1]"
      : [a0] "+x"(a0), [a1] "+x"(a1), [b] "=&x"(b), [p] "=&x"(p), [q] "=&x"(q)
      : [w0] "x"(w0), [w1] "x"(w1), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
}

// The same for levels (int32 a0, a1): each maddubs result widened by madd before it is added.
inline void maddubs_broadcast_add2_wide(__m256i& a0, __m256i& a1, __m256i w0, __m256i w1, const int8_t* x, __m256i ones) {
  __m256i b, p, q;
  asm("vpbroadcastd %[x], %[b]\n\t"
      "vpmaddubsw %[b], %[w0], %[p]\n\t"
      "vpmaddubsw %[b], %[w1], %[q]\n\t"
      "vpmaddwd %[ones], %[p], %[p]\n\t"
      "vpmaddwd %[ones], %[q], %[q]\n\t"
      "vpaddd %[p], %[a0], %[a0]\n\t"
      "vpaddd %[q], %[a1], %[a1]"
      : [a0] "+x"(a0), [a1] "+x"(a1), [b] "=&x"(b), [p] "=&x"(p), [q] "=&x"(q)
      : [w0] "x"(w0), [w1] "x"(w1), [ones] "x"(ones), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
}

// The 8-bit lane product of two groups of 8 rows at once (rows [n0, n0 + 8) from wa, ws_a, wz_a,
// always full, and [n0 + 8, n0 + 8 + rows_b) from wb, ws_b, wz_b), T tokens from m: each token's
// broadcast activation bytes feed both groups' maddubs, so a block takes half the broadcasts of
// two lanes8_tokens calls. Each lane's arithmetic is lanes8_tokens<T, false>'s, in its order, so
// the sums are bitwise the same.
template <int T, bool Lut>
inline void lanes16_tokens(const __m256i* wa, const __m256i* wb, const float* ws_a, const float* wz_a, const float* ws_b,
                           const float* wz_b, int64_t blocks, int64_t K, const int8_t* xh, const float* xs, const float* xsum, int64_t m,
                           float* out, int64_t N, int64_t n0, __m256i mask_b, bool full_b, const int64_t* out_rows, bool accumulate) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2 * T];
  for (int t = 0; t < 2 * T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dot[2 * T];
    for (int half = 0; half < 2; ++half) {
      __m256i sums[2 * T];
      for (int t = 0; t < 2 * T; ++t) sums[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int d = 0; d < 8; ++d) {
        const __m256i w0 = _mm256_load_si256(wa + b * 16 + half * 8 + d);
        const __m256i w1 = _mm256_load_si256(wb + b * 16 + half * 8 + d);
        const int64_t at = b * kBlock + half * 32 + 4 * d;
        for (int t = 0; t < T; ++t) {
          if constexpr (Lut)
            maddubs_broadcast_add2_wide(sums[2 * t], sums[2 * t + 1], w0, w1, xh + (m + t) * K + at, ones);
          else
            maddubs_broadcast_add2(sums[2 * t], sums[2 * t + 1], w0, w1, xh + (m + t) * K + at);
        }
      }
      for (int t = 0; t < 2 * T; ++t) {
        const __m256i part = Lut ? sums[t] : _mm256_madd_epi16(sums[t], ones);
        dot[t] = half == 0 ? part : _mm256_add_epi32(dot[t], part);
      }
    }
    const __m256 scale_a = _mm256_loadu_ps(ws_a + b * kLanes8), shift_a = _mm256_loadu_ps(wz_a + b * kLanes8);
    const __m256 scale_b = _mm256_loadu_ps(ws_b + b * kLanes8), shift_b = _mm256_loadu_ps(wz_b + b * kLanes8);
    for (int t = 0; t < T; ++t) {
      const __m256 token_scale = _mm256_set1_ps(xs[(m + t) * blocks + b]), token_sum = _mm256_set1_ps(xsum[(m + t) * blocks + b]);
      acc[2 * t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[2 * t]), _mm256_mul_ps(scale_a, token_scale), acc[2 * t]);
      acc[2 * t] = _mm256_fnmadd_ps(shift_a, token_sum, acc[2 * t]);
      acc[2 * t + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[2 * t + 1]), _mm256_mul_ps(scale_b, token_scale), acc[2 * t + 1]);
      acc[2 * t + 1] = _mm256_fnmadd_ps(shift_b, token_sum, acc[2 * t + 1]);
    }
  }
  for (int t = 0; t < T; ++t) {
    float* o = out + (out_rows ? out_rows[m + t] : m + t) * N + n0;
    __m256 a = acc[2 * t], c = acc[2 * t + 1];
    if (accumulate) {
      a = _mm256_add_ps(_mm256_loadu_ps(o), a);
      c = _mm256_add_ps(full_b ? _mm256_loadu_ps(o + kLanes8) : _mm256_maskload_ps(o + kLanes8, mask_b), c);
    }
    _mm256_storeu_ps(o, a);
    if (full_b) _mm256_storeu_ps(o + kLanes8, c);
    else _mm256_maskstore_ps(o + kLanes8, mask_b, c);
  }
}

// Rows [n0, n0 + 16) (n0 + 8 <= N; the second group may be short) for all M tokens, 8-bit
// activations, through lanes16_tokens. wbuf: scratch for 2 x 16 registers per block; ws, wz: 2 x 8
// floats per block each.
template <bool Lut>
void lane16_rows_w4(const uint8_t* weight, int64_t padded_rows, int64_t first_tile, const at::Half* scales, const at::Half* zeros,
                    int64_t blocks_per_group, int64_t N, int64_t K, const int8_t* xh, const float* xs, const float* xsum, int64_t M,
                    float* out, int64_t n0, __m256i* wbuf, float* ws, float* wz, const int64_t* out_rows, bool accumulate,
                    const uint8_t* levels) {
  const int64_t blocks = K / kBlock;
  __m256i* wa = wbuf;
  __m256i* wb = wbuf + blocks * 16;
  float *ws_a = ws, *ws_b = ws + blocks * kLanes8, *wz_a = wz, *wz_b = wz + blocks * kLanes8;
  prepare_lane8_group(weight, padded_rows, first_tile, scales, zeros, blocks_per_group, N, K, n0, wa, ws_a, wz_a, levels);
  const int rows_b =
      prepare_lane8_group(weight, padded_rows, first_tile, scales, zeros, blocks_per_group, N, K, n0 + kLanes8, wb, ws_b, wz_b, levels);
  const __m256i mask_b = rows_store_mask(rows_b);
  const bool full_b = rows_b == kLanes8;
  constexpr int T = 3;
  int64_t m = 0;
  for (; m + T <= M; m += T)
    lanes16_tokens<T, Lut>(wa, wb, ws_a, wz_a, ws_b, wz_b, blocks, K, xh, xs, xsum, m, out, N, n0, mask_b, full_b, out_rows, accumulate);
  for (; m < M; ++m)
    lanes16_tokens<1, Lut>(wa, wb, ws_a, wz_a, ws_b, wz_b, blocks, K, xh, xs, xsum, m, out, N, n0, mask_b, full_b, out_rows, accumulate);
}

// Whether 8-bit lane products take two groups of 8 rows at a time (lane16_rows_w4) or one
// (lane8_rows_w4); the same bits either way. A switch for measuring one against the other.
bool g_lane_pairs = true;

#endif

#if defined(TAP_VNNI)

// float32 -> bfloat16, round to nearest even (as torch's .to(torch.bfloat16) for finite values).
inline __m256i to_bfloat16(__m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
}

// Rows of tiles [tile_begin, tile_end) of a view (from tile first_tile of stored planes of
// padded_rows rows) -> bfloat16 of the sum over the planes of (q - zero) * scale, into out
// (N, K). The sum is taken in float32 and rounded to bfloat16 once, so a token's tier-8 weight
// (base plane + residual plane) is as close to its float value as bfloat16 allows.
void dequantize_tiles(const PlaneView* planes, int plane_count, int64_t padded_rows, int64_t first_tile, int64_t N,
                      int64_t K, int64_t group_size, uint16_t* out, int64_t tile_begin, int64_t tile_end) {
  const int64_t blocks = K / kBlock, blocks_per_group = group_size / kBlock;
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t n = t * kTileRows + r;
      if (n >= N) break;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t c = b / kChunkBlocks, j = b - c * kChunkBlocks;
        const int64_t at = chunk_params(padded_rows, blocks, blocks_per_group, c, first_tile + t, r) + j / blocks_per_group;
        const int64_t offset = (chunk_tile(planes[0].weight, padded_rows, blocks, c, first_tile + t) - planes[0].weight) +
                               (j * kTileRows + r) * 32;
        uint16_t* dst = out + n * K + b * kBlock;
        for (int half = 0; half < 2; ++half) {
          __m512 wl = _mm512_setzero_ps(), wh = _mm512_setzero_ps();
          for (int p = 0; p < plane_count; ++p) {
            const float s = _cvtsh_ss(planes[p].scales[at].x);
            const __m512 scale = _mm512_set1_ps(s * code_unit(planes[p].levels)), shift = _mm512_set1_ps(-s * _cvtsh_ss(planes[p].zeros[at].x));
            const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes[p].weight + offset + 16 * half));
            __m128i lo = _mm_and_si128(raw, low_mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
            if (planes[p].levels) {
              const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes[p].levels));
              lo = _mm_shuffle_epi8(table, lo), hi = _mm_shuffle_epi8(table, hi);
            }
            // byte t of the block: input t (low nibble), input t + 32 (high nibble)
            wl = _mm512_add_ps(wl, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), scale, shift));
            wh = _mm512_add_ps(wh, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), scale, shift));
          }
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * half), to_bfloat16(wl));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 + 16 * half), to_bfloat16(wh));
        }
      }
    }
  }
}

// Many-token products (the routed tokens' residual planes in a prefill): 16 rows per register,
// one row per 32-bit lane, so each VNNI dot product takes 4 inputs of 16 rows times one token's
// 4 inputs broadcast, and each row's weights are unpacked once per call and reused by every
// token. A block of 64 inputs of 16 rows is gathered from the 4-row tiles (8 gathers of the
// packed bytes; low nibbles are inputs 4d..4d+3, high nibbles 32+4d..32+4d+3), so the stored
// layout stays the decode kernel's. Activations are 8-bit per block of 64 (kNarrow's codes).
constexpr int kLaneRows = 16;
constexpr int kTokenStep = 8;

// Three rounds of two-register permutes turn 8 registers of 2 rows x 8 packed dwords (as the
// 4-row tiles store them) into 8 registers of 16 rows x 1 dword. Gathers did the same at about
// 85 cycles each on Zen 4. Register k starts as rows 2k, 2k + 1; round s pairs registers that
// differ in bit s and moves bit s of the dword index into the register index. The tables are
// built once by following every element's (row, dword) through the rounds.
struct LaneTranspose {
  alignas(64) int32_t index[3][8][16];
  LaneTranspose() {
    int row[8][16], dword[8][16];
    for (int k = 0; k < 8; ++k)
      for (int lane = 0; lane < 16; ++lane) row[k][lane] = 2 * k + lane / 8, dword[k][lane] = lane % 8;
    for (int s = 0; s < 3; ++s) {
      int next_row[8][16], next_dword[8][16];
      for (int k = 0; k < 8; ++k) {
        const int a = k & ~(1 << s), b = k | (1 << s);
        // Output k holds dwords whose bit s is k's bit s, from rows of both inputs; the last
        // round orders lanes by row (lane = row within the 16), the others by (row, dword).
        int lane = 0;
        for (int want_row = 0; want_row < 16; ++want_row)
          for (int want_dword = 0; want_dword < 8; ++want_dword) {
            if (((want_dword >> s) & 1) != ((k >> s) & 1)) continue;
            for (int source = 0; source < 32; ++source) {
              const int reg = source < 16 ? a : b, at = source % 16;
              if (row[reg][at] == want_row && dword[reg][at] == want_dword) {
                index[s][k][lane] = source;
                next_row[k][lane] = want_row, next_dword[k][lane] = want_dword;
                ++lane;
              }
            }
          }
      }
      for (int k = 0; k < 8; ++k)
        for (int lane = 0; lane < 16; ++lane) row[k][lane] = next_row[k][lane], dword[k][lane] = next_dword[k][lane];
    }
  }
};

const LaneTranspose kLaneTranspose;

// acc += w (16 rows x 4 unsigned bytes) . the 4 signed bytes at x, broadcast. Written out so
// the broadcast is the instruction's memory operand: GCC emits a separate broadcast load, which
// costs the product loop a vector slot per dot product.
inline __m512i dot_broadcast(__m512i acc, __m512i w, const int8_t* x) {
  asm("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// Scale and scale x zero of rows [n0, n0 + 16) for every block, as block-major float rows of 16
// lanes (lanes past N are zero), read once per row group. Within a chunk the group parameters of
// consecutive rows are consecutive runs (see chunk_params), so this is a small transpose.
// unit: code_unit of the plane (scales times kLevelUnit for a level table).
void lane_params(const at::Half* scales, const at::Half* zeros, int64_t padded_rows, int64_t first_tile, int64_t blocks,
                 int64_t blocks_per_group, int64_t n0, int64_t N, float* ws, float* wz, float unit) {
  const int rows = static_cast<int>(std::min<int64_t>(kLaneRows, N - n0));
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t c = b0 / kChunkBlocks, count = std::min(kChunkBlocks, blocks - b0);
    for (int i = 0; i < kLaneRows; ++i) {
      if (i >= rows) {
        for (int64_t j = 0; j < count; ++j) ws[(b0 + j) * kLaneRows + i] = wz[(b0 + j) * kLaneRows + i] = 0.f;
        continue;
      }
      const int64_t n = n0 + i;
      const int64_t at = chunk_params(padded_rows, blocks, blocks_per_group, c, first_tile + n / kTileRows, static_cast<int>(n % kTileRows));
      for (int64_t j = 0, g = at, left = blocks_per_group; j < count; ++j) {
        const float s = _cvtsh_ss(scales[g].x);
        ws[(b0 + j) * kLaneRows + i] = s * unit;
        wz[(b0 + j) * kLaneRows + i] = s * _cvtsh_ss(zeros[g].x);
        if (--left == 0) ++g, left = blocks_per_group;
      }
    }
  }
}

// Rows [n0, n0 + 16) (fewer at the end of the view) for all M tokens: token m's 16 outputs at
// out + m * out_stride (the caller points out at column n0 of an (M, N) product, or at a
// (M, 16) scratch block).
void lane_rows_w4(const uint8_t* weight, int64_t padded_rows, int64_t first_tile, const float* ws, const float* wz, int64_t N,
                  int64_t K, const int8_t* xq, const float* xs, const float* xsum, int64_t M, float* out, int64_t out_stride, int64_t n0,
                  const uint8_t* levels) {
  const __m512i table = levels ? _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(levels))) : _mm512_setzero_si512();
  const int64_t blocks = K / kBlock;
  const int rows = static_cast<int>(std::min<int64_t>(kLaneRows, N - n0));
  const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1u);
  const __m512i low_mask = _mm512_set1_epi8(0x0F);
  __m512i round_index[3][8];
  for (int s = 0; s < 3; ++s)
    for (int k = 0; k < 8; ++k) round_index[s][k] = _mm512_load_si512(kLaneTranspose.index[s][k]);
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t c = b0 / kChunkBlocks, count = std::min(kChunkBlocks, blocks - b0);
    const uint8_t* chunk = chunk_tile(weight, padded_rows, blocks, c, first_tile + n0 / kTileRows);
    const int64_t tile_bytes = 32 * kTileRows * count;
    for (int64_t jb = 0; jb < count; ++jb) {
      const int64_t b = b0 + jb;
      // Register k: rows 2k, 2k + 1 (tile k / 2, its rows 2 (k % 2) and one more), 8 dwords each;
      // dword d holds inputs 4d..4d+3 (low nibbles) and 32+4d..32+4d+3 (high nibbles).
      __m512i packed[8], w[16];
      for (int k = 0; k < 8; ++k)
        packed[k] = 2 * k < rows ? _mm512_loadu_si512(chunk + (k / 2) * tile_bytes + jb * 32 * kTileRows + (k % 2) * 64)
                                 : _mm512_setzero_si512();
      for (int s = 0; s < 3; ++s) {
        __m512i next[8];
        for (int k = 0; k < 8; ++k)
          next[k] = _mm512_permutex2var_epi32(packed[k & ~(1 << s)], round_index[s][k], packed[k | (1 << s)]);
        for (int k = 0; k < 8; ++k) packed[k] = next[k];
      }
      for (int d = 0; d < 8; ++d) {
        w[d] = _mm512_and_si512(packed[d], low_mask);
        w[d + 8] = _mm512_and_si512(_mm512_srli_epi16(packed[d], 4), low_mask);
      }
      if (levels)
        for (int q = 0; q < 16; ++q) w[q] = _mm512_shuffle_epi8(table, w[q]);
      const __m512 scale = _mm512_loadu_ps(ws + b * kLaneRows), shift = _mm512_loadu_ps(wz + b * kLaneRows);
      int64_t m = 0;
      for (; m + kTokenStep <= M; m += kTokenStep) {
        __m512i dot[kTokenStep];
        for (int t = 0; t < kTokenStep; ++t) dot[t] = _mm512_setzero_si512();
#pragma GCC unroll 16
        for (int q = 0; q < 16; ++q)
          for (int t = 0; t < kTokenStep; ++t)
            dot[t] = dot_broadcast(dot[t], w[q], xq + (m + t) * K + b * kBlock + 4 * q);
        for (int t = 0; t < kTokenStep; ++t) {
          float* o = out + (m + t) * out_stride;
          const __m512 prior = b == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(live, o);
          __m512 value = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[t]), _mm512_set1_ps(xs[(m + t) * blocks + b])), scale, prior);
          value = _mm512_fnmadd_ps(shift, _mm512_set1_ps(xsum[(m + t) * blocks + b]), value);
          _mm512_mask_storeu_ps(o, live, value);
        }
      }
      for (; m < M; ++m) {
        __m512i dot = _mm512_setzero_si512();
        for (int q = 0; q < 16; ++q)
          dot = dot_broadcast(dot, w[q], xq + m * K + b * kBlock + 4 * q);
        float* o = out + m * out_stride;
        const __m512 prior = b == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(live, o);
        __m512 value = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[m * blocks + b])), scale, prior);
        value = _mm512_fnmadd_ps(shift, _mm512_set1_ps(xsum[m * blocks + b]), value);
        _mm512_mask_storeu_ps(o, live, value);
      }
    }
  }
}
#endif

// The arguments of a product by rows [first_row, first_row + N) of a stored plane.
void check_plane_product(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales, const torch::Tensor& zeros,
                         int64_t group_size, int64_t first_row, int64_t N) {
  TORCH_CHECK(!instruction_set().empty(), "tap_cpu_int4 was built for a CPU without AVX2 + FMA + F16C");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kUInt8 && weight.is_contiguous(), "weight must be contiguous uint8");
  const int64_t K = x.size(1);
  TORCH_CHECK(weight.size(1) * 2 == K, "weight has ", weight.size(1) * 2, " input columns, x has ", K);
  TORCH_CHECK(weight.size(0) % kTileRows == 0 && first_row % kTileRows == 0 && first_row >= 0 && first_row + N <= weight.size(0),
              "rows [", first_row, ", ", first_row + N, ") are not a tile-aligned view of a plane of ", weight.size(0), " rows");
  TORCH_CHECK(K % kBlock == 0 && group_size % kBlock == 0 && K % group_size == 0, "K and group size must be multiples of 64");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && zeros.scalar_type() == torch::kHalf && scales.is_contiguous() && zeros.is_contiguous(),
              "scales and zeros must be contiguous float16");
  TORCH_CHECK(kChunkBlocks * kBlock % group_size == 0, "group size must divide ", kChunkBlocks * kBlock);
  TORCH_CHECK(scales.numel() == weight.size(0) * (K / group_size) && zeros.sizes() == scales.sizes(),
              "scales/zeros must hold every stored row's groups, in the chunked layout");
}

// A plane's level table from the optional `levels` argument: nullptr for None or an empty tensor
// (even codes), else 16 uint8 levels in [0, kMaxLevel].
const uint8_t* level_table(const c10::optional<torch::Tensor>& levels) {
  if (!levels.has_value() || !levels->defined() || levels->numel() == 0) return nullptr;
  TORCH_CHECK(levels->scalar_type() == torch::kUInt8 && levels->numel() == 16 && levels->is_contiguous() && levels->device().is_cpu(),
              "levels must be 16 contiguous uint8 values on the CPU (PlaneSpec.levels), got ", levels->numel(), " of ", levels->scalar_type());
  const uint8_t* table = levels->data_ptr<uint8_t>();
  for (int i = 0; i < 16; ++i) TORCH_CHECK(table[i] <= kMaxLevel, "levels must lie in [0, ", kMaxLevel, "], got ", int(table[i]));
  return table;
}

// x (M, K) times the rows [first_row, first_row + N) of a stored plane (a view into a stacked
// q/k/v or gate/up plane, or the whole plane with first_row 0).
// wide_above: activations per block of 64 at 15 bits where the block's peak exceeds this many
// times its RMS, else at 8 bits (0: all 15-bit; infinity: all 8-bit).
// levels: the plane's level table (PlaneSpec.levels as uint8), or None for even codes.
torch::Tensor matmul_w4(torch::Tensor x, torch::Tensor weight, torch::Tensor scales, torch::Tensor zeros,
                        int64_t group_size, double wide_above, int64_t first_row, int64_t N,
                        const c10::optional<torch::Tensor>& levels = c10::nullopt) {
  check_plane_product(x, weight, scales, zeros, group_size, first_row, N);
  const uint8_t* table = level_table(levels);
  TORCH_CHECK(!std::isnan(wide_above) && wide_above >= 0, "wide_above must be >= 0 (0: every block 15-bit; inf: every block 8-bit)");
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
#if defined(TAP_PLANES)
  const int64_t blocks = K / kBlock;
  const float threshold = static_cast<float>(wide_above);
  const int mode = threshold <= 0.f ? kWide : (std::isinf(threshold) ? kNarrow : kMixed);
  std::vector<int8_t> xq(M * K), xl(mode != kNarrow ? M * K : 0);
  std::vector<float> xs(M * blocks), xsum(M * blocks);
  std::vector<uint8_t> wide(M * blocks);
  quantize_blocks(x.data_ptr<float>(), M, K, threshold, xq.data(), xl.data(), xs.data(), xsum.data(), wide.data());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* z = zeros.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, 16, [&](int64_t begin, int64_t end) {
    const int64_t row_begin = begin * kTileRows, row_end = std::min(end * kTileRows, N);
    const int64_t padded = weight.size(0), first_tile = first_row / kTileRows;
    const int8_t* low = mode == kNarrow ? nullptr : xl.data();
    const auto run = [&](auto mode_constant, auto lut_constant) {
      rows_w4<decltype(mode_constant)::value, decltype(lut_constant)::value>(
          w, padded, first_tile, s, z, N, K, group_size, xq.data(), low, wide.data(), xs.data(), xsum.data(), M, o, row_begin, row_end, table);
    };
    using Even = std::false_type;
    using Lut = std::true_type;
    if (mode == kWide)
      table ? run(std::integral_constant<int, kWide>(), Lut()) : run(std::integral_constant<int, kWide>(), Even());
    else if (mode == kNarrow)
      table ? run(std::integral_constant<int, kNarrow>(), Lut()) : run(std::integral_constant<int, kNarrow>(), Even());
    else
      table ? run(std::integral_constant<int, kMixed>(), Lut()) : run(std::integral_constant<int, kMixed>(), Even());
  });
#endif
  return out;
}

#if defined(TAP_PLANES)
// x's blocks of 64 quantized for the lane kernels, tokens split over the threads: 8 bits
// (low stays empty) or, wide, 15 bits as high and low bytes.
// rows (optional, `M` of them): quantize x's rows rows[0..M) instead of all of x, in that order.
void quantize_lane_activations(const torch::Tensor& x, bool wide, std::vector<int8_t>& xh, std::vector<int8_t>& xl,
                               std::vector<float>& xs, std::vector<float>& xsum, const int64_t* rows = nullptr, int64_t M = -1) {
  const int64_t K = x.size(1), blocks = K / kBlock;
  if (rows == nullptr) M = x.size(0);
  xh.resize(M * K), xl.resize(wide ? M * K : 0), xs.resize(M * blocks), xsum.resize(M * blocks);
  std::vector<uint8_t> flags(M * blocks);
  const float* src = x.data_ptr<float>();
  const float wide_above = wide ? 0.f : std::numeric_limits<float>::infinity();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    if (rows == nullptr) {
      quantize_blocks(src + begin * K, end - begin, K, wide_above, xh.data() + begin * K, wide ? xl.data() + begin * K : nullptr,
                      xs.data() + begin * blocks, xsum.data() + begin * blocks, flags.data() + begin * blocks);
      return;
    }
    for (int64_t i = begin; i < end; ++i)
      quantize_blocks(src + rows[i] * K, 1, K, wide_above, xh.data() + i * K, wide ? xl.data() + i * K : nullptr, xs.data() + i * blocks,
                      xsum.data() + i * blocks, flags.data() + i * blocks);
  });
}

// lanes8_product's work, Lut: the plane has a level table (levels).
template <bool Lut>
torch::Tensor lanes8_product_impl(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                                  const torch::Tensor& zeros, int64_t group_size, int64_t first_row, int64_t N, bool wide,
                                  const uint8_t* levels, const torch::Tensor* rows, torch::Tensor* into) {
  const int64_t K = x.size(1), blocks = K / kBlock;
  const int64_t M = rows ? rows->numel() : x.size(0);
  const int64_t* out_rows = rows ? rows->data_ptr<int64_t>() : nullptr;
  auto out = into ? *into : torch::empty({M, N}, x.options());
  std::vector<int8_t> xh, xl;
  std::vector<float> xs, xsum;
  quantize_lane_activations(x, wide, xh, xl, xs, xsum, out_rows, M);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* z = zeros.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  const int64_t padded = weight.size(0), first_tile = first_row / kTileRows;
  const int64_t groups = (N + kLanes8 - 1) / kLanes8;
  if (!wide && g_lane_pairs && groups >= 2) {
    // Pairs of groups (the last group alone when their number is odd).
    at::parallel_for(0, (groups + 1) / 2, 1, [&](int64_t begin, int64_t end) {
      std::vector<__m256i> wbuf(2 * blocks * 16);
      std::vector<float> ws(2 * blocks * kLanes8), wz(2 * blocks * kLanes8);
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t g = 2 * pair;
        if (g + 1 < groups)
          lane16_rows_w4<Lut>(w, padded, first_tile, s, z, group_size / kBlock, N, K, xh.data(), xs.data(), xsum.data(), M, o, g * kLanes8,
                              wbuf.data(), ws.data(), wz.data(), out_rows, into != nullptr, levels);
        else
          lane8_rows_w4<false, Lut>(w, padded, first_tile, s, z, group_size / kBlock, N, K, xh.data(), nullptr, xs.data(), xsum.data(), M,
                                    o, g * kLanes8, wbuf.data(), ws.data(), wz.data(), out_rows, into != nullptr, levels);
      }
    });
    return out;
  }
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m256i> wbuf(blocks * 16);  // std::vector honours __m256i's 32-byte alignment (C++17)
    std::vector<float> ws(blocks * kLanes8), wz(blocks * kLanes8);
    for (int64_t g = begin; g < end; ++g) {
      if (wide)
        lane8_rows_w4<true, Lut>(w, padded, first_tile, s, z, group_size / kBlock, N, K, xh.data(), xl.data(), xs.data(), xsum.data(), M,
                                 o, g * kLanes8, wbuf.data(), ws.data(), wz.data(), out_rows, into != nullptr, levels);
      else
        lane8_rows_w4<false, Lut>(w, padded, first_tile, s, z, group_size / kBlock, N, K, xh.data(), nullptr, xs.data(), xsum.data(), M,
                                  o, g * kLanes8, wbuf.data(), ws.data(), wz.data(), out_rows, into != nullptr, levels);
    }
  });
  return out;
}

// The AVX2 lane kernel over every group of 8 rows of the view (see lane8_rows_w4).
// With `rows` (int64 indices into x's rows) and `into` (x.size(0), N): only those tokens, each
// product added to its own row of `into` (returned), with no gathered copy of x.
// levels: the plane's level table, or nullptr for even codes.
torch::Tensor lanes8_product(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales, const torch::Tensor& zeros,
                             int64_t group_size, int64_t first_row, int64_t N, bool wide, const uint8_t* levels,
                             const torch::Tensor* rows = nullptr, torch::Tensor* into = nullptr) {
  if (levels) return lanes8_product_impl<true>(x, weight, scales, zeros, group_size, first_row, N, wide, levels, rows, into);
  return lanes8_product_impl<false>(x, weight, scales, zeros, group_size, first_row, N, wide, levels, rows, into);
}
#endif

#if defined(TAP_VNNI)
// The VNNI lane kernel (16 rows per register, 8-bit activations) over every group of 16 rows of
// the view (see lane_rows_w4); `rows` and `into` as for lanes8_product.
torch::Tensor lanes16_product(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales, const torch::Tensor& zeros,
                              int64_t group_size, int64_t first_row, int64_t N, const uint8_t* levels, const torch::Tensor* rows = nullptr,
                              torch::Tensor* into = nullptr) {
  const int64_t K = x.size(1), blocks = K / kBlock;
  const int64_t M = rows ? rows->numel() : x.size(0);
  const int64_t* out_rows = rows ? rows->data_ptr<int64_t>() : nullptr;
  auto out = into ? *into : torch::empty({M, N}, x.options());
  std::vector<int8_t> xq, unused;
  std::vector<float> xs, xsum;
  quantize_lane_activations(x, false, xq, unused, xs, xsum, out_rows, M);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* z = zeros.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  const int64_t padded = weight.size(0), first_tile = first_row / kTileRows;
  at::parallel_for(0, (N + kLaneRows - 1) / kLaneRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(blocks * kLaneRows), wz(blocks * kLaneRows), sums(out_rows ? M * kLaneRows : 0);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kLaneRows;
      lane_params(s, z, padded, first_tile, blocks, group_size / kBlock, n0, N, ws.data(), wz.data(), code_unit(levels));
      if (!out_rows) {
        lane_rows_w4(w, padded, first_tile, ws.data(), wz.data(), N, K, xq.data(), xs.data(), xsum.data(), M, o + n0, N, n0, levels);
        continue;
      }
      // Each token's sums start from zero and are added to its row once, as index_add_ would.
      lane_rows_w4(w, padded, first_tile, ws.data(), wz.data(), N, K, xq.data(), xs.data(), xsum.data(), M, sums.data(), kLaneRows, n0,
                   levels);
      const __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(kLaneRows, N - n0)) - 1u);
      for (int64_t m = 0; m < M; ++m) {
        float* row = o + out_rows[m] * N + n0;
        _mm512_mask_storeu_ps(row, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, row), _mm512_loadu_ps(sums.data() + m * kLaneRows)));
      }
    }
  });
  return out;
}
#endif

// x (M, K) times rows [first_row, first_row + N) of a stored plane through the AVX2 lane kernel
// (8 rows per register; lane8_rows_w4), in any build with the plane kernels: activations per block
// of 64 at 15 bits (wide: matmul_w4's default arithmetic, for a many-token call's base product)
// or 8 bits.
torch::Tensor matmul_w4_lanes(torch::Tensor x, torch::Tensor weight, torch::Tensor scales, torch::Tensor zeros, int64_t group_size,
                              int64_t first_row, int64_t N, bool wide, const c10::optional<torch::Tensor>& levels = c10::nullopt) {
  check_plane_product(x, weight, scales, zeros, group_size, first_row, N);
  const uint8_t* table = level_table(levels);
#if defined(TAP_PLANES)
  return lanes8_product(x, weight, scales, zeros, group_size, first_row, N, wide, table);
#else
  return torch::empty({x.size(0), N}, x.options());
#endif
}

#if defined(TAP_PLANES)
// into[rows] += x[rows] times rows [first_row, first_row + N) of a stored plane, through the build's
// 8-bit lane kernel (matmul_w4_many's arithmetic): a prefill's routed residual products read
// their tokens' rows of x and add into the base product's rows in place, where gathering the
// rows (index_select) and scattering the sums (index_add_) cost more than the product's epilogue.
// rows: distinct int64 indices into x's rows; into: contiguous float32 (x.size(0), N).
torch::Tensor matmul_w4_rows_add(torch::Tensor x, torch::Tensor rows, torch::Tensor weight, torch::Tensor scales, torch::Tensor zeros,
                                 int64_t group_size, int64_t first_row, int64_t N, torch::Tensor into,
                                 const c10::optional<torch::Tensor>& levels = c10::nullopt) {
  check_plane_product(x, weight, scales, zeros, group_size, first_row, N);
  const uint8_t* table = level_table(levels);
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kLong && rows.is_contiguous() && rows.device().is_cpu(),
              "rows must be a contiguous int64 CPU vector");
  TORCH_CHECK(into.dim() == 2 && into.scalar_type() == torch::kFloat32 && into.is_contiguous() && into.size(0) == x.size(0) && into.size(1) == N,
              "into must be contiguous float32 (", x.size(0), ", ", N, ")");
  const int64_t* listed = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)  // a loop, not aminmax: two torch ops cost more than the check
    TORCH_CHECK(listed[i] >= 0 && listed[i] < x.size(0), "rows must index x's ", x.size(0), " rows, got ", listed[i]);
#if defined(TAP_VNNI)
  lanes16_product(x, weight, scales, zeros, group_size, first_row, N, table, &rows, &into);
#else
  lanes8_product(x, weight, scales, zeros, group_size, first_row, N, false, table, &rows, &into);
#endif
  return into;
}
#endif

// x (M, K) times rows [first_row, first_row + N) of a stored plane, for calls with many tokens
// (the routed tokens of a prefill): activations at 8 bits per block of 64, 16 rows per register
// (see lane_rows_w4). Same arithmetic as matmul_w4 with every block 8-bit, summed in another order.
torch::Tensor matmul_w4_many(torch::Tensor x, torch::Tensor weight, torch::Tensor scales, torch::Tensor zeros, int64_t group_size,
                             int64_t first_row, int64_t N, const c10::optional<torch::Tensor>& levels = c10::nullopt) {
  check_plane_product(x, weight, scales, zeros, group_size, first_row, N);
  const uint8_t* table = level_table(levels);
#if defined(TAP_VNNI)
  return lanes16_product(x, weight, scales, zeros, group_size, first_row, N, table);
#elif defined(TAP_PLANES)
  return lanes8_product(x, weight, scales, zeros, group_size, first_row, N, false, table);  // AVX2: 8 rows per register
#else
  return torch::empty({x.size(0), N}, x.options());
#endif
}

torch::Tensor matmul_w8(torch::Tensor x, torch::Tensor weight, torch::Tensor row_scales, torch::Tensor row_sums) {
  TORCH_CHECK(!instruction_set().empty(), "tap_cpu_int4 was built for a CPU without AVX2 + FMA + F16C");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kInt8 && weight.is_contiguous(), "weight must be contiguous int8");
  const int64_t M = x.size(0), K = x.size(1), N = row_scales.numel();
  TORCH_CHECK(weight.size(0) == (N + kTileRows - 1) / kTileRows * kTileRows, "weight rows must be out_features padded to ", kTileRows);
  TORCH_CHECK(weight.size(1) == K && K % 32 == 0, "weight has ", weight.size(1), " columns, x has ", K, " (need a multiple of 32)");
  TORCH_CHECK(row_scales.scalar_type() == torch::kFloat32 && row_scales.numel() == N && row_scales.is_contiguous(), "row_scales: float32 (N,)");
  TORCH_CHECK(row_sums.scalar_type() == torch::kInt32 && row_sums.numel() == N && row_sums.is_contiguous(), "row_sums: int32 (N,)");
  auto out = torch::empty({M, N}, x.options());
#if defined(TAP_VNNI)
  std::vector<uint8_t> xh(M * K), xl(M * K);
  std::vector<float> xs(M);
  quantize_tokens(x.data_ptr<float>(), M, K, xh.data(), xl.data(), xs.data());
  const int8_t* w = weight.data_ptr<int8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, 64, [&](int64_t begin, int64_t end) {
    rows_w8(w, row_scales.data_ptr<float>(), row_sums.data_ptr<int32_t>(), N, K, xh.data(), xl.data(), xs.data(), M, o,
            begin * kTileRows, std::min(end * kTileRows, N));
  });
#elif defined(TAP_PLANES)
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M);
  quantize_tokens(x.data_ptr<float>(), M, K, xq.data(), xs.data());
  const int8_t* w = weight.data_ptr<int8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, 64, [&](int64_t begin, int64_t end) {
    rows_w8(w, row_scales.data_ptr<float>(), row_sums.data_ptr<int32_t>(), N, K, xq.data(), xs.data(), M, o, begin * kTileRows,
            std::min(end * kTileRows, N));
  });
#endif
  return out;
}

// The sum of tiled 4-bit planes (one plane: just that plane) as a dense bfloat16 or float32 (N, K) matrix,
// written into `out` (reused by the caller between calls, so many-token calls do not page-fault a
// fresh matrix each time). Summing the nested planes of one linear gives the weight a token of
// a higher tier reads, so a many-token call multiplies each token once, by its own tier's weight.
// levels: empty (every plane even) or one per plane, each the plane's level table or an empty
// tensor (even codes).
torch::Tensor dequantize_w4_sum(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> scales, std::vector<torch::Tensor> zeros,
                                int64_t group_size, int64_t first_row, torch::Tensor out, std::vector<torch::Tensor> levels = {}) {
  const int64_t N = out.size(0);
  TORCH_CHECK(!instruction_set().empty(), "tap_cpu_int4 was built for a CPU without AVX2 + FMA + F16C");
  TORCH_CHECK(!weights.empty() && weights.size() <= 4 && scales.size() == weights.size() && zeros.size() == weights.size(),
              "one to four planes, each with its scales and zeros");
  TORCH_CHECK(levels.empty() || levels.size() == weights.size(), "levels: none, or one (possibly empty) tensor per plane");
  const torch::Tensor& weight = weights[0];
  const int64_t K = weight.size(1) * 2;
  TORCH_CHECK(K % kBlock == 0 && group_size % kBlock == 0 && K % group_size == 0, "K and group size must be multiples of 64");
  TORCH_CHECK((out.scalar_type() == torch::kBFloat16 || out.scalar_type() == torch::kFloat32) && out.is_contiguous() && out.dim() == 2 &&
                  out.size(1) == K,
              "out: contiguous bfloat16 or float32 (N, K)");
  PlaneView planes[4];
  for (size_t p = 0; p < weights.size(); ++p) {
    TORCH_CHECK(weights[p].scalar_type() == torch::kUInt8 && weights[p].is_contiguous() && weights[p].sizes() == weight.sizes() &&
                weight.size(0) % kTileRows == 0 && first_row % kTileRows == 0 && first_row >= 0 && first_row + N <= weight.size(0),
                "weights must be contiguous tiled uint8 planes of one shape holding rows [first_row, first_row + N)");
    TORCH_CHECK(scales[p].scalar_type() == torch::kHalf && zeros[p].scalar_type() == torch::kHalf && scales[p].is_contiguous() &&
                zeros[p].is_contiguous() && scales[p].numel() == weight.size(0) * (K / group_size) && zeros[p].sizes() == scales[p].sizes() &&
                kChunkBlocks * kBlock % group_size == 0,
                "scales/zeros: contiguous float16, every stored row's groups in the chunked layout");
#if defined(TAP_PLANES)
    planes[p] = {weights[p].data_ptr<uint8_t>(), scales[p].data_ptr<at::Half>(), zeros[p].data_ptr<at::Half>(),
                 levels.empty() ? nullptr : level_table(levels[p])};
#endif
  }
#if defined(TAP_PLANES)
  const int count = static_cast<int>(weights.size());
  const bool to_float = out.scalar_type() == torch::kFloat32;
  uint16_t* o16 = to_float ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* o32 = to_float ? out.data_ptr<float>() : nullptr;
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, 16, [&](int64_t begin, int64_t end) {
    if (to_float)
      dequantize_tiles_avx2<float>(planes, count, weight.size(0), first_row / kTileRows, N, K, group_size, o32, begin, end);
    else
#if defined(TAP_VNNI)
      dequantize_tiles(planes, count, weight.size(0), first_row / kTileRows, N, K, group_size, o16, begin, end);
#else
      dequantize_tiles_avx2<uint16_t>(planes, count, weight.size(0), first_row / kTileRows, N, K, group_size, o16, begin, end);
#endif
  });
#endif
  return out;
}

torch::Tensor dequantize_w4(torch::Tensor weight, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, int64_t first_row,
                            torch::Tensor out, const c10::optional<torch::Tensor>& levels = c10::nullopt) {
  return dequantize_w4_sum({weight}, {scales}, {zeros}, group_size, first_row, out,
                           levels.has_value() ? std::vector<torch::Tensor>{*levels} : std::vector<torch::Tensor>{});
}

}  // namespace

namespace tap_kernels {
// For tap_decode_ops.cpp's whole-layer decode step, which calls the plane product directly.
torch::Tensor matmul_w4(torch::Tensor x, torch::Tensor weight, torch::Tensor scales, torch::Tensor zeros, int64_t group_size,
                        double wide_above, int64_t first_row, int64_t N, const c10::optional<torch::Tensor>& levels) {
  return ::matmul_w4(x, weight, scales, zeros, group_size, wide_above, first_row, N, levels);
}
}  // namespace tap_kernels

namespace tap_decode {
void register_ops(pybind11::module& m);  // tap_decode_ops.cpp: the decode step's small fused operations
}
namespace tap_attention {
void register_ops(pybind11::module& m);  // tap_prefill_attention.cpp: causal attention over a whole prompt
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  tap_decode::register_ops(m);
  tap_attention::register_ops(m);
  m.def("compiled_with_vnni", &compiled_with_vnni);
  m.def("instruction_set", &instruction_set);
  m.def("tile_rows", []() { return static_cast<int64_t>(kTileRows); });
  // `levels` (last, optional everywhere): the plane's level table as 16 uint8 (PlaneSpec.levels), None for even codes.
  m.def("matmul_w4", &matmul_w4, py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("wide_above"), py::arg("first_row"), py::arg("N"), py::arg("levels") = py::none());
  m.def("matmul_w4_many", &matmul_w4_many, py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("first_row"), py::arg("N"), py::arg("levels") = py::none());
  m.def("matmul_w4_lanes", &matmul_w4_lanes, py::arg("x"), py::arg("weight"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("first_row"), py::arg("N"), py::arg("wide"), py::arg("levels") = py::none());
#if defined(TAP_PLANES)
  m.def("matmul_w4_rows_add", &matmul_w4_rows_add, py::arg("x"), py::arg("rows"), py::arg("weight"), py::arg("scales"),
        py::arg("zeros"), py::arg("group_size"), py::arg("first_row"), py::arg("N"), py::arg("into"), py::arg("levels") = py::none());
#endif
#if !defined(TAP_VNNI) && defined(TAP_PLANES)
  m.def("set_lane_pairs", [](bool on) { g_lane_pairs = on; });
  m.def("lane_pairs", []() { return g_lane_pairs; });
#endif
  m.def("matmul_w8", &matmul_w8);
  m.def("dequantize_w4", &dequantize_w4, py::arg("weight"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("first_row"), py::arg("out"), py::arg("levels") = py::none());
  m.def("dequantize_w4_sum", &dequantize_w4_sum, py::arg("weights"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
        py::arg("first_row"), py::arg("out"), py::arg("levels") = std::vector<torch::Tensor>{});
}
