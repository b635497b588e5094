// Causal self-attention over a whole prompt (prefill), float32, with grouped KV heads.
//
// Why: torch's CPU flash attention ran a 512-token prefill's attention at about 20 GMAC/s on
// two Zen 3 cores (215-230 ms of SmolLM2's prefill, about as long as a third of its plane
// products). Its score and value products are small GEMM calls with a softmax pass between
// them. Here each task takes 48 query rows of one head and keeps their scores (48 x keys)
// in cache: the score product runs as a register-blocked kernel against keys transposed
// once per KV head, the softmax works on whole rows (no running rescale, since every key of
// a row is at hand), and the value product is a second register-blocked kernel. Keys past a
// row's position are never multiplied beyond the 16-key chunk that holds the diagonal.
//
// Semantics are those of torch's scaled_dot_product_attention(q, k, v, is_causal=True,
// scale=scale, enable_gqa=True) with as many queries as keys (top-left causal); sums run in a
// different order, so results agree to float32 rounding, not bitwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <limits>
#include <vector>

#include "vector_exp.h"

namespace tap_attention {

namespace {

constexpr int64_t kRows = 6;                   // query rows per register block
constexpr int64_t kQueryBlock = 8 * kRows;     // query rows per task (their scores stay in L2)
constexpr int64_t kKeys = 16;                  // keys per register block (two 8-float vectors)
constexpr int64_t kLanes = 16;                 // head_dim values per register block of the value product

// scores[r][j] = q[r] . kt[:, j] for rows [0, kRows) and keys [key_begin, key_end), widened to
// whole chunks of kKeys (key_begin a multiple of kKeys).
// q: (kRows, head_dim) row-major; kt: (head_dim, padded_keys); scores: (kRows, padded_keys).
void score_block(const float* q, const float* kt, int64_t head_dim, int64_t padded_keys, int64_t key_begin, int64_t key_end,
                 float* scores) {
#if defined(__AVX2__) && defined(__FMA__)
  for (int64_t j = key_begin; j < key_end; j += kKeys) {
    __m256 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* column = kt + j;
    for (int64_t d = 0; d < head_dim; ++d) {
      const __m256 k0 = _mm256_loadu_ps(column + d * padded_keys);
      const __m256 k1 = _mm256_loadu_ps(column + d * padded_keys + 8);
      for (int r = 0; r < kRows; ++r) {
        const __m256 qd = _mm256_broadcast_ss(q + r * head_dim + d);
        acc[r][0] = _mm256_fmadd_ps(qd, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qd, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(scores + r * padded_keys + j, acc[r][0]);
      _mm256_storeu_ps(scores + r * padded_keys + j + 8, acc[r][1]);
    }
  }
#else
  for (int64_t j = key_begin; j < key_end; ++j)
    for (int r = 0; r < kRows; ++r) {
      float total = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) total += q[r * head_dim + d] * kt[d * padded_keys + j];
      scores[r * padded_keys + j] = total;
    }
#endif
}

// out[r] = sum_{key_begin <= j < key_end} p[r][j] v[j] for kRows rows; v rows are value_stride apart.
void value_block(const float* p, int64_t padded_keys, int64_t key_begin, int64_t key_end, const float* v, int64_t value_stride,
                 int64_t head_dim, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  for (int64_t c = 0; c < head_dim; c += kLanes) {
    __m256 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = key_begin; j < key_end; ++j) {
      const float* row = v + j * value_stride + c;
      const __m256 v0 = _mm256_loadu_ps(row), v1 = _mm256_loadu_ps(row + 8);
      for (int r = 0; r < kRows; ++r) {
        const __m256 w = _mm256_broadcast_ss(p + r * padded_keys + j);
        acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(out + r * head_dim + c, acc[r][0]);
      _mm256_storeu_ps(out + r * head_dim + c + 8, acc[r][1]);
    }
  }
#else
  for (int r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < head_dim; ++c) {
      float total = 0.f;
      for (int64_t j = key_begin; j < key_end; ++j) total += p[r * padded_keys + j] * v[j * value_stride + c];
      out[r * head_dim + c] = total;
    }
#endif
}

// Softmax of one row's scores over keys [begin, length) in place; zeroes keys [zero_begin, begin)
// and [length, zero_end) so the value product can run over the whole block. Returns 1 / sum of
// the exponentials. Here `scores` points at key 0 of the row.
float softmax_row(float* scores, int64_t zero_begin, int64_t begin, int64_t length, int64_t zero_end) {
  for (int64_t j = zero_begin; j < begin; ++j) scores[j] = 0.f;
  scores += begin, length -= begin, zero_end -= begin;
  float peak = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if defined(__AVX2__)
  __m256 peaks = _mm256_set1_ps(peak);
  for (; j + 8 <= length; j += 8) peaks = _mm256_max_ps(peaks, _mm256_loadu_ps(scores + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, peaks);
  for (float lane : lanes) peak = std::max(peak, lane);
#endif
  for (; j < length; ++j) peak = std::max(peak, scores[j]);
  for (j = 0; j < length; ++j) scores[j] -= peak;
  tap_math::exp_inplace(scores, length);
  float total = 0.f;
  j = 0;
#if defined(__AVX2__)
  __m256 sums = _mm256_setzero_ps();
  for (; j + 8 <= length; j += 8) sums = _mm256_add_ps(sums, _mm256_loadu_ps(scores + j));
  _mm256_store_ps(lanes, sums);
  for (float lane : lanes) total += lane;
#endif
  for (; j < length; ++j) total += scores[j];
  for (j = length; j < zero_end; ++j) scores[j] = 0.f;
  return 1.f / total;
}

void check_attention_input(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 4, name, " must be (batch, heads, seq_len, head_dim); got ", t.dim(), " dimensions");
  TORCH_CHECK(t.stride(3) == 1, name, "'s head_dim must be contiguous");
}

}  // namespace

// softmax(q k^T * scale, causal) v for a prompt with as many queries as keys; with window > 0,
// each query sees only the `window` keys up to its own position (a sliding-window layer).
// q (batch, num_heads, seq_len, head_dim); k, v (batch, num_kv_heads, seq_len, head_dim), any
// strides with a contiguous head_dim; num_heads a multiple of num_kv_heads, head_dim a multiple
// of 16. Returns (batch, seq_len, num_heads, head_dim), the layout the output projection reads.
torch::Tensor attend_causal(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale, int64_t window) {
  check_attention_input(q, "q");
  check_attention_input(k, "k");
  check_attention_input(v, "v");
  const int64_t batch = q.size(0), num_heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  const int64_t num_kv_heads = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch && k.size(2) == seq_len && k.size(3) == head_dim,
              "k and v must be (", batch, ", num_kv_heads, ", seq_len, ", ", head_dim, "); got k ", k.sizes(), " and v ",
              v.sizes());
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK(head_dim % kLanes == 0, "head_dim must be a multiple of ", kLanes, "; got ", head_dim);
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: no window); got ", window);
  auto out = torch::empty({batch, seq_len, num_heads, head_dim}, q.options());
  if (seq_len == 0 || batch == 0 || num_heads == 0) return out;
  const int64_t padded_keys = (seq_len + kKeys - 1) / kKeys * kKeys, group = num_heads / num_kv_heads;

