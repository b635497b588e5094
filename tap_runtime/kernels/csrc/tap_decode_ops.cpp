// The small per-layer operations of a one-token decode step, fused, for Llama-family layers.
//
// Why: at batch 1 on Qwen2.5-1.5B the matmuls take about 80% of a step; the rest is some forty
// torch operators per layer (norms, rotary, cache writes, attention, SiLU, residual adds), each
// 1-50 microseconds of dispatch for a few thousand floats, about 8 ms a step. Each function here
// does one stretch of that work in one call, in float32; decode_layer chains them with the plane
// products for a whole layer. silu_mul_rows is the many-token (prefill) form of silu_mul.
// hadamard_blocks is the block Walsh-Hadamard rotation of a rotated linear's input
// (tap_runtime/rotation.py), used by every CPU path so that all of them agree bitwise.
//
// Arithmetic follows transformers' Llama layers (RMSNorm, rotate-half rotary, softmax attention
// with grouped KV heads, SiLU-gated MLP); summation order differs from torch's kernels, so results
// agree to float32 rounding, not bitwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "vector_exp.h"

namespace tap_kernels {
torch::Tensor matmul_w4(torch::Tensor x, torch::Tensor weight, torch::Tensor scales, torch::Tensor zeros, int64_t group_size,
                        double wide_above, int64_t first_row, int64_t N, const c10::optional<torch::Tensor>& levels);  // tap_cpu_int4.cpp
}

namespace tap_decode {

namespace {

using tap_math::exp_inplace;

constexpr int kLanes = 16;  // independent partial sums, so the compiler can vectorize reductions

float sum_of_squares(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * x[i + j];
  float total = 0.f;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  for (; i < n; ++i) total += x[i] * x[i];
  return total;
}

float dot(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  float total = 0.f;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// out[t] = scale * q . k[t] for `length` key rows of head_dim values.
void attention_scores(const float* q, const float* k, int64_t length, int64_t head_dim, float scale, float* out) {
  int64_t t = 0;
#if defined(__AVX512F__)
  if (head_dim % 16 == 0) {
    // Four keys at a time: four independent sums hide the multiply-add latency.
    for (; t + 4 <= length; t += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* k0 = k + t * head_dim;
      for (int64_t i = 0; i < head_dim; i += 16) {
        const __m512 qi = _mm512_loadu_ps(q + i);
        a0 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(k0 + i), a0);
        a1 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(k0 + head_dim + i), a1);
        a2 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(k0 + 2 * head_dim + i), a2);
        a3 = _mm512_fmadd_ps(qi, _mm512_loadu_ps(k0 + 3 * head_dim + i), a3);
      }
      out[t] = _mm512_reduce_add_ps(a0) * scale;
      out[t + 1] = _mm512_reduce_add_ps(a1) * scale;
      out[t + 2] = _mm512_reduce_add_ps(a2) * scale;
      out[t + 3] = _mm512_reduce_add_ps(a3) * scale;
    }
  }
#endif
  for (; t < length; ++t) out[t] = dot(q, k + t * head_dim, head_dim) * scale;
}

// dst = sum_t w[t] v[t] over `length` value rows of head_dim values.
void weighted_sum(const float* w, const float* v, int64_t length, int64_t head_dim, float* dst) {
#if defined(__AVX512F__)
  if (head_dim % 64 == 0) {
    // 64 outputs at a time held in registers across all rows.
    for (int64_t c = 0; c < head_dim; c += 64) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t t = 0; t < length; ++t) {
        const __m512 p = _mm512_set1_ps(w[t]);
        const float* row = v + t * head_dim + c;
        a0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(row), a0);
        a1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(row + 16), a1);
        a2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(row + 32), a2);
        a3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(row + 48), a3);
      }
      _mm512_storeu_ps(dst + c, a0);
      _mm512_storeu_ps(dst + c + 16, a1);
      _mm512_storeu_ps(dst + c + 32, a2);
      _mm512_storeu_ps(dst + c + 48, a3);
    }
    return;
  }
#endif
  std::fill(dst, dst + head_dim, 0.f);
  for (int64_t t = 0; t < length; ++t)
    for (int64_t i = 0; i < head_dim; ++i) dst[i] += w[t] * v[t * head_dim + i];
}

void check_float_vector(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous float32 CPU tensor");
}