  // Keys transposed once per KV head, (head_dim, padded_keys), zero past seq_len.
  auto keys_t = torch::zeros({batch, num_kv_heads, head_dim, padded_keys}, q.options());
  const float* k_data = k.data_ptr<float>();
  float* kt_data = keys_t.data_ptr<float>();
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const float* source = k_data + (bg / num_kv_heads) * k.stride(0) + (bg % num_kv_heads) * k.stride(1);
      float* target = kt_data + bg * head_dim * padded_keys;
      for (int64_t j = 0; j < seq_len; ++j)
        for (int64_t d = 0; d < head_dim; ++d) target[d * padded_keys + j] = source[j * k.stride(2) + d];
    }
  });

  // Tasks are (batch, head, query block). A later block costs more (more keys), and at::parallel_for
  // hands each thread one contiguous range, so blocks go light, heavy, light, heavy... per head.
  const int64_t blocks = (seq_len + kQueryBlock - 1) / kQueryBlock;
  const float* q_data = q.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  float* o_data = out.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  at::parallel_for(0, batch * num_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(kQueryBlock * head_dim), scores(kQueryBlock * padded_keys), attended(kRows * head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, slot = task % blocks;
      const int64_t block = slot % 2 == 0 ? slot / 2 : blocks - 1 - slot / 2;
      const int64_t b = bh / num_heads, h = bh % num_heads, g = h / group;
      const int64_t first = block * kQueryBlock, rows = std::min(kQueryBlock, seq_len - first);
      const float* q_head = q_data + b * q.stride(0) + h * q.stride(1);
      // Scaled query rows; rows past the prompt's end repeat its last row and are not written.
      for (int64_t r = 0; r < kQueryBlock; ++r) {
        const float* row = q_head + std::min(first + r, seq_len - 1) * q.stride(2);
        for (int64_t d = 0; d < head_dim; ++d) queries[r * head_dim + d] = row[d] * scale_f;
      }
      const float* kt = kt_data + (b * num_kv_heads + g) * head_dim * padded_keys;
      const float* v_head = v_data + b * v.stride(0) + g * v.stride(1);
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        // Keys [lowest, last) cover the block's rows: each row sees [its position - window + 1,
        // its position], or from key 0 without a window.
        const int64_t last = std::min(first + r0 + kRows, seq_len);
        const int64_t lowest = window > 0 ? std::max<int64_t>(0, first + r0 - window + 1) : 0;
        float* block_scores = scores.data() + r0 * padded_keys;
        score_block(queries.data() + r0 * head_dim, kt, head_dim, padded_keys, lowest / kKeys * kKeys, last, block_scores);
        float inverse[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t position = std::min(first + r0 + r, seq_len - 1);
          const int64_t begin = window > 0 ? std::max<int64_t>(0, position - window + 1) : 0;
          inverse[r] = softmax_row(block_scores + r * padded_keys, lowest, begin, position + 1, last);
        }
        value_block(block_scores, padded_keys, lowest, last, v_head, v.stride(2), head_dim, attended.data());
        for (int64_t r = 0; r < kRows && r0 + r < rows; ++r) {
          float* target = o_data + ((b * seq_len + first + r0 + r) * num_heads + h) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) target[d] = attended[r * head_dim + d] * inverse[r];
        }
      }
    }
  });
  return out;
}

void register_ops(pybind11::module& m) {
  m.def("attend_causal", &attend_causal, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("window") = 0);
}

}  // namespace tap_attention