// Each run of `block` values of x (count blocks) times the normalised Sylvester Hadamard matrix,
// in place: the fast transform's log2(block) butterfly passes, then the 1/sqrt(block) factor.
// Stage h pairs value j with j + h: (a, c) -> (a + c, a - c). With AVX-512 and blocks of 16 or
// more, stages below 16 run within a register (each lane's partner is lane i ^ h; lanes whose
// bit h is set take partner - self) and the others between registers: the same additions in
// the same order as the scalar loop, so both give the same bits. With AVX2 only, blocks of 8 to
// 64 go the same way in 8-lane registers.
constexpr int64_t kRegisterBlock = 64;  // the largest block the AVX2 path holds in registers

void hadamard_inplace(float* x, int64_t count, int64_t block) {
  const float norm = 1.f / std::sqrt(static_cast<float>(block));
#if defined(__AVX512F__)
  if (block >= 16 && block % 16 == 0) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i partner[4];
    __mmask16 upper[4];
    for (int s = 0; s < 4; ++s) {
      const int h = 1 << s;
      partner[s] = _mm512_xor_si512(lane, _mm512_set1_epi32(h));
      upper[s] = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
    }
    const __m512 scale = _mm512_set1_ps(norm);
    for (int64_t b = 0; b < count; ++b) {
      float* v = x + b * block;
      for (int64_t r = 0; r < block; r += 16) {
        __m512 value = _mm512_loadu_ps(v + r);
        for (int s = 0; s < 4; ++s) {
          const __m512 other = _mm512_permutexvar_ps(partner[s], value);
          // lanes with bit h clear: self + partner; set: partner - self.
          value = _mm512_mask_sub_ps(_mm512_add_ps(value, other), upper[s], other, value);
        }
        _mm512_storeu_ps(v + r, value);
      }
      for (int64_t h = 16; h < block; h *= 2)
        for (int64_t i = 0; i < block; i += 2 * h)
          for (int64_t j = i; j < i + h; j += 16) {
            const __m512 a = _mm512_loadu_ps(v + j), c = _mm512_loadu_ps(v + j + h);
            _mm512_storeu_ps(v + j, _mm512_add_ps(a, c));
            _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, c));
          }
      for (int64_t r = 0; r < block; r += 16) _mm512_storeu_ps(v + r, _mm512_mul_ps(_mm512_loadu_ps(v + r), scale));
    }
    return;
  }
#elif defined(__AVX2__)
  if (block >= 8 && block <= kRegisterBlock && block % 8 == 0) {
    // The same scheme in 8-lane registers, the whole block held in registers: stages 1, 2 and 4
    // by in-lane and cross-lane permutes (lanes whose bit h is set take partner - self), the
    // others between registers.
    const int registers = static_cast<int>(block / 8);
    const __m256 scale = _mm256_set1_ps(norm);
    for (int64_t b = 0; b < count; ++b) {
      float* v = x + b * block;
      __m256 value[kRegisterBlock / 8];
      for (int r = 0; r < registers; ++r) {
        __m256 a = _mm256_loadu_ps(v + 8 * r), other = _mm256_permute_ps(a, 0xB1);  // lanes 1 0 3 2 ...
        a = _mm256_blend_ps(_mm256_add_ps(a, other), _mm256_sub_ps(other, a), 0xAA);
        other = _mm256_permute_ps(a, 0x4E);  // lanes 2 3 0 1 ...
        a = _mm256_blend_ps(_mm256_add_ps(a, other), _mm256_sub_ps(other, a), 0xCC);
        other = _mm256_permute2f128_ps(a, a, 0x01);  // the two halves swapped
        value[r] = _mm256_blend_ps(_mm256_add_ps(a, other), _mm256_sub_ps(other, a), 0xF0);
      }
      for (int h = 1; h < registers; h *= 2)
        for (int i = 0; i < registers; i += 2 * h)
          for (int j = i; j < i + h; ++j) {
            const __m256 a = value[j], c = value[j + h];
            value[j] = _mm256_add_ps(a, c);
            value[j + h] = _mm256_sub_ps(a, c);
          }
      for (int r = 0; r < registers; ++r) _mm256_storeu_ps(v + 8 * r, _mm256_mul_ps(value[r], scale));
    }
    return;
  }
#endif
  for (int64_t b = 0; b < count; ++b) {
    float* v = x + b * block;
    for (int64_t h = 1; h < block; h *= 2)
      for (int64_t i = 0; i < block; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], c = v[j + h];
          v[j] = a + c;
          v[j + h] = a - c;
        }
    for (int64_t j = 0; j < block; ++j) v[j] *= norm;
  }
}

}  // namespace

// hidden += delta (in place, when delta is given), then RMSNorm of hidden: a new tensor of
// hidden's shape, hidden * rsqrt(mean(hidden^2) + eps) * weight.
torch::Tensor add_rms_norm(torch::Tensor hidden, c10::optional<torch::Tensor> delta, torch::Tensor weight, double eps) {
  check_float_vector(hidden, "hidden");
  check_float_vector(weight, "weight");
  const int64_t n = weight.numel();
  TORCH_CHECK(hidden.numel() == n, "hidden has ", hidden.numel(), " values, the norm's weight ", n);
  float* h = hidden.data_ptr<float>();
  if (delta.has_value()) {
    check_float_vector(*delta, "delta");
    TORCH_CHECK(delta->numel() == n, "delta has ", delta->numel(), " values, hidden ", n);
    const float* d = delta->data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) h[i] += d[i];
  }
  const float inverse = 1.f / std::sqrt(sum_of_squares(h, n) / static_cast<float>(n) + static_cast<float>(eps));
  auto out = torch::empty_like(hidden);
  float* o = out.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (h[i] * inverse);
  return out;
}

// One query token's attention, from the fused q/k/v projection's output:
// qkv (num_heads + 2 * num_kv_heads) * head_dim values (q, then k, then v); cos / sin head_dim
// values for this position (rotate-half convention). Rotates q and k, writes k and v at
// `position` of keys / values (1, num_kv_heads, max_length, head_dim), and attends over positions
// [first, position]. Returns (1, num_heads * head_dim).
torch::Tensor attend_one(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys, torch::Tensor values,
                         int64_t position, int64_t first, int64_t num_heads, int64_t num_kv_heads, double scale) {
  check_float_vector(qkv, "qkv");
  check_float_vector(cos, "cos");
  check_float_vector(sin, "sin");
  check_float_vector(keys, "keys");
  check_float_vector(values, "values");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  const int64_t head_dim = cos.numel(), half = head_dim / 2;
  TORCH_CHECK(head_dim % 2 == 0 && sin.numel() == head_dim, "cos and sin must hold the same even head_dim values");
  TORCH_CHECK(qkv.numel() == (num_heads + 2 * num_kv_heads) * head_dim, "qkv has ", qkv.numel(), " values; expected (",
              num_heads, " + 2 x ", num_kv_heads, ") x ", head_dim);
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == 1 && keys.size(1) == num_kv_heads && keys.size(3) == head_dim &&
              values.sizes() == keys.sizes(), "keys / values must be (1, num_kv_heads, max_length, head_dim)");
  const int64_t max_length = keys.size(2);
  TORCH_CHECK(0 <= first && first <= position && position < max_length, "positions [", first, ", ", position,
              "] do not fit a cache of ", max_length);
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const float* in = qkv.data_ptr<float>();
  float* key_cache = keys.data_ptr<float>();
  float* value_cache = values.data_ptr<float>();
  auto rotate = [&](const float* x, float* out) {
    for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] - x[i + half] * s[i];
    for (int64_t i = half; i < head_dim; ++i) out[i] = x[i] * c[i] + x[i - half] * s[i];
  };
  std::vector<float> query(num_heads * head_dim);
  for (int64_t h = 0; h < num_heads; ++h) rotate(in + h * head_dim, query.data() + h * head_dim);
  const float* k_in = in + num_heads * head_dim;
  const float* v_in = k_in + num_kv_heads * head_dim;
  for (int64_t g = 0; g < num_kv_heads; ++g) {
    rotate(k_in + g * head_dim, key_cache + (g * max_length + position) * head_dim);
    std::copy(v_in + g * head_dim, v_in + (g + 1) * head_dim, value_cache + (g * max_length + position) * head_dim);
  }
  auto out = torch::empty({1, num_heads * head_dim}, qkv.options());
  float* o = out.data_ptr<float>();
  const int64_t length = position - first + 1, group = num_heads / num_kv_heads;
  // Heads in parallel only once a head's work outweighs waking the other threads.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, length * head_dim));
  at::parallel_for(0, num_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(length);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t g = h / group;
      const float* q = query.data() + h * head_dim;
      const float* k = key_cache + (g * max_length + first) * head_dim;
      const float* v = value_cache + (g * max_length + first) * head_dim;
      attention_scores(q, k, length, head_dim, static_cast<float>(scale), weights.data());
      const float peak = *std::max_element(weights.begin(), weights.end());
      for (int64_t t = 0; t < length; ++t) weights[t] -= peak;
      exp_inplace(weights.data(), length);
      float total = 0.f;
      for (int64_t t = 0; t < length; ++t) total += weights[t];
      float* dst = o + h * head_dim;
      weighted_sum(weights.data(), v, length, head_dim, dst);
      const float inverse = 1.f / total;
      for (int64_t i = 0; i < head_dim; ++i) dst[i] *= inverse;
    }
  });
  return out;
}

// SiLU-gated product of the fused gate/up projection's output (gate then up, each
// `intermediate` values): (1, intermediate) silu(gate) * up.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_float_vector(gate_up, "gate_up");
  TORCH_CHECK(gate_up.numel() % 2 == 0, "gate_up must hold gate and up, the same size each");
  const int64_t n = gate_up.numel() / 2;
  auto out = torch::empty({1, n}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  const float* u = g + n;
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) o[i] = -g[i];
  exp_inplace(o, n);
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + o[i]) * u[i];
  return out;
}

namespace {

inline float bfloat16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// Round to nearest even, as torch's float32 -> bfloat16 conversion for finite values.
inline uint16_t float_to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

void load_row(const torch::Tensor& t, int64_t row, int64_t n, float* dst) {
  if (t.scalar_type() == torch::kFloat32) {
    const float* src = t.data_ptr<float>() + row * n;
    std::copy(src, src + n, dst);
  } else {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()) + row * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = bfloat16_to_float(src[i]);
  }
}

}  // namespace

// Many tokens' SiLU-gated product for a dense (prefill) MLP: gate and up (M, I), each bfloat16
// (a base-plane GEMM's output) or float32 (routed tokens' residual products added), to the
// down projection's bfloat16 GEMM input, silu(gate) * up computed in float32 and rounded once.
// The torch path widened gate and up to float32, ran SiLU and the product as two passes and
// narrowed the result again for the down GEMM: four passes over (M, I) floats become one.
// rotation: the down projection's input rotation (0: none), applied in float32 before the
// rounding, as the module path rotates its float32 input. float_output: float32 out, not
// rounded, for a down projection that reads float32 (the AVX2 lane kernels): widening the
// bfloat16 result again cost Qwen2.5-1.5B's prefill a (512, 8960) copy per layer.
// gelu_tanh: GELU's tanh form in place of SiLU (Gemma's MLPs), as g * sigmoid(2u) with
// u = sqrt(2/pi) (g + 0.044715 g^3), which is 0.5 g (1 + tanh u): the same e^x pass as SiLU's.
torch::Tensor silu_mul_rows(torch::Tensor gate, torch::Tensor up, int64_t rotation, bool float_output, bool gelu_tanh) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.is_contiguous() && up.is_contiguous() &&
              gate.device().is_cpu() && up.device().is_cpu(), "gate and up must be contiguous CPU (M, I) tensors of one shape");
  for (const auto* t : {&gate, &up})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 || t->scalar_type() == torch::kBFloat16, "gate and up must be float32 or bfloat16");
  const int64_t rows = gate.size(0), n = gate.size(1);
  TORCH_CHECK(rotation >= 0 && (rotation & (rotation - 1)) == 0 && (rotation == 0 || n % rotation == 0),
              "rotation must be 0 or a power of two that divides ", n, ", got ", rotation);
  auto out = torch::empty({rows, n}, gate.options().dtype(float_output ? torch::kFloat32 : torch::kBFloat16));
  uint16_t* o = float_output ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* of = float_output ? out.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g(n), u(n), e(n);
    for (int64_t row = begin; row < end; ++row) {
      load_row(gate, row, n, g.data());
      load_row(up, row, n, u.data());
      if (gelu_tanh) {
        constexpr float kTwiceSqrt2OverPi = 1.5957691216057308f;  // 2 sqrt(2 / pi)
        for (int64_t i = 0; i < n; ++i) e[i] = -kTwiceSqrt2OverPi * (g[i] + 0.044715f * g[i] * g[i] * g[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) e[i] = -g[i];
      }
      exp_inplace(e.data(), n);
      float* value = float_output ? of + row * n : e.data();  // float32 output: computed in place
      for (int64_t i = 0; i < n; ++i) value[i] = g[i] / (1.f + e[i]) * u[i];
      if (rotation) hadamard_inplace(value, n / rotation, rotation);
      if (!float_output) {
        uint16_t* dst = o + row * n;
        for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bfloat16(value[i]);
      }
    }
  });
  return out;
}

// The router's two decode features for one token: log of hidden's RMS (hidden_norm) and
// log ||normed @ sketch||^2 (error_estimate; sketch (in, rank) float32), as router.py defines them.
std::vector<double> router_features(torch::Tensor hidden, torch::Tensor normed, torch::Tensor sketch) {
  check_float_vector(hidden, "hidden");
  check_float_vector(normed, "normed");
  check_float_vector(sketch, "sketch");
  const int64_t n = hidden.numel();
  TORCH_CHECK(sketch.dim() == 2 && sketch.size(0) == normed.numel(), "sketch must be (in, rank) with in = normed's size");
  const double rms = std::sqrt(static_cast<double>(sum_of_squares(hidden.data_ptr<float>(), n))) / std::sqrt(static_cast<double>(n));
  const int64_t rank = sketch.size(1), in = sketch.size(0);
  const float* x = normed.data_ptr<float>();
  const float* p = sketch.data_ptr<float>();
  constexpr int64_t kRankChunk = 64;  // a chunk of the projection stays in registers
  double energy = 0.0;
  for (int64_t r0 = 0; r0 < rank; r0 += kRankChunk) {
    const int64_t width = std::min(kRankChunk, rank - r0);
    float projected[kRankChunk] = {};
    for (int64_t i = 0; i < in; ++i) {
      const float xi = x[i];
      const float* row = p + i * rank + r0;
      for (int64_t r = 0; r < width; ++r) projected[r] += xi * row[r];
    }
    for (int64_t r = 0; r < width; ++r) energy += static_cast<double>(projected[r]) * projected[r];
  }
  return {std::log(std::max(rms, 1e-12)), std::log(std::max(energy, 1e-20))};
}

// router_features plus the format-6 sensitivity signal, normed . probe (probe (in,) float32),
// in the same call: decode then pays one native call per layer for all three per-layer signals.
std::vector<double> router_features_with_probe(torch::Tensor hidden, torch::Tensor normed, torch::Tensor sketch, torch::Tensor probe) {
  check_float_vector(probe, "probe");
  TORCH_CHECK(probe.numel() == normed.numel(), "probe must have normed's size");
  std::vector<double> features = router_features(hidden, normed, sketch);
  const float* x = normed.data_ptr<float>();
  const float* v = probe.data_ptr<float>();
  float dot = 0.f;
  for (int64_t i = 0, n = normed.numel(); i < n; ++i) dot += x[i] * v[i];
  features.push_back(static_cast<double>(dot));
  return features;
}

// x (..., n) float32 times the block-diagonal Hadamard matrix of `block` (a power of two that
// divides n): a new tensor.
torch::Tensor hadamard_blocks(torch::Tensor x, int64_t block) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0, "the Hadamard block must be a power of two, got ", block);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % block == 0, "the last dimension (", x.dim() ? x.size(-1) : 0,
              ") must be a multiple of the Hadamard block ", block);
  auto out = x.clone();
  float* o = out.data_ptr<float>();
  const int64_t count = out.numel() / block;
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) { hadamard_inplace(o + begin * block, end - begin, block); });
  return out;
}

namespace {

// x (1, K) float32 through the first `used` planes of one projection, as the Python decode path
// computes it: the base plane's product (its activations at `base_wide_above` when it is read
// alone), plus each residual plane's product in float32, plus the bias. planes holds weight,
// scales, zeros and levels (the level table, or an empty tensor for even codes) of every stored
// plane in turn; meta their group size, first row and rows.
torch::Tensor project(const torch::Tensor& input, const std::vector<torch::Tensor>& planes, const std::vector<int64_t>& meta, int64_t used,
                      double base_wide_above, const c10::optional<torch::Tensor>& bias, int64_t rotation) {
  const torch::Tensor x = rotation ? hadamard_blocks(input, rotation) : input;
  TORCH_CHECK(used >= 1 && static_cast<size_t>(4 * used) <= planes.size() && planes.size() % 4 == 0 && 3 * planes.size() == 4 * meta.size(),
              "a projection needs weight, scales, zeros, levels and group size, first row, rows for each of its ", used, " planes");
  auto out = tap_kernels::matmul_w4(x, planes[0], planes[1], planes[2], meta[0], used > 1 ? 0.0 : base_wide_above, meta[1], meta[2],
                                    planes[3]);
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel();
  for (int64_t p = 1; p < used; ++p) {
    auto extra = tap_kernels::matmul_w4(x, planes[4 * p], planes[4 * p + 1], planes[4 * p + 2], meta[3 * p], 0.0, meta[3 * p + 1],
                                        meta[3 * p + 2], planes[4 * p + 3]);
    TORCH_CHECK(extra.numel() == n, "planes of one projection must have the same rows");
    const float* e = extra.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) o[i] += e[i];
  }
  if (bias.has_value()) {
    check_float_vector(*bias, "bias");
    TORCH_CHECK(bias->numel() == n, "bias has ", bias->numel(), " values, the projection ", n);
    const float* b = bias->data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) o[i] += b[i];
  }
  return out;
}

}  // namespace

// Everything of one Llama-family decoder layer after its input norm and routing decision, for one
// token: q/k/v, rotary and attention (attend_one), o, the residual add and post-attention norm
// (hidden is updated in place), gate/up, SiLU and down. Returns down's output (1, hidden), which
// the next layer's add_rms_norm adds to hidden. Each projection reads the first `*_used` of its
// planes (the router's decision). One call per layer instead of ten: the Python around each call
// was about half of a SmolLM2 step.
torch::Tensor decode_layer(torch::Tensor hidden, torch::Tensor normed, std::vector<torch::Tensor> qkv, std::vector<int64_t> qkv_meta,
                           int64_t qkv_used, c10::optional<torch::Tensor> qkv_bias, std::vector<torch::Tensor> o_proj,
                           std::vector<int64_t> o_meta, int64_t o_used, c10::optional<torch::Tensor> o_bias,
                           std::vector<torch::Tensor> gate_up, std::vector<int64_t> gate_up_meta, int64_t gate_up_used,
                           c10::optional<torch::Tensor> gate_up_bias, std::vector<torch::Tensor> down, std::vector<int64_t> down_meta,
                           int64_t down_used, c10::optional<torch::Tensor> down_bias, double base_wide_above, torch::Tensor cos,
                           torch::Tensor sin, torch::Tensor keys, torch::Tensor values, int64_t position, int64_t num_heads,
                           int64_t num_kv_heads, double scale, torch::Tensor post_norm, double post_eps,
                           std::vector<int64_t> rotations) {
  check_float_vector(normed, "normed");
  TORCH_CHECK(rotations.size() == 4, "decode_layer needs the input rotation of its four projections, got ", rotations.size());
  const auto flat = normed.view({1, -1});
  auto projected = project(flat, qkv, qkv_meta, qkv_used, base_wide_above, qkv_bias, rotations[0]);
  auto attended = attend_one(projected, cos, sin, keys, values, position, 0, num_heads, num_kv_heads, scale);
  auto out = project(attended, o_proj, o_meta, o_used, base_wide_above, o_bias, rotations[1]);
  auto post = add_rms_norm(hidden, out, post_norm, post_eps);
  auto activated = silu_mul(project(post.view({1, -1}), gate_up, gate_up_meta, gate_up_used, base_wide_above, gate_up_bias, rotations[2]));
  return project(activated, down, down_meta, down_used, base_wide_above, down_bias, rotations[3]);
}

void register_ops(pybind11::module& m) {
  m.def("add_rms_norm", &add_rms_norm);
  m.def("attend_one", &attend_one);
  m.def("silu_mul", &silu_mul);
  m.def("silu_mul_rows", &silu_mul_rows, py::arg("gate"), py::arg("up"), py::arg("rotation"), py::arg("float_output") = false,
        py::arg("gelu_tanh") = false);
  m.def("router_features", &router_features);
  m.def("router_features_with_probe", &router_features_with_probe);
  m.def("decode_layer", &decode_layer);
  m.def("hadamard_blocks", &hadamard_blocks);
}

}  // namespace tap_decode
