// Fused Top-K sparse GEMV for batch-1 decoding (CPU).
//
//   y[j] = sum_{i in TopK(|x|, k)} x[i] * weight_t[i, j]  (+ bias[j])
//
// weight_t is the *input-channel-major* weight, shape (in, out), contiguous,
// so every selected input channel is one contiguous row of `out` values.
// The kernel
//   1. selects the k largest |x_i| in O(in) (nth_element on a scratch copy of
//      the IEEE bit patterns of |x|, then one ordered scan, which yields the
//      selected indices already sorted ascending),
//   2. streams the k selected rows, accumulating RS_ROWS rows at a time into
//      float32 accumulators with FMAs.  Threads split the selected rows (each
//      streams whole contiguous rows into its own partial sums, then reduces
//      a slice of the columns); RS_SPLIT_K=0 instead splits output columns
//      (each thread streams contiguous sub-rows and owns a slice of y).
// float32, bfloat16 and float16 weights/activations; accumulation is float32,
// the output has the input dtype.
//
// Built JIT by torch.utils.cpp_extension.load with -O3 -march=native -fopenmp.
// AVX-512 intrinsics are used when the compiler targets AVX-512F/BW/VL;
// otherwise plain loops (auto-vectorised for whatever -march allows).

// Only light headers (no <torch/extension.h>) to keep the JIT build short; the
// ops are registered with TORCH_LIBRARY as rotsparse_cpp::* and called through
// torch.ops (which releases the GIL around the kernel).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define RS_AVX512 1
#else
#define RS_AVX512 0
#endif

// int4 rows through VNNI integer dot products (vpdpbusd) on int8 activations.
#ifndef RS_INT4_VNNI
#if RS_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define RS_INT4_VNNI 1
#else
#define RS_INT4_VNNI 0
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RS_PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)
#define RS_RESTRICT __restrict__
#else
#define RS_PREFETCH(p) ((void)0)
#define RS_RESTRICT
#endif

// ---------------------------------------------------------------------------

// body(t) for t in [0, nthreads): one OpenMP thread each, or in turn without OpenMP / for one thread.
template <typename Body>
void run_threads(int nthreads, const Body& body) {
#ifdef _OPENMP
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    { body(omp_get_thread_num()); }
    return;
  }
#endif
  for (int t = 0; t < nthreads; ++t) body(t);
}
// Tuning constants (see eval/results/kernel_bench.md for how they were chosen)
// ---------------------------------------------------------------------------
#ifndef RS_ROWS
#define RS_ROWS 8  // rows accumulated per pass over the accumulator tile
#endif
#ifndef RS_MAX_TILE_BYTES
#define RS_MAX_TILE_BYTES (32 * 1024)  // max bytes of one weight sub-row per tile
#endif
#ifndef RS_INT4_TILE_COLS
#define RS_INT4_TILE_COLS 4096  // max output columns of an int4 tile
#endif
#ifndef RS_INT4_BATCH_TILE_COLS
#define RS_INT4_BATCH_TILE_COLS 4096  // max output columns of a several-token int4 tile
#endif
#ifndef RS_INT4_BATCH_QUADS
#define RS_INT4_BATCH_QUADS 2  // several-token int4: quads of 4 rows per pass over the int32 sums
#endif
#ifndef RS_INT4_QUADS
#define RS_INT4_QUADS 2  // VNNI int4: quads of 4 rows per pass over the int32 accumulators
#endif
#ifndef RS_PF_MODE
#define RS_PF_MODE 0  // 0: none (HW prefetchers), 1: next row group, 2: current rows ahead
#endif
#ifndef RS_SPLIT_K
#define RS_SPLIT_K 1  // 1: threads split the selected rows; 0: threads split output columns
#endif
#ifndef RS_PF_DIST
#define RS_PF_DIST 0  // extra lines ahead (in vectors) for RS_PF_MODE 1
#endif

namespace {

using bf16_t = uint16_t;  // raw bfloat16 bits
struct half_bits {
  uint16_t x;
};

// ----------------------------- scalar helpers ------------------------------
inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(int8_t v) { return static_cast<float>(v); }
inline float to_f32(half_bits v) {
  return static_cast<float>(c10::Half(v.x, c10::Half::from_bits()));
}

inline uint32_t abs_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x7fffffffu;  // monotone in |v|; NaN sorts above +inf
}

template <typename T>
struct io;  // store float32 -> T
template <>
struct io<float> {
  static inline void store(float* dst, float v) { *dst = v; }
};
template <>
struct io<bf16_t> {
  static inline void store(bf16_t* dst, float v) { *dst = c10::BFloat16(v).x; }
};
template <>
struct io<half_bits> {
  static inline void store(half_bits* dst, float v) { dst->x = c10::Half(v).x; }
};

// ------------------------------ SIMD helpers -------------------------------
#if RS_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const half_bits* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16m(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16m(const bf16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16m(const half_bits* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16m(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
#endif

// ---------------------------------------------------------------------------
// Top-K selection: exactly k indices, ascending, plus their values as float.
// Ties at the threshold are broken towards lower indices.
//
// |x| is compared through its IEEE bit pattern (monotone for non-negative
// floats).  One histogram pass over the top 11 bits finds the bucket holding
// the k-th largest value; nth_element on that bucket's (few) members gives the
// exact threshold; one ordered scan emits the indices already sorted.
// ---------------------------------------------------------------------------
template <typename T>
int64_t select_topk(const T* x, int64_t n, int64_t k, int64_t* idx, float* val) {
  if (k <= 0) return 0;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) {
      idx[i] = i;
      val[i] = to_f32(x[i]);
    }
    return n;
  }
  constexpr int kShift = 20;  // 31-bit keys -> 2048 buckets
  constexpr int kBuckets = 1 << (31 - kShift);
  std::vector<uint32_t> bits(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) bits[i] = abs_bits(to_f32(x[i]));
  // 4 interleaved histograms: activations crowd into a few buckets, and a
  // single histogram would serialise on store-to-load forwarding.
  std::vector<uint32_t> hist4(4 * kBuckets, 0u);
  uint32_t* h0 = hist4.data();
  uint32_t* h1 = h0 + kBuckets;
  uint32_t* h2 = h1 + kBuckets;
  uint32_t* h3 = h2 + kBuckets;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++h0[bits[i] >> kShift];
    ++h1[bits[i + 1] >> kShift];
    ++h2[bits[i + 2] >> kShift];
    ++h3[bits[i + 3] >> kShift];
  }
  for (; i < n; ++i) ++h0[bits[i] >> kShift];
  int64_t above = 0;  // elements in buckets strictly above the threshold bucket
  int bucket = kBuckets - 1;
  for (; bucket > 0; --bucket) {
    const int64_t cnt = int64_t(h0[bucket]) + h1[bucket] + h2[bucket] + h3[bucket];
    if (above + cnt >= k) break;
    above += cnt;
  }
  // Members of the threshold bucket (branch-free compaction).
  std::vector<uint32_t> cand(static_cast<size_t>(n) + 16);
  int64_t nc = 0;
  i = 0;
#if RS_AVX512
  {
    const __m512i vb = _mm512_set1_epi32(bucket);
    for (; i + 16 <= n; i += 16) {
      const __m512i v = _mm512_loadu_si512(bits.data() + i);
      const __mmask16 m = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(v, kShift), vb);
      _mm512_mask_compressstoreu_epi32(cand.data() + nc, m, v);
      nc += __builtin_popcount(m);
    }
  }
#endif
  for (; i < n; ++i) {
    cand[nc] = bits[i];
    nc += int(bits[i] >> kShift) == bucket;
  }
  const int64_t need = k - above;  // 1 <= need <= nc
  std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.begin() + nc,
                   std::greater<uint32_t>());
  const uint32_t thr = cand[need - 1];
  int64_t n_gt = above;  // entries strictly above thr
  for (i = 0; i < need - 1; ++i) n_gt += cand[i] > thr;
  int64_t ties = k - n_gt;  // how many entries equal to thr we may take
  // Ordered emission.  The scalar loop is branch-free and writes one slot past
  // the end at most: the caller's buffers hold >= k + 1 entries.
  int64_t c = 0;
  i = 0;
#if RS_AVX512
  {
    const __m512i vt = _mm512_set1_epi32(static_cast<int>(thr));
    const __m512i iota_lo = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i iota_hi = _mm512_set_epi64(15, 14, 13, 12, 11, 10, 9, 8);
    for (; i + 16 <= n; i += 16) {
      const __m512i v = _mm512_loadu_si512(bits.data() + i);
      const __mmask16 eq = _mm512_cmpeq_epi32_mask(v, vt);
      if (eq != 0) {  // rare: values tied with the threshold, keep index order
        for (int64_t l = i; l < i + 16; ++l) {
          const uint32_t b = bits[l];
          const bool take = b > thr || (b == thr && ties > 0);
          if (take) {
            if (b == thr) --ties;
            idx[c] = l;
            val[c] = to_f32(x[l]);
            ++c;
          }
        }
        continue;
      }
      const __mmask16 gt = _mm512_cmpgt_epu32_mask(v, vt);
      const __m512i base = _mm512_set1_epi64(i);
      const int c_lo = __builtin_popcount(gt & 0xffu);
      _mm512_mask_compressstoreu_epi64(idx + c, static_cast<__mmask8>(gt),
                                       _mm512_add_epi64(base, iota_lo));
      _mm512_mask_compressstoreu_epi64(idx + c + c_lo, static_cast<__mmask8>(gt >> 8),
                                       _mm512_add_epi64(base, iota_hi));
      _mm512_mask_compressstoreu_ps(val + c, gt, load16(x + i));
      c += __builtin_popcount(gt);
    }
  }
#endif
  for (; i < n; ++i) {
    const uint32_t b = bits[i];
    const int64_t eq = b == thr;
    const int64_t take = int64_t(b > thr) | (eq & int64_t(ties > 0));
    ties -= eq & take;
    idx[c] = i;
    val[c] = to_f32(x[i]);
    c += take;
  }
  return c;  // == k
}

// ---------------------------------------------------------------------------
// Accumulate rows idx[0..K) (scaled by xs) of Wt[:, j0:j0+len] into acc[0..len)
// ---------------------------------------------------------------------------
template <typename W>
void accumulate_tile(float* RS_RESTRICT acc, int64_t len, const W* RS_RESTRICT Wt,
                     int64_t ldw, int64_t j0, const int64_t* RS_RESTRICT idx,
                     const float* RS_RESTRICT xs, int64_t K) {
  constexpr int R = RS_ROWS;
  int64_t s = 0;
#if RS_AVX512
  const int64_t len16 = len & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - len16)) - 1u);
#if RS_PF_MODE != 0
  constexpr int64_t kLine = 64 / int64_t(sizeof(W));  // elements per cache line
#endif
  for (; s + R <= K; s += R) {
    const W* p[R];
    __m512 xb[R];
    for (int r = 0; r < R; ++r) {
      p[r] = Wt + idx[s + r] * ldw + j0;
      xb[r] = _mm512_set1_ps(xs[s + r]);
    }
#if RS_PF_MODE == 1
    const W* q[R];  // next group's rows, same columns
    for (int r = 0; r < R; ++r) q[r] = (s + R + r < K) ? Wt + idx[s + R + r] * ldw + j0 : p[r];
#endif
    int64_t j = 0;
    for (; j < len16; j += 16) {
#if RS_PF_MODE == 1
      if ((j & (kLine - 1)) == 0) {
        for (int r = 0; r < R; ++r) RS_PREFETCH(q[r] + j + RS_PF_DIST * 16);
      }
#elif RS_PF_MODE == 2
      if ((j & (kLine - 1)) == 0) {
        for (int r = 0; r < R; ++r) RS_PREFETCH(p[r] + j + RS_PF_DIST * 16);
      }
#endif
      __m512 a = _mm512_loadu_ps(acc + j);
      for (int r = 0; r < R; ++r) a = _mm512_fmadd_ps(xb[r], load16(p[r] + j), a);
      _mm512_storeu_ps(acc + j, a);
    }
    if (j < len) {
      __m512 a = _mm512_maskz_loadu_ps(tail, acc + j);
      for (int r = 0; r < R; ++r) a = _mm512_fmadd_ps(xb[r], load16m(p[r] + j, tail), a);
      _mm512_mask_storeu_ps(acc + j, tail, a);
    }
  }
  for (; s < K; ++s) {
    const W* p = Wt + idx[s] * ldw + j0;
    const __m512 xb = _mm512_set1_ps(xs[s]);
    int64_t j = 0;
    for (; j < len16; j += 16)
      _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(xb, load16(p + j), _mm512_loadu_ps(acc + j)));
    if (j < len) {
      __m512 a = _mm512_maskz_loadu_ps(tail, acc + j);
      _mm512_mask_storeu_ps(acc + j, tail, _mm512_fmadd_ps(xb, load16m(p + j, tail), a));
    }
  }
#else
  // Portable path: plain loops that the compiler vectorises (-O3 -march=native).
  for (; s + R <= K; s += R) {
    const W* p[R];
    float xv[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = xs[s + r];
      p[r] = Wt + idx[s + r] * ldw + j0;
    }
    if (s + R < K) RS_PREFETCH(Wt + idx[s + R] * ldw + j0);
    for (int64_t j = 0; j < len; ++j) {
      float a = acc[j];
      for (int r = 0; r < R; ++r) a += xv[r] * to_f32(p[r][j]);
      acc[j] = a;
    }
  }
  for (; s < K; ++s) {
    const W* p = Wt + idx[s] * ldw + j0;
    const float xv = xs[s];
    for (int64_t j = 0; j < len; ++j) acc[j] += xv * to_f32(p[j]);
  }
#endif
}

// Sparse GEMV driver over given (sorted) rows idx[0..K), shared by every weight
// format.  accumulate(acc, j0, len, idx, xs, K) adds the rows' contribution to
// columns [j0, j0 + len) into acc[0..len); store(j, v) writes output column j
// from its float32 sum v.  `align` (columns) keeps tile edges on 64-byte
// multiples of the weight rows (and on whole packed blocks), `max_tile` caps a
// tile's width in columns.
template <typename Accumulate, typename Store>
void gemv_driver(int64_t out, int64_t K, int64_t align, int64_t max_tile, const int64_t* idx,
                 const float* xs, const Accumulate& accumulate, const Store& store) {
  // Column partition (single thread, or RS_SPLIT_K=0): one contiguous block of
  // columns per thread, cut into tiles of at most max_tile columns, so that
  // threads never share a cache line of y / weight.
  int nthreads = std::max(1, at::get_num_threads());
  // Don't spawn threads for tiny problems (fork/join costs a few us).
  const int64_t work = K * out;
  if (work < (int64_t(1) << 15)) nthreads = 1;
  const int64_t max_by_cols = std::max<int64_t>(1, (out + align - 1) / align);
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, max_by_cols));
  max_tile = std::max<int64_t>(align, max_tile / align * align);

  auto body = [&](int t) {
    // [c0, c1) columns owned by thread t, aligned to `align`.
    const int64_t blocks = (out + align - 1) / align;
    const int64_t b0 = blocks * t / nthreads, b1 = blocks * (t + 1) / nthreads;
    const int64_t c0 = std::min(out, b0 * align), c1 = std::min(out, b1 * align);
    if (c0 >= c1) return;
    const int64_t ncols = c1 - c0;
    const int64_t ntiles = (ncols + max_tile - 1) / max_tile;
    const int64_t tile_w = ((ncols + ntiles - 1) / ntiles + align - 1) / align * align;
    std::vector<float> accv(static_cast<size_t>(std::min(tile_w, ncols)) + 16);
    float* acc = accv.data();
    for (int64_t j0 = c0; j0 < c1; j0 += tile_w) {
      const int64_t len = std::min(tile_w, c1 - j0);
      std::memset(acc, 0, sizeof(float) * len);
      accumulate(acc, j0, len, idx, xs, K);
      for (int64_t j = 0; j < len; ++j) store(j0 + j, acc[j]);
    }
  };

#if RS_SPLIT_K && defined(_OPENMP)
  // Default multi-thread partition: threads split the selected rows (so each
  // streams whole rows, the longest contiguous runs), accumulate full-width
  // float32 partial sums, then reduce their own column slice.  Measured 0-10%
  // faster than splitting columns on 2 cores (eval/results/kernel_bench.md).
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, std::max<int64_t>(1, K / 16)));
  if (nthreads > 1) {
    const int64_t out_pad = (out + 15) / 16 * 16;
    std::unique_ptr<float[]> part_buf(new float[static_cast<size_t>(nthreads * out_pad)]);
    float* part = part_buf.get();
#pragma omp parallel num_threads(nthreads)
    {
      const int t = omp_get_thread_num();
      const int64_t r0 = K * t / nthreads, r1 = K * (t + 1) / nthreads;
      float* acc = part + t * out_pad;
      std::memset(acc, 0, sizeof(float) * out);
      const int64_t ntiles = (out + max_tile - 1) / max_tile;
      const int64_t tile_w = ((out + ntiles - 1) / ntiles + align - 1) / align * align;
      for (int64_t j0 = 0; j0 < out; j0 += tile_w)
        accumulate(acc + j0, j0, std::min(tile_w, out - j0), idx + r0, xs + r0, r1 - r0);
#pragma omp barrier
      const int64_t blocks = (out + align - 1) / align;
      const int64_t c0 = std::min(out, blocks * t / nthreads * align);
      const int64_t c1 = std::min(out, blocks * (t + 1) / nthreads * align);
      for (int64_t j = c0; j < c1; ++j) {
        float v = 0.f;
        for (int u = 0; u < nthreads; ++u) v += part[u * out_pad + j];
        store(j, v);
      }
    }
    return;
  }
#endif
  run_threads(nthreads, body);
}

// Sparse GEMV over given (sorted) rows of a float weight Wt (in, out); y has
// `out` elements of type W.
template <typename W>
void gemv_rows(const W* Wt, int64_t out, const int64_t* idx, const float* xs, int64_t K,
               const float* bias, W* y) {
  gemv_driver(
      out, K, 64 / int64_t(sizeof(W)), RS_MAX_TILE_BYTES / int64_t(sizeof(W)), idx, xs,
      [&](float* acc, int64_t j0, int64_t len, const int64_t* rows, const float* vals, int64_t n) {
        accumulate_tile<W>(acc, len, Wt, out, j0, rows, vals, n);
      },
      [&](int64_t j, float v) { io<W>::store(y + j, bias ? v + bias[j] : v); });
}

// ---------------------------------------------------------------------------
// Several tokens at once (batched decode, short prompts):
//   y[m, j] = sum_{i in TopK(|x_m|, k)} x_m[i] * Wt[i, j]  (+ bias[j]),  m < M
// Per pass of at most RS_BATCH_TOKENS tokens: every token's Top-K, then one
// stream over the union of their kept rows (`rows`, ascending), each read once
// for all tokens: V (U, M) holds x_m[i] where token m keeps row i, else 0.
// Threads split the output columns (tiles of at most RS_MAX_TILE_BYTES of a
// row); RS_ROWS rows at a time stream over a tile in 32-column micro tiles
// whose M x 32 float32 sums stay in registers (FMAs with the values broadcast
// from V), so every weight vector is loaded and converted once for M tokens.
// ---------------------------------------------------------------------------
#ifndef RS_BATCH_PF
#define RS_BATCH_PF 1  // prefetch the rows of the row group this many groups ahead (0: none)
#endif
#ifndef RS_BATCH_TOKENS
#define RS_BATCH_TOKENS 8  // tokens per pass over the union of their kept rows
#endif

#if RS_AVX512
// The M tokens' float32 sums of the 32-column micro tile at column j of a tile of `len` columns (acc: M rows of
// `len`), in registers while a row group streams over them.
template <int M>
inline void load_sums(__m512 (&a)[M][2], const float* acc, int64_t len, int64_t j) {
  for (int m = 0; m < M; ++m) {
    a[m][0] = _mm512_loadu_ps(acc + m * len + j);
    a[m][1] = _mm512_loadu_ps(acc + m * len + j + 16);
  }
}

template <int M>
inline void store_sums(const __m512 (&a)[M][2], float* acc, int64_t len, int64_t j) {
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(acc + m * len + j, a[m][0]);
    _mm512_storeu_ps(acc + m * len + j + 16, a[m][1]);
  }
}

// Prefetch the micro tile at column `col` of the rows of the row group RS_BATCH_PF groups after the one at
// s: scattered rows streamed this slowly (M tokens' FMAs per vector) outrun the hardware prefetchers.
template <typename W>
inline void prefetch_row_group(const W* Wt, int64_t ldw, int64_t col, const int64_t* rows, int64_t s, int64_t U) {
#if RS_BATCH_PF
  for (int64_t r = s + RS_BATCH_PF * RS_ROWS; r < std::min<int64_t>(U, s + (RS_BATCH_PF + 1) * RS_ROWS); ++r) {
    const char* q = reinterpret_cast<const char*>(Wt + rows[r] * ldw + col);
    RS_PREFETCH(q);
    if (32 * sizeof(W) > 64) RS_PREFETCH(q + 64);  // a micro tile of float32 spans two cache lines
  }
#endif
}
#endif

template <typename W, int M>
void accumulate_batch_tile(float* RS_RESTRICT acc, int64_t len, const W* RS_RESTRICT Wt, int64_t ldw, int64_t j0,
                           const int64_t* RS_RESTRICT rows, const float* RS_RESTRICT V, int64_t U) {
  // acc: M rows of `len` sums (stride len, len a multiple of 32); columns j0 + [0, len) of Wt, of which
  // the first `valid` exist (the caller passes len rounded up; masked loads stop at the row's end).
#if RS_AVX512
  const int64_t valid = std::min<int64_t>(len, ldw - j0);
  for (int64_t s = 0; s < U; s += RS_ROWS) {
    const int64_t G = std::min<int64_t>(RS_ROWS, U - s);
    for (int64_t j = 0; j < len; j += 32) {
      const int64_t left = valid - j;
      if (left <= 0) break;
      const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
      const __mmask16 m1 = left >= 32   ? __mmask16(0xFFFF)
                           : left <= 16 ? __mmask16(0)
                                        : __mmask16((1u << (left - 16)) - 1u);
      __m512 a[M][2];
      load_sums<M>(a, acc, len, j);
      prefetch_row_group(Wt, ldw, j0 + j, rows, s, U);
      for (int64_t r = 0; r < G; ++r) {
        const W* p = Wt + rows[s + r] * ldw + j0 + j;
        // Masked loads only in the row's last micro tile: they are several times slower on some CPUs.
        const __m512 w0 = left >= 32 ? load16(p) : load16m(p, m0);
        const __m512 w1 = left >= 32 ? load16(p + 16) : load16m(p + 16, m1);
        const float* v = V + (s + r) * M;
        for (int m = 0; m < M; ++m) {
          const __m512 vb = _mm512_set1_ps(v[m]);
          a[m][0] = _mm512_fmadd_ps(vb, w0, a[m][0]);
          a[m][1] = _mm512_fmadd_ps(vb, w1, a[m][1]);
        }
      }
      store_sums<M>(a, acc, len, j);
    }
  }
#else
  const int64_t valid = std::min<int64_t>(len, ldw - j0);
  for (int64_t u = 0; u < U; ++u) {
    const W* p = Wt + rows[u] * ldw + j0;
    for (int m = 0; m < M; ++m) {
      const float v = V[u * M + m];
      if (v == 0.f) continue;
      float* a = acc + m * len;
      for (int64_t j = 0; j < valid; ++j) a[j] += v * to_f32(p[j]);
    }
  }
#endif
}

// bfloat16 weights (and so bfloat16 activations): rows in pairs through AVX512-BF16 dot products
// (vdpbf16ps: two rows' exact products per float32 lane, denormal inputs read as zero), half the
// instructions of one FMA per row.
// P ((U + 1) / 2, M): the two bf16 values of token m for a pair of rows (the first row in the low half; 0 for
// the missing second row of an odd U). Each 32-column micro tile keeps its sums in unpacklo/hi_epi16 order
// (`bf16_pair_column`), put back in column order by `unpermute_bf16_pairs`.
#if RS_AVX512 && defined(__AVX512BF16__)
#define RS_BATCH_BF16_DOT 1
#else
#define RS_BATCH_BF16_DOT 0
#endif
static_assert(RS_ROWS % 2 == 0, "row groups hold whole pairs of rows");

#if RS_BATCH_BF16_DOT
template <int M>
void accumulate_batch_tile_bf16(float* RS_RESTRICT acc, int64_t len, const bf16_t* RS_RESTRICT Wt, int64_t ldw,
                                int64_t j0, const int64_t* RS_RESTRICT rows, const uint32_t* RS_RESTRICT P,
                                int64_t U) {
  const int64_t valid = std::min<int64_t>(len, ldw - j0);
  for (int64_t s = 0; s < U; s += RS_ROWS) {
    const int64_t G = std::min<int64_t>(RS_ROWS, U - s);
    for (int64_t j = 0; j < len; j += 32) {
      const int64_t left = valid - j;
      if (left <= 0) break;
      const __mmask32 mask = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      __m512 a[M][2];
      load_sums<M>(a, acc, len, j);
      prefetch_row_group(Wt, ldw, j0 + j, rows, s, U);
      for (int64_t r = 0; r < G; r += 2) {
        const bf16_t* p0 = Wt + rows[s + r] * ldw + j0 + j;
        const bf16_t* p1 = r + 1 < G ? Wt + rows[s + r + 1] * ldw + j0 + j : p0;  // (its values are 0)
        const __m512i w0 = left >= 32 ? _mm512_loadu_si512(p0) : _mm512_maskz_loadu_epi16(mask, p0);
        const __m512i w1 = left >= 32 ? _mm512_loadu_si512(p1) : _mm512_maskz_loadu_epi16(mask, p1);
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(w0, w1);
        const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(w0, w1);
        const uint32_t* v = P + (s + r) / 2 * M;
        for (int m = 0; m < M; ++m) {
          const __m512bh vb = (__m512bh)_mm512_set1_epi32(static_cast<int>(v[m]));
          a[m][0] = _mm512_dpbf16_ps(a[m][0], lo, vb);
          a[m][1] = _mm512_dpbf16_ps(a[m][1], hi, vb);
        }
      }
      store_sums<M>(a, acc, len, j);
    }
  }
}
#endif

// Column (0..31) of a micro tile whose sum is at position i (0..31) after `accumulate_batch_tile_bf16`:
// positions 0-15 (unpacklo) hold columns 0-3, 8-11, 16-19, 24-27; positions 16-31 (unpackhi) the others.
inline int bf16_pair_column(int i) {
  const int lane = i & 15;
  return (lane >> 2) * 8 + (i >= 16 ? 4 : 0) + (lane & 3);
}

inline void unpermute_bf16_pairs(float* acc, int64_t len) {
  float tmp[32];
  for (int64_t j = 0; j < len; j += 32) {
    for (int i = 0; i < 32; ++i) tmp[bf16_pair_column(i)] = acc[j + i];
    std::memcpy(acc + j, tmp, sizeof(tmp));
  }
}

// The M tokens' (M <= RS_BATCH_TOKENS) float32 sums over the union rows `rows` (U) with values V (U, M),
// handed to store(m, j, sum) for every token m and output column j.
template <typename W, int M, typename Store>
void batch_rows(const W* Wt, int64_t out, const int64_t* rows, const float* V, int64_t U, const Store& store) {
  constexpr int64_t kMicro = 32;
  int nthreads = std::max(1, at::get_num_threads());
  if (U * out * M < (int64_t(1) << 15)) nthreads = 1;
  const int64_t blocks = (out + kMicro - 1) / kMicro;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, blocks));
  const int64_t max_tile = std::max<int64_t>(kMicro, RS_MAX_TILE_BYTES / int64_t(sizeof(W)) / kMicro * kMicro);
  std::vector<uint32_t> pairs;  // bfloat16 pairs of V (see accumulate_batch_tile_bf16; W = bf16 implies
                                // bf16 activations: topk_gemv's x and weight share their dtype)
#if RS_BATCH_BF16_DOT
  if constexpr (std::is_same_v<W, bf16_t>) {
    auto bits = [](float v) {  // exact: V holds bfloat16 activations
      uint32_t u;
      std::memcpy(&u, &v, 4);
      return u >> 16;
    };
    pairs.assign(static_cast<size_t>((U + 1) / 2 * M), 0u);
    for (int64_t q = 0; q < (U + 1) / 2; ++q)
      for (int m = 0; m < M; ++m)
        pairs[q * M + m] = bits(V[2 * q * M + m]) | (2 * q + 1 < U ? bits(V[(2 * q + 1) * M + m]) << 16 : 0u);
  }
#endif
  auto body = [&](int t) {
    const int64_t c0 = std::min(out, blocks * t / nthreads * kMicro);
    const int64_t c1 = std::min(out, blocks * (t + 1) / nthreads * kMicro);
    if (c0 >= c1) return;
    std::vector<float> accv(static_cast<size_t>(M * max_tile));
    float* acc = accv.data();
    for (int64_t j0 = c0; j0 < c1; j0 += max_tile) {
      const int64_t cols = std::min(max_tile, c1 - j0);
      const int64_t len = (cols + kMicro - 1) / kMicro * kMicro;
      std::memset(acc, 0, sizeof(float) * M * len);
#if RS_BATCH_BF16_DOT
      if constexpr (std::is_same_v<W, bf16_t>) {
        accumulate_batch_tile_bf16<M>(acc, len, Wt, out, j0, rows, pairs.data(), U);
        for (int m = 0; m < M; ++m) unpermute_bf16_pairs(acc + m * len, len);
      } else {
        accumulate_batch_tile<W, M>(acc, len, Wt, out, j0, rows, V, U);
      }
#else
      accumulate_batch_tile<W, M>(acc, len, Wt, out, j0, rows, V, U);
#endif
      for (int m = 0; m < M; ++m)
        for (int64_t j = 0; j < cols; ++j) store(m, j0 + j, acc[m * len + j]);
    }
  };
  run_threads(nthreads, body);
}

template <typename W, typename Store>
void batch_dispatch(int M, const W* Wt, int64_t out, const int64_t* rows, const float* V, int64_t U,
                    const Store& store) {
  switch (M) {
    case 1: return batch_rows<W, 1>(Wt, out, rows, V, U, store);
    case 2: return batch_rows<W, 2>(Wt, out, rows, V, U, store);
    case 3: return batch_rows<W, 3>(Wt, out, rows, V, U, store);
    case 4: return batch_rows<W, 4>(Wt, out, rows, V, U, store);
    case 5: return batch_rows<W, 5>(Wt, out, rows, V, U, store);
    case 6: return batch_rows<W, 6>(Wt, out, rows, V, U, store);
    case 7: return batch_rows<W, 7>(Wt, out, rows, V, U, store);
    default: return batch_rows<W, 8>(Wt, out, rows, V, U, store);
  }
}
static_assert(RS_BATCH_TOKENS <= 8, "batch_dispatch instantiates up to 8 tokens per pass");

// Tokens x[0..T) (each n values of type X) through the weight Wt (n, out) of type W, in passes of
// RS_BATCH_TOKENS tokens: store(t, j, sum) for every token t and output column j.
template <typename X, typename W, typename Store>
void topk_gemm_tokens(const X* x, int64_t T, int64_t n, int64_t keep_k, const W* Wt, int64_t out,
                      const Store& store) {
  std::vector<int64_t> idx(static_cast<size_t>(keep_k + 1));  // +1: see select_topk
  std::vector<float> xs(idx.size());
  std::vector<float> V;
  std::vector<int64_t> rows;
  std::vector<uint8_t> used;
  for (int64_t t0 = 0; t0 < T; t0 += RS_BATCH_TOKENS) {
    const int M = static_cast<int>(std::min<int64_t>(RS_BATCH_TOKENS, T - t0));
    V.assign(static_cast<size_t>(n * M), 0.f);
    used.assign(static_cast<size_t>(n), 0);
    for (int m = 0; m < M; ++m) {
      const int64_t K = select_topk<X>(x + (t0 + m) * n, n, keep_k, idx.data(), xs.data());
      for (int64_t s = 0; s < K; ++s) {
        V[idx[s] * M + m] = xs[s];
        used[idx[s]] = 1;
      }
    }
    rows.clear();
    for (int64_t i = 0; i < n; ++i) {  // compact to the union of kept rows (in place: rows.size() <= i)
      if (!used[i]) continue;
      const int64_t u = static_cast<int64_t>(rows.size());
      if (u != i) std::memcpy(V.data() + u * M, V.data() + i * M, sizeof(float) * M);
      rows.push_back(i);
    }
    batch_dispatch<W>(M, Wt, out, rows.data(), V.data(), static_cast<int64_t>(rows.size()),
                      [&](int m, int64_t j, float v) { store(t0 + m, j, v); });
  }
}

// ---------------------------------------------------------------------------
// Weight-only quantized formats (symmetric, no zero point), input-channel-major:
//   int8: q (in, out) int8, scale (out,) float32 per output column:
//         y[j] = scale[j] * sum_i x[i] * q[i, j]  (+ bias[j])
//   int4: packed (in, out/2) uint8, scales (in/group, out) float16:
//         y[j] = sum_i x[i] * scales[i/group, j] * (n[i, j] - 8)  (+ bias[j])
//         n in [0, 15].  Columns come in blocks of 32 (a shorter last block of
//         even width w): byte b of a block holds column b (low nibble) and
//         column b + w/2 (high nibble), so one 16-byte load unpacks to two
//         runs of 16 columns without shuffles.
// A kept input channel reads one contiguous row of out (int8) or out/2 (int4)
// bytes; int4 reads the scale row of every group holding a kept channel once.
// int4 activations: the kept x of each group are quantized to int8 with one
// scale per group, d = max |x| / 127, q = round(x / d) (llama.cpp's Q8_0 does
// the same to its activations), so a group's rows reduce to integer dot
// products: p[j] = sum q[i] * n[i, j] over the group's kept rows (int32, VNNI
// vpdpbusd where the CPU has it), then acc[j] += scales[g, j] * d * (p[j] - 8 * sum q[i]).
// ---------------------------------------------------------------------------
constexpr int64_t kInt4Block = 32;

// Nibble of column c of one packed int4 row (out columns).
inline int int4_at(const uint8_t* row, int64_t out, int64_t c) {
  const int64_t b = c / kInt4Block * kInt4Block;
  const int64_t half = std::min(kInt4Block, out - b) / 2;
  const int64_t w = c - b;
  const uint8_t byte = row[b / 2 + (w < half ? w : w - half)];
  return w < half ? (byte & 0xF) : (byte >> 4);
}

// part[0..len) += sum_r xs[r] * n[idx[r], j0 + j]: rows idx[s0..s1) of the packed weight.
// Rows idx[s1..K) follow (other groups): the next R rows are prefetched while
// these stream, as scattered rows of out/2 bytes are too short for the hardware
// prefetchers to ramp up on.
void accumulate_int4_rows(float* RS_RESTRICT part, int64_t len, const uint8_t* RS_RESTRICT P,
                          int64_t out, int64_t j0, const int64_t* RS_RESTRICT idx,
                          const float* RS_RESTRICT xs, int64_t s0, int64_t s1, int64_t K) {
  const int64_t ldp = out / 2;
  // Full blocks of 32 columns inside [j0, j0 + len) (j0 is a multiple of 32).
  const int64_t full = std::min(len, (out / kInt4Block) * kInt4Block - j0);
  const int64_t nfull = std::max<int64_t>(0, full) / kInt4Block * kInt4Block;
  constexpr int R = RS_ROWS;
  int64_t s = s0;
#if RS_AVX512
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (; s + R <= s1; s += R) {
    const uint8_t* p[R];
    __m512 xb[R];
    const uint8_t* q[R];
    for (int r = 0; r < R; ++r) {
      p[r] = P + idx[s + r] * ldp + j0 / 2;
      q[r] = s + R + r < K ? P + idx[s + R + r] * ldp + j0 / 2 : p[r];
      xb[r] = _mm512_set1_ps(xs[s + r]);
    }
    for (int64_t j = 0; j < nfull; j += kInt4Block) {
      if ((j & (4 * kInt4Block - 1)) == 0)
        for (int r = 0; r < R; ++r) RS_PREFETCH(q[r] + j / 2);
      __m512 a0 = _mm512_loadu_ps(part + j), a1 = _mm512_loadu_ps(part + j + 16);
      for (int r = 0; r < R; ++r) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + j / 2));
        const __m128i lo = _mm_and_si128(b, low4);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        a0 = _mm512_fmadd_ps(xb[r], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), a0);
        a1 = _mm512_fmadd_ps(xb[r], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), a1);
      }
      _mm512_storeu_ps(part + j, a0);
      _mm512_storeu_ps(part + j + 16, a1);
    }
  }
  for (; s < s1; ++s) {
    const uint8_t* p = P + idx[s] * ldp + j0 / 2;
    const uint8_t* q = s + R < K ? P + idx[s + R] * ldp + j0 / 2 : p;
    const __m512 xb = _mm512_set1_ps(xs[s]);
    for (int64_t j = 0; j < nfull; j += kInt4Block) {
      if ((j & (4 * kInt4Block - 1)) == 0) RS_PREFETCH(q + j / 2);
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j / 2));
      const __m128i lo = _mm_and_si128(b, low4);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      _mm512_storeu_ps(part + j, _mm512_fmadd_ps(xb, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)),
                                                 _mm512_loadu_ps(part + j)));
      _mm512_storeu_ps(part + j + 16,
                       _mm512_fmadd_ps(xb, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)),
                                       _mm512_loadu_ps(part + j + 16)));
    }
  }
  s = s0;  // the short last block below, row by row
#else
  for (; s + R <= s1; s += R) {
    const uint8_t* p[R];
    float xv[R];
    for (int r = 0; r < R; ++r) {
      p[r] = P + idx[s + r] * ldp + j0 / 2;
      xv[r] = xs[s + r];
    }
    for (int64_t j = 0; j < nfull; j += kInt4Block) {
      for (int64_t w = 0; w < kInt4Block / 2; ++w) {
        float lo = part[j + w], hi = part[j + w + kInt4Block / 2];
        for (int r = 0; r < R; ++r) {
          const uint8_t byte = p[r][j / 2 + w];
          lo += xv[r] * float(byte & 0xF);
          hi += xv[r] * float(byte >> 4);
        }
        part[j + w] = lo;
        part[j + w + kInt4Block / 2] = hi;
      }
    }
  }
  for (; s < s1; ++s) {
    const uint8_t* p = P + idx[s] * ldp + j0 / 2;
    const float xv = xs[s];
    for (int64_t j = 0; j < nfull; j += kInt4Block)
      for (int64_t w = 0; w < kInt4Block / 2; ++w) {
        const uint8_t byte = p[j / 2 + w];
        part[j + w] += xv * float(byte & 0xF);
        part[j + w + kInt4Block / 2] += xv * float(byte >> 4);
      }
  }
  s = s0;
#endif
  if (nfull < len) {  // the last, shorter block of the row (out % 32 columns)
    for (; s < s1; ++s) {
      const uint8_t* row = P + idx[s] * ldp;
      for (int64_t j = nfull; j < len; ++j) part[j] += xs[s] * float(int4_at(row, out, j0 + j));
    }
  }
}

#if RS_INT4_VNNI
// Byte 4c + k of the permuted vector = byte c of row k's 16-byte slice (four rows' slices in the four 128-bit lanes).
alignas(64) constexpr uint8_t kInt4Interleave[64] = {
    0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21,
    37, 53, 6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58,
    11, 27, 43, 59, 12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

// The 32 columns at byte offset `off` of the quad's four rows pu[0..4) as two vectors whose int32 lanes hold one
// column's four nibbles (columns 0-15, then 16-31; the packed layout above), for vpdpbusd.
inline void int4_quad_nibbles(const uint8_t* const* pu, int64_t off, __m512i perm, __m512i low4, __m512i& lo,
                              __m512i& hi) {
  __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pu[0] + off)));
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(pu[1] + off)), 1);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(pu[2] + off)), 2);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(pu[3] + off)), 3);
  lo = _mm512_permutexvar_epi8(perm, _mm512_and_si512(v, low4));
  hi = _mm512_permutexvar_epi8(perm, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
}

// ip[0..nfull) += sum_r q[r] * n[idx[r], j0 + j] (int32) for rows idx[s0..s1) of one
// group, nfull a multiple of 32.  Rows stream in passes of RS_INT4_QUADS x 4 rows over
// the accumulators (whole rows: scattered rows read column-block by column-block thrash
// the prefetchers).  Per 32-column block, four rows' 16-byte slices are interleaved with
// one byte permute so that every int32 lane holds one column's four nibbles, and one
// vpdpbusd (unsigned nibbles times the four rows' signed int8 activations) adds 16
// columns' four products.
void accumulate_int4_rows_vnni(int32_t* RS_RESTRICT ip, int64_t nfull, const uint8_t* RS_RESTRICT P,
                               int64_t ldp, int64_t j0, const int64_t* RS_RESTRICT idx,
                               const int8_t* RS_RESTRICT q, int64_t s0, int64_t s1, int64_t K) {
  const __m512i perm = _mm512_load_si512(kInt4Interleave);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  constexpr int Q = RS_INT4_QUADS;
  for (int64_t s = s0; s < s1; s += 4 * Q) {
    const uint8_t* p[4 * Q];
    const uint8_t* next[4 * Q];
    __m512i a[Q];
    for (int u = 0; u < Q; ++u) {
      uint32_t packed = 0;
      for (int r = 4 * u; r < 4 * u + 4; ++r) {
        const bool real = s + r < s1;  // missing rows repeat row s with activation 0
        p[r] = P + idx[real ? s + r : s] * ldp + j0 / 2;
        next[r] = s + 4 * Q + r < K ? P + idx[s + 4 * Q + r] * ldp + j0 / 2 : p[r];
        packed |= uint32_t(uint8_t(real ? q[s + r] : 0)) << (8 * (r - 4 * u));
      }
      a[u] = _mm512_set1_epi32(static_cast<int32_t>(packed));
    }
    const int quads = static_cast<int>(std::min<int64_t>(Q, (s1 - s + 3) / 4));
    for (int64_t j = 0; j < nfull; j += kInt4Block) {
      if ((j & (4 * kInt4Block - 1)) == 0)  // the next pass's rows, as these stream
        for (int r = 0; r < 4 * quads; ++r) RS_PREFETCH(next[r] + j / 2);
      __m512i i0 = _mm512_loadu_si512(ip + j), i1 = _mm512_loadu_si512(ip + j + 16);
      for (int u = 0; u < quads; ++u) {
        __m512i lo, hi;
        int4_quad_nibbles(p + 4 * u, j / 2, perm, low4, lo, hi);
        i0 = _mm512_dpbusd_epi32(i0, lo, a[u]);
        i1 = _mm512_dpbusd_epi32(i1, hi, a[u]);
      }
      _mm512_storeu_si512(ip + j, i0);
      _mm512_storeu_si512(ip + j + 16, i1);
    }
  }
}
#endif

// acc[0..len) += sum over the kept rows idx[0..K) (ascending) of their dequantized int4 rows
// times the rows' int8 activations q (xq = q * d: the same values as float, d the group's scale).
void accumulate_int4(float* RS_RESTRICT acc, int64_t len, const uint8_t* P, const c10::Half* S,
                     int64_t out, int64_t group, int64_t j0, const int64_t* idx, const int8_t* q,
                     const float* d, const float* xq, int64_t K, float* RS_RESTRICT part) {
#if RS_INT4_VNNI
  // Whole 32-column blocks in int32 through VNNI; the row's last, shorter block (out % 32
  // columns) in float.
  const int64_t full = std::min(len, (out / kInt4Block) * kInt4Block - j0);
  const int64_t first = std::max<int64_t>(0, full) / kInt4Block * kInt4Block;
  int32_t* ip = reinterpret_cast<int32_t*>(part);
#else
  const int64_t first = 0;
#endif
  for (int64_t s = 0, e; s < K; s = e) {
    const int64_t g = idx[s] / group;
    for (e = s + 1; e < K && idx[e] / group == g; ++e) {}
    const c10::Half* sg = S + g * out + j0;
    float xsum = 0.f;
    for (int64_t r = s; r < e; ++r) xsum += xq[r];
    std::memset(part, 0, sizeof(float) * len);
    int64_t j = 0;
#if RS_INT4_VNNI
    int32_t qsum = 0;
    for (int64_t r = s; r < e; ++r) qsum += q[r];
    accumulate_int4_rows_vnni(ip, first, P, out / 2, j0, idx, q, s, e, K);
    for (int64_t r = s; r < e && first < len; ++r) {
      const uint8_t* row = P + idx[r] * (out / 2);
      for (int64_t c = first; c < len; ++c) part[c] += xq[r] * float(int4_at(row, out, j0 + c));
    }
    const __m512i qoff = _mm512_set1_epi32(8 * qsum);
    const __m512 dg = _mm512_set1_ps(d[s]);
    for (; j < first; j += 16) {
      const __m512 sc = _mm512_mul_ps(
          dg, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + j))));
      const __m512 pj = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(ip + j), qoff));
      _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(sc, pj, _mm512_loadu_ps(acc + j)));
    }
#else
    accumulate_int4_rows(part, len, P, out, j0, idx, xq, s, e, K);
#if RS_AVX512
    const __m512 off = _mm512_set1_ps(8.f * xsum);
    for (; j + 16 <= len; j += 16) {
      const __m512 sc =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + j)));
      _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(sc, _mm512_sub_ps(_mm512_loadu_ps(part + j), off),
                                                _mm512_loadu_ps(acc + j)));
    }
#endif
#endif
    for (; j < len; ++j) acc[j] += static_cast<float>(sg[j]) * (part[j] - 8.f * xsum);
  }
}

// Per kept row of an int4 GEMV: its activation quantized to int8 with its group's
// scale (see the format note above).  idx ascending, so a group's rows are adjacent.
struct GroupInt8 {
  std::vector<int8_t> q;
  std::vector<float> d, xq;  // d: the row's group scale; xq = q * d
};

GroupInt8 quantize_group_activations(const int64_t* idx, const float* xs, int64_t K, int64_t group) {
  GroupInt8 a;
  a.q.resize(static_cast<size_t>(K));
  a.d.resize(static_cast<size_t>(K));
  a.xq.resize(static_cast<size_t>(K));
  for (int64_t s = 0, e; s < K; s = e) {
    float amax = 0.f;
    for (e = s; e < K && idx[e] / group == idx[s] / group; ++e) amax = std::max(amax, std::fabs(xs[e]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t r = s; r < e; ++r) {
      const float v = std::nearbyint(xs[r] * inv);
      a.q[r] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
      a.d[r] = d;
      a.xq[r] = float(a.q[r]) * d;
    }
  }
  return a;
}

// Quantized sparse GEMVs over given (sorted) rows; y (out,) of type Y.
template <typename Y>
void gemv_rows_int8(const int8_t* Q, const float* scale, int64_t out, const int64_t* idx,
                    const float* xs, int64_t K, const float* bias, Y* y) {
  gemv_driver(
      out, K, 64, RS_MAX_TILE_BYTES, idx, xs,
      [&](float* acc, int64_t j0, int64_t len, const int64_t* rows, const float* vals, int64_t n) {
        accumulate_tile<int8_t>(acc, len, Q, out, j0, rows, vals, n);
      },
      [&](int64_t j, float v) { io<Y>::store(y + j, bias ? v * scale[j] + bias[j] : v * scale[j]); });
}

template <typename Y>
void gemv_rows_int4(const uint8_t* P, const c10::Half* S, int64_t out, int64_t group,
                    const int64_t* idx, const float* xs, int64_t K, const float* bias, Y* y) {
  // Tiles of whole 128-column blocks (64 bytes of a packed row), at most
  // RS_INT4_TILE_COLS columns, so that a tile's int32 / float partial sums stay
  // in L1 while the kept rows stream over them.
  const GroupInt8 act = quantize_group_activations(idx, xs, K, group);
  gemv_driver(
      out, K, 4 * kInt4Block, RS_INT4_TILE_COLS, idx, xs,
      [&](float* acc, int64_t j0, int64_t len, const int64_t* rows, const float* vals, int64_t n) {
        std::vector<float> part(static_cast<size_t>(len) + 16);
        const int64_t r0 = rows - idx;  // this thread's first row (split-K) or 0
        accumulate_int4(acc, len, P, S, out, group, j0, rows, act.q.data() + r0, act.d.data() + r0,
                        act.xq.data() + r0, n, part.data());
      },
      [&](int64_t j, float v) { io<Y>::store(y + j, bias ? v + bias[j] : v); });
}

// ---------------------------------------------------------------------------
// Several tokens through an int4 weight: passes of RS_BATCH_TOKENS tokens over the union of their kept rows.
// Every token's kept activations are rounded to int8 per weight group exactly as for one token
// (quantize_group_activations); a union row a token does not keep has activation 0 for it. Per group, the
// union rows go in quads (padded with activation 0), and each quad's 32-column block is unpacked and
// interleaved once and multiplied by every token's four activations (vpdpbusd): the packed weight is read
// once per pass. Per token, column and group the int32 sum p = sum_r q[r] * (n[r, j] - 8) is exact, so the
// result is the one-token kernel's up to float32 summation order: acc[j] += scales[g, j] * d * p.
// ---------------------------------------------------------------------------
struct Int4Pass {
  int M = 0;                        // tokens in the pass
  std::vector<int64_t> quad_rows;   // (quads, 4) weight rows; padding repeats the quad's first row
  std::vector<uint32_t> quad_act;   // (quads, M) four int8 activations, the quad's first row in the low byte
  std::vector<int64_t> groups;      // weight groups holding a union row, ascending
  std::vector<int64_t> group_quads; // (groups + 1) offsets into the quads
  std::vector<float> d;             // (groups, M) each token's activation scale (0 where it keeps no row)
  std::vector<int32_t> qsum;        // (groups, M) sum of each token's activations over the group
};

template <typename X>
Int4Pass int4_pass(const X* x, int M, int64_t n, int64_t keep_k, int64_t group) {
  Int4Pass pass;
  pass.M = M;
  std::vector<int8_t> q(static_cast<size_t>(n * M), 0);
  std::vector<float> dg(static_cast<size_t>(n / group * M), 0.f);
  std::vector<uint8_t> used(static_cast<size_t>(n), 0);
  std::vector<int64_t> idx(static_cast<size_t>(keep_k + 1));  // +1: see select_topk
  std::vector<float> xs(idx.size());
  for (int m = 0; m < M; ++m) {
    const int64_t K = select_topk<X>(x + m * n, n, keep_k, idx.data(), xs.data());
    const GroupInt8 a = quantize_group_activations(idx.data(), xs.data(), K, group);
    for (int64_t s = 0; s < K; ++s) {
      q[idx[s] * M + m] = a.q[s];
      dg[idx[s] / group * M + m] = a.d[s];
      used[idx[s]] = 1;
    }
  }
  pass.group_quads.push_back(0);
  std::vector<int64_t> rows;
  for (int64_t g = 0; g < n / group; ++g) {
    rows.clear();
    for (int64_t i = g * group; i < (g + 1) * group; ++i)
      if (used[i]) rows.push_back(i);
    if (rows.empty()) continue;
    pass.groups.push_back(g);
    for (int m = 0; m < M; ++m) {
      int32_t sum = 0;
      for (int64_t r : rows) sum += q[r * M + m];
      pass.d.push_back(dg[g * M + m]);
      pass.qsum.push_back(sum);
    }
    for (size_t s = 0; s < rows.size(); s += 4) {
      for (size_t k = 0; k < 4; ++k) pass.quad_rows.push_back(s + k < rows.size() ? rows[s + k] : rows[s]);
      for (int m = 0; m < M; ++m) {
        uint32_t packed = 0;
        for (size_t k = 0; k < 4 && s + k < rows.size(); ++k)
          packed |= uint32_t(uint8_t(q[rows[s + k] * M + m])) << (8 * k);
        pass.quad_act.push_back(packed);
      }
    }
    pass.group_quads.push_back(static_cast<int64_t>(pass.quad_rows.size() / 4));
  }
  return pass;
}

#if RS_INT4_VNNI
// acc[m][j] += scales[j] * d[m] * (sums[m][j] - 8 * qsum[m]) for the 32 columns at j (sums: int32 vectors).
template <int M>
inline void int4_scale_sums(float* acc, int64_t len, int64_t j, const c10::Half* sg, const float* d,
                            const int32_t* qsum, const __m512i (&sums)[M][2]) {
  const __m512 sc0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + j)));
  const __m512 sc1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + j + 16)));
  for (int m = 0; m < M; ++m) {
    const __m512i off = _mm512_set1_epi32(8 * qsum[m]);
    const __m512 dm = _mm512_set1_ps(d[m]);
    float* am = acc + m * len + j;
    _mm512_storeu_ps(am, _mm512_fmadd_ps(_mm512_mul_ps(dm, sc0), _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[m][0], off)),
                                         _mm512_loadu_ps(am)));
    _mm512_storeu_ps(am + 16, _mm512_fmadd_ps(_mm512_mul_ps(dm, sc1),
                                              _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[m][1], off)),
                                              _mm512_loadu_ps(am + 16)));
  }
}
#endif

#ifndef RS_INT4_BATCH_STREAM_MAX
#define RS_INT4_BATCH_STREAM_MAX 4  // several-token int4: up to this many tokens per pass, rows streamed whole
#endif

// acc (M rows of `len` sums, stride len) += the pass's tokens through columns j0 + [0, len) of the packed
// weight P (in, out / 2) with group scales S (in / group, out); j0 a multiple of 32. ibuf: M * len int32.
// Up to RS_INT4_BATCH_STREAM_MAX tokens (little work per byte: bandwidth-bound) a group's quads go
// RS_INT4_BATCH_QUADS at a time along the whole tile with the int32 sums in ibuf, so rows stream in long
// runs; more tokens (compute-bound) keep every token's sums of a 32-column block in registers over all the
// group's quads (fewer instructions per quad). Measured in eval/results/batch_kernel_int4.md.
template <int M>
void accumulate_int4_batch_tile(float* RS_RESTRICT acc, int32_t* RS_RESTRICT ibuf, int64_t len, const uint8_t* P,
                                const c10::Half* S, int64_t out, int64_t j0, const Int4Pass& pass) {
  const int64_t ldp = out / 2;
  const int64_t ngroups = static_cast<int64_t>(pass.groups.size());
  int64_t first = 0;  // columns [first, len) in scalar code below
#if RS_INT4_VNNI
  const int64_t full = std::min(len, (out / kInt4Block) * kInt4Block - j0);
  first = std::max<int64_t>(0, full) / kInt4Block * kInt4Block;
  const __m512i perm = _mm512_load_si512(kInt4Interleave);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t nquads = static_cast<int64_t>(pass.quad_rows.size() / 4);
  for (int64_t u = 0; u < ngroups; ++u) {
    const c10::Half* sg = S + pass.groups[u] * out + j0;
    const int64_t q0 = pass.group_quads[u], q1 = pass.group_quads[u + 1];
    const float* d = pass.d.data() + u * M;
    const int32_t* qsum = pass.qsum.data() + u * M;
    if constexpr (M <= RS_INT4_BATCH_STREAM_MAX) {
      constexpr int Q = RS_INT4_BATCH_QUADS;
      std::memset(ibuf, 0, sizeof(int32_t) * M * first);
      for (int64_t qd = q0; qd < q1; qd += Q) {
        const int quads = static_cast<int>(std::min<int64_t>(Q, q1 - qd));
        const uint8_t* p[4 * Q];
        const uint8_t* next[4 * Q];
        for (int r = 0; r < 4 * Q; ++r) {
          const int64_t q = std::min<int64_t>(qd + r / 4, q1 - 1), qn = qd + Q + r / 4;
          p[r] = P + pass.quad_rows[4 * q + r % 4] * ldp + j0 / 2;
          next[r] = qn < nquads ? P + pass.quad_rows[4 * qn + r % 4] * ldp + j0 / 2 : p[r];
        }
        const uint32_t* a = pass.quad_act.data() + qd * M;
        for (int64_t j = 0; j < first; j += kInt4Block) {
          if ((j & (4 * kInt4Block - 1)) == 0)  // the next pass's rows, as these stream
            for (int r = 0; r < 4 * quads; ++r) RS_PREFETCH(next[r] + j / 2);
          __m512i sums[M][2];
          for (int m = 0; m < M; ++m) {
            sums[m][0] = _mm512_loadu_si512(ibuf + m * first + j);
            sums[m][1] = _mm512_loadu_si512(ibuf + m * first + j + 16);
          }
          for (int v = 0; v < quads; ++v) {
            __m512i lo, hi;
            int4_quad_nibbles(p + 4 * v, j / 2, perm, low4, lo, hi);
            for (int m = 0; m < M; ++m) {
              const __m512i am = _mm512_set1_epi32(static_cast<int32_t>(a[v * M + m]));
              sums[m][0] = _mm512_dpbusd_epi32(sums[m][0], lo, am);
              sums[m][1] = _mm512_dpbusd_epi32(sums[m][1], hi, am);
            }
          }
          for (int m = 0; m < M; ++m) {
            _mm512_storeu_si512(ibuf + m * first + j, sums[m][0]);
            _mm512_storeu_si512(ibuf + m * first + j + 16, sums[m][1]);
          }
        }
      }
      for (int64_t j = 0; j < first; j += kInt4Block) {
        __m512i sums[M][2];
        for (int m = 0; m < M; ++m) {
          sums[m][0] = _mm512_loadu_si512(ibuf + m * first + j);
          sums[m][1] = _mm512_loadu_si512(ibuf + m * first + j + 16);
        }
        int4_scale_sums<M>(acc, len, j, sg, d, qsum, sums);
      }
    } else {
      for (int64_t j = 0; j < first; j += kInt4Block) {
        __m512i sums[M][2];
        for (int m = 0; m < M; ++m) sums[m][0] = sums[m][1] = _mm512_setzero_si512();
        for (int64_t qd = q0; qd < q1; ++qd) {
          const int64_t* r = pass.quad_rows.data() + 4 * qd;
          const uint8_t* pu[4] = {P + r[0] * ldp + j0 / 2, P + r[1] * ldp + j0 / 2, P + r[2] * ldp + j0 / 2,
                                  P + r[3] * ldp + j0 / 2};
          if ((j & (4 * kInt4Block - 1)) == 0)  // the rows' next cache lines
            for (int k = 0; k < 4; ++k) RS_PREFETCH(pu[k] + j / 2 + 64);
          __m512i lo, hi;
          int4_quad_nibbles(pu, j / 2, perm, low4, lo, hi);
          const uint32_t* a = pass.quad_act.data() + qd * M;
          for (int m = 0; m < M; ++m) {
            const __m512i am = _mm512_set1_epi32(static_cast<int32_t>(a[m]));
            sums[m][0] = _mm512_dpbusd_epi32(sums[m][0], lo, am);
            sums[m][1] = _mm512_dpbusd_epi32(sums[m][1], hi, am);
          }
        }
        int4_scale_sums<M>(acc, len, j, sg, d, qsum, sums);
      }
    }
  }
#endif
  if (first >= len) return;
  std::vector<int32_t> p(static_cast<size_t>(M * (len - first)));
  for (int64_t u = 0; u < ngroups; ++u) {
    const c10::Half* sg = S + pass.groups[u] * out + j0;
    std::fill(p.begin(), p.end(), 0);
    for (int64_t qd = pass.group_quads[u]; qd < pass.group_quads[u + 1]; ++qd)
      for (int k = 0; k < 4; ++k) {
        const uint8_t* row = P + pass.quad_rows[4 * qd + k] * ldp;
        for (int m = 0; m < M; ++m) {
          const int32_t a = int8_t(pass.quad_act[qd * M + m] >> (8 * k));
          if (a == 0) continue;
          int32_t* pm = p.data() + m * (len - first);
          for (int64_t c = first; c < len; ++c) pm[c - first] += a * (int4_at(row, out, j0 + c) - 8);
        }
      }
    for (int m = 0; m < M; ++m) {
      const float dm = pass.d[u * M + m];
      for (int64_t c = first; c < len; ++c)
        acc[m * len + c] += static_cast<float>(sg[c]) * dm * float(p[m * (len - first) + c - first]);
    }
  }
}

// The pass's M tokens through the int4 weight: store(m, j, sum) for every token m and output column j.
template <int M, typename Store>
void int4_batch_rows(const uint8_t* P, const c10::Half* S, int64_t out, const Int4Pass& pass, const Store& store) {
  constexpr int64_t kAlign = 4 * kInt4Block;  // 64 bytes of a packed row
  int nthreads = std::max(1, at::get_num_threads());
  if (static_cast<int64_t>(pass.quad_rows.size()) * out * M < (int64_t(1) << 15)) nthreads = 1;
  const int64_t blocks = (out + kAlign - 1) / kAlign;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, blocks));
  const int64_t max_tile = RS_INT4_BATCH_TILE_COLS / kAlign * kAlign;
  run_threads(nthreads, [&](int t) {
    const int64_t c0 = std::min(out, blocks * t / nthreads * kAlign);
    const int64_t c1 = std::min(out, blocks * (t + 1) / nthreads * kAlign);
    if (c0 >= c1) return;
    std::vector<float> acc(static_cast<size_t>(M * std::min(max_tile, c1 - c0)));
    std::vector<int32_t> ibuf(acc.size());  // a group's int32 sums (VNNI)
    for (int64_t j0 = c0; j0 < c1; j0 += max_tile) {
      const int64_t len = std::min(max_tile, c1 - j0);
      std::fill(acc.begin(), acc.begin() + M * len, 0.f);
      accumulate_int4_batch_tile<M>(acc.data(), ibuf.data(), len, P, S, out, j0, pass);
      for (int m = 0; m < M; ++m)
        for (int64_t j = 0; j < len; ++j) store(m, j0 + j, acc[m * len + j]);
    }
  });
}

// Tokens x[0..T) (n values each) through the int4 weight, in passes of RS_BATCH_TOKENS tokens.
template <typename X, typename Store>
void topk_gemm_tokens_int4(const X* x, int64_t T, int64_t n, int64_t keep_k, const uint8_t* P, const c10::Half* S,
                           int64_t out, int64_t group, const Store& store) {
  for (int64_t t0 = 0; t0 < T; t0 += RS_BATCH_TOKENS) {
    const int M = static_cast<int>(std::min<int64_t>(RS_BATCH_TOKENS, T - t0));
    const Int4Pass pass = int4_pass<X>(x + t0 * n, M, n, keep_k, group);
    auto st = [&](int m, int64_t j, float v) { store(t0 + m, j, v); };
    switch (M) {
      case 1: int4_batch_rows<1>(P, S, out, pass, st); break;
      case 2: int4_batch_rows<2>(P, S, out, pass, st); break;
      case 3: int4_batch_rows<3>(P, S, out, pass, st); break;
      case 4: int4_batch_rows<4>(P, S, out, pass, st); break;
      case 5: int4_batch_rows<5>(P, S, out, pass, st); break;
      case 6: int4_batch_rows<6>(P, S, out, pass, st); break;
      case 7: int4_batch_rows<7>(P, S, out, pass, st); break;
      default: int4_batch_rows<8>(P, S, out, pass, st);
    }
  }
}

// ---------------------------------------------------------------------------
// Top-K GEMV with a low-bit residual copy (SparsifyConfig.residual_bits):
//   y = sum_{i kept} x_i Wt[i, :] + sum_{i copied} x_i R[i, :]  (+ bias)
// (copied: the largest |x_i| below the kept ones, all of them or a band: SparsifyConfig.residual_band)
// R[i, j] = scale[i, j / 64] * (code[i, j] - (2^bits - 1) / 2): codes packed
// 8 / bits per byte along the output (the first in the low bits), each row
// padded to whole groups of 64 columns, scales (in, groups) float16.  A kept
// row is read as in topk_gemv; a dropped row reads bits / 16 of a 16-bit row
// plus its scale row.  16 columns of a 2-bit row are one 32-bit word (code j
// in bits 2j, 2j+1), of a 1-bit row one 16-bit word: broadcast, shifted per
// lane, mapped to its level by a table permute.
// ---------------------------------------------------------------------------
constexpr int64_t kResidualGroup = 64;

template <int BITS>
inline float residual_code(const uint8_t* row, int64_t c) {
  return float((row[c * BITS / 8] >> ((c * BITS) % 8)) & ((1 << BITS) - 1));
}

#if RS_AVX512
// 16 columns' levels code - centre: the columns' code word broadcast, shifted by
// BITS per lane; the low 4 bits of each lane then index a 16-entry table of
// (e mod 2^BITS) - centre (so no masking or conversion).
template <int BITS>
inline __m512 residual_levels16(const uint8_t* p, __m512i shifts, __m512 table) {
  uint32_t word = 0;
  std::memcpy(&word, p, 16 * BITS / 8);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts), table);
}
#endif

// acc[0..len) += sum over rows idx[0..n) of xs * R[idx, j0 + .]; j0 a multiple of 64.
template <int BITS>
void accumulate_residual(float* RS_RESTRICT acc, int64_t len, const uint8_t* C, int64_t ldc,
                         const c10::Half* S, int64_t groups, int64_t j0, const int64_t* idx,
                         const float* xs, int64_t n) {
  constexpr float kCentre = ((1 << BITS) - 1) / 2.f;
  const int64_t g0 = j0 / kResidualGroup, ng = (len + kResidualGroup - 1) / kResidualGroup;
  constexpr int R = 4;
  int64_t s = 0;
#if RS_AVX512
  __m512i shifts;
  __m512 table;
  {
    alignas(64) int32_t sh[16];
    alignas(64) float tb[16];
    for (int l = 0; l < 16; ++l) {
      sh[l] = l * BITS;
      tb[l] = float(l & ((1 << BITS) - 1)) - kCentre;
    }
    shifts = _mm512_load_si512(sh);
    table = _mm512_load_ps(tb);
  }
  for (; s < n; s += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n - s));
    const uint8_t* p[R];
    const c10::Half* sc[R];
    for (int r = 0; r < rows; ++r) {
      p[r] = C + idx[s + r] * ldc + j0 * BITS / 8;
      sc[r] = S + idx[s + r] * groups + g0;
    }
    for (int64_t g = 0; g < ng; ++g) {
      __m512 f[R];
      for (int r = 0; r < rows; ++r) f[r] = _mm512_set1_ps(xs[s + r] * static_cast<float>(sc[r][g]));
      const int64_t end = std::min<int64_t>(len, (g + 1) * kResidualGroup);
      for (int64_t j = g * kResidualGroup; j < end; j += 16) {
        const __mmask16 m = end - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (end - j)) - 1u);
        __m512 a = _mm512_maskz_loadu_ps(m, acc + j);
        for (int r = 0; r < rows; ++r)
          a = _mm512_fmadd_ps(f[r], residual_levels16<BITS>(p[r] + j * BITS / 8, shifts, table), a);
        _mm512_mask_storeu_ps(acc + j, m, a);
      }
    }
  }
#else
  for (; s < n; ++s) {
    const uint8_t* row = C + idx[s] * ldc;
    const c10::Half* sc = S + idx[s] * groups + g0;
    for (int64_t g = 0; g < ng; ++g) {
      const float v = xs[s] * static_cast<float>(sc[g]);
      const int64_t end = std::min<int64_t>(len, (g + 1) * kResidualGroup);
      for (int64_t j = g * kResidualGroup; j < end; ++j)
        acc[j] += v * (residual_code<BITS>(row, j0 + j) - kCentre);
    }
  }
#endif
}

// rows[0..K) kept (through Wt), rows[K..n) dropped (through the residual copy); y (out,) of type W.
template <typename W>
void gemv_rows_residual(const W* Wt, const uint8_t* C, int64_t ldc, const c10::Half* S, int64_t groups,
                        int bits, int64_t out, const int64_t* rows, const float* vals, int64_t K,
                        int64_t n, const float* bias, W* y) {
  gemv_driver(
      out, n, kResidualGroup, RS_MAX_TILE_BYTES / int64_t(sizeof(W)), rows, vals,
      [&](float* acc, int64_t j0, int64_t len, const int64_t* r, const float* v, int64_t count) {
        const int64_t r0 = r - rows, r1 = r0 + count;
        const int64_t kept_end = std::min(r1, K), dropped_start = std::max(r0, K);
        if (r0 < kept_end) accumulate_tile<W>(acc, len, Wt, out, j0, r, v, kept_end - r0);
        if (dropped_start < r1) {
          const auto accumulate = bits == 2 ? accumulate_residual<2> : accumulate_residual<1>;
          accumulate(acc, len, C, ldc, S, groups, j0, rows + dropped_start, vals + dropped_start,
                     r1 - dropped_start);
        }
      },
      [&](int64_t j, float v) { io<W>::store(y + j, bias ? v + bias[j] : v); });
}

// ---------------------------------------------------------------------------
// Dense GEMV over a row-major (out, in) weight (an nn.Linear weight as stored):
//   y[j] = dot(W[j, :], x) (+ bias[j]),  float32 accumulation.
// Used for dense parts of a decode step (the lm_head) without re-laying out
// (or untying) their weights.  Threads own contiguous blocks of rows, so each
// streams one contiguous region of the weight.
// ---------------------------------------------------------------------------
template <typename W>
void dot_rows(const W* RS_RESTRICT w, int64_t r0, int64_t r1, int64_t in,
              const float* RS_RESTRICT x, const float* bias, W* RS_RESTRICT y) {
  int64_t r = r0;
#if RS_AVX512
  const int64_t in16 = in & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - in16)) - 1u);
  constexpr int R = 4;
  for (; r + R <= r1; r += R) {
    const W* p[R];
    __m512 a[R], b[R];
    for (int u = 0; u < R; ++u) {
      p[u] = w + (r + u) * in;
      a[u] = _mm512_setzero_ps();
      b[u] = _mm512_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 32 <= in16; j += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + j), x1 = _mm512_loadu_ps(x + j + 16);
      for (int u = 0; u < R; ++u) {
        a[u] = _mm512_fmadd_ps(load16(p[u] + j), x0, a[u]);
        b[u] = _mm512_fmadd_ps(load16(p[u] + j + 16), x1, b[u]);
      }
    }
    for (; j < in16; j += 16) {
      const __m512 x0 = _mm512_loadu_ps(x + j);
      for (int u = 0; u < R; ++u) a[u] = _mm512_fmadd_ps(load16(p[u] + j), x0, a[u]);
    }
    if (j < in) {
      const __m512 x0 = _mm512_maskz_loadu_ps(tail, x + j);
      for (int u = 0; u < R; ++u) a[u] = _mm512_fmadd_ps(load16m(p[u] + j, tail), x0, a[u]);
    }
    for (int u = 0; u < R; ++u) {
      const float v = _mm512_reduce_add_ps(_mm512_add_ps(a[u], b[u]));
      io<W>::store(y + r + u, bias ? v + bias[r + u] : v);
    }
  }
  for (; r < r1; ++r) {
    const W* p = w + r * in;
    __m512 a = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j < in16; j += 16) a = _mm512_fmadd_ps(load16(p + j), _mm512_loadu_ps(x + j), a);
    if (j < in) a = _mm512_fmadd_ps(load16m(p + j, tail), _mm512_maskz_loadu_ps(tail, x + j), a);
    const float v = _mm512_reduce_add_ps(a);
    io<W>::store(y + r, bias ? v + bias[r] : v);
  }
#else
  for (; r < r1; ++r) {
    const W* p = w + r * in;
    float a = 0.f;
    for (int64_t j = 0; j < in; ++j) a += to_f32(p[j]) * x[j];
    io<W>::store(y + r, bias ? a + bias[r] : a);
  }
#endif
}

template <typename W>
void dense_gemv_rows(const W* w, int64_t out, int64_t in, const float* x, const float* bias, W* y) {
  int nthreads = std::max(1, at::get_num_threads());
  if (out * in < (int64_t(1) << 15)) nthreads = 1;
  // Row blocks of 16 rows (a cache line of y even in float32) per thread.
  const int64_t blocks = (out + 15) / 16;
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, blocks));
  auto body = [&](int t) {
    const int64_t r0 = std::min(out, blocks * t / nthreads * 16);
    const int64_t r1 = std::min(out, blocks * (t + 1) / nthreads * 16);
    if (r0 < r1) dot_rows<W>(w, r0, r1, in, x, bias, y);
  };
  run_threads(nthreads, body);
}

// ------------------------------ validation ---------------------------------
// x is one token of `in` features, or (several_tokens) any number of them: (..., in).
void check_tokens(const at::Tensor& x, int64_t in, bool several_tokens) {
  if (several_tokens) {
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "x has ", x.dim() ? x.size(-1) : 0, " features but in=", in);
  } else {
    TORCH_CHECK(x.numel() == in, "x has ", x.numel(), " elements (one token expected) but in=", in);
  }
}

void check_common(const at::Tensor& x, const at::Tensor& weight_t,
                  const std::optional<at::Tensor>& bias, bool several_tokens = false) {
  TORCH_CHECK(x.device().is_cpu() && weight_t.device().is_cpu(),
              "rotsparse topk_gemv (C++): tensors must be on the CPU");
  TORCH_CHECK(weight_t.dim() == 2, "weight_t must be 2-D (in, out), got ", weight_t.dim(), "-D");
  TORCH_CHECK(weight_t.is_contiguous(), "weight_t must be contiguous (in, out)");
  TORCH_CHECK(x.scalar_type() == weight_t.scalar_type(), "x dtype ", x.scalar_type(),
              " != weight_t dtype ", weight_t.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "unsupported dtype ", x.scalar_type(), " (float32, bfloat16, float16)");
  check_tokens(x, weight_t.size(0), several_tokens);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu(), "bias must be on the CPU");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight_t.size(1), "bias must have shape (",
                weight_t.size(1), ",)");
  }
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (shape.empty()) shape.push_back(out);
  else shape.back() = out;
  return shape;
}

template <typename W>
void run_gemv(const at::Tensor& weight_t, const std::optional<at::Tensor>& bias,
              const int64_t* idx, const float* xs, int64_t K, at::Tensor& y) {
  const int64_t out = weight_t.size(1);
  at::Tensor b32;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b32 = bias->to(at::kFloat).contiguous();
    bp = b32.data_ptr<float>();
  }
  gemv_rows<W>(reinterpret_cast<const W*>(weight_t.data_ptr()), out, idx, xs, K, bp,
               reinterpret_cast<W*>(y.data_ptr()));
}

template <typename W>
at::Tensor topk_gemv_impl(const at::Tensor& x, const at::Tensor& weight_t,
                             const std::optional<at::Tensor>& bias, int64_t keep_k) {
  const int64_t n = weight_t.size(0), out = weight_t.size(1);
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  const int64_t tokens = n ? x.numel() / n : 0;
  if (tokens != 1) {
    at::Tensor b32;
    if (bias.has_value() && bias->defined()) b32 = bias->to(at::kFloat).contiguous();
    const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
    W* yp = reinterpret_cast<W*>(y.data_ptr());
    topk_gemm_tokens<W, W>(reinterpret_cast<const W*>(xc.data_ptr()), tokens, n, keep_k,
                           reinterpret_cast<const W*>(weight_t.data_ptr()), out,
                           [&](int64_t t, int64_t j, float v) { io<W>::store(yp + t * out + j, bp ? v + bp[j] : v); });
    return y;
  }
  std::vector<int64_t> idx(static_cast<size_t>(keep_k + 1));  // +1: see select_topk
  std::vector<float> xs(idx.size());
  const int64_t K =
      select_topk<W>(reinterpret_cast<const W*>(xc.data_ptr()), n, keep_k, idx.data(), xs.data());
  run_gemv<W>(weight_t, bias, idx.data(), xs.data(), K, y);
  return y;
}

}  // namespace

// y = sum over the keep_k largest |x_i| of x_i * weight_t[i, :] (+ bias), per token of x (..., in).
at::Tensor topk_gemv(const at::Tensor& x, const at::Tensor& weight_t,
                        const std::optional<at::Tensor>& bias, int64_t keep_k) {
  check_common(x, weight_t, bias, /*several_tokens=*/true);
  TORCH_CHECK(keep_k >= 0 && keep_k <= weight_t.size(0), "keep_k=", keep_k,
              " out of range [0, ", weight_t.size(0), "]");
  switch (x.scalar_type()) {
    case at::kFloat: return topk_gemv_impl<float>(x, weight_t, bias, keep_k);
    case at::kBFloat16: return topk_gemv_impl<bf16_t>(x, weight_t, bias, keep_k);
    default: return topk_gemv_impl<half_bits>(x, weight_t, bias, keep_k);
  }
}

// y = sum over i in `indices` of x_i * weight_t[i, :] (+ bias). indices: int64,
// 1-D, each in [0, in); ascending order is fastest (not required).
at::Tensor index_gemv(const at::Tensor& x, const at::Tensor& indices,
                         const at::Tensor& weight_t, const std::optional<at::Tensor>& bias) {
  check_common(x, weight_t, bias);
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.device().is_cpu(),
              "indices must be a 1-D int64 CPU tensor");
  const int64_t n = weight_t.size(0), out = weight_t.size(1);
  at::Tensor ic = indices.contiguous();
  const int64_t K = ic.numel();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t s = 0; s < K; ++s)
    TORCH_CHECK(ip[s] >= 0 && ip[s] < n, "index ", ip[s], " out of range [0, ", n, ")");
  at::Tensor xc = x.contiguous();
  std::vector<float> xs(static_cast<size_t>(std::max<int64_t>(K, 1)));
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  switch (x.scalar_type()) {
    case at::kFloat: {
      const float* xp = xc.data_ptr<float>();
      for (int64_t s = 0; s < K; ++s) xs[s] = xp[ip[s]];
      run_gemv<float>(weight_t, bias, ip, xs.data(), K, y);
      break;
    }
    case at::kBFloat16: {
      const bf16_t* xp = reinterpret_cast<const bf16_t*>(xc.data_ptr());
      for (int64_t s = 0; s < K; ++s) xs[s] = to_f32(xp[ip[s]]);
      run_gemv<bf16_t>(weight_t, bias, ip, xs.data(), K, y);
      break;
    }
    default: {
      const half_bits* xp = reinterpret_cast<const half_bits*>(xc.data_ptr());
      for (int64_t s = 0; s < K; ++s) xs[s] = to_f32(xp[ip[s]]);
      run_gemv<half_bits>(weight_t, bias, ip, xs.data(), K, y);
      break;
    }
  }
  return y;
}

// y = weight @ x (+ bias) for ONE token; weight: (out, in) row-major contiguous
// (an nn.Linear weight), x: in elements.  float32 accumulation.
at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "rotsparse dense_gemv (C++): tensors must be on the CPU");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous 2-D (out, in) tensor");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x dtype ", x.scalar_type(),
              " != weight dtype ", weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.numel() == in, "x has ", x.numel(), " elements (one token expected) but weight has in=",
              in);
  at::Tensor b32;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == out,
                "bias must be a CPU tensor of shape (", out, ",)");
    b32 = bias->to(at::kFloat).contiguous();
    bp = b32.data_ptr<float>();
  }
  at::Tensor x32 = x.reshape({in}).to(at::kFloat).contiguous();
  const float* xp = x32.data_ptr<float>();
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  switch (x.scalar_type()) {
    case at::kFloat:
      dense_gemv_rows<float>(weight.data_ptr<float>(), out, in, xp, bp, y.data_ptr<float>());
      break;
    case at::kBFloat16:
      dense_gemv_rows<bf16_t>(reinterpret_cast<const bf16_t*>(weight.data_ptr()), out, in, xp, bp,
                              reinterpret_cast<bf16_t*>(y.data_ptr()));
      break;
    case at::kHalf:
      dense_gemv_rows<half_bits>(reinterpret_cast<const half_bits*>(weight.data_ptr()), out, in, xp,
                                 bp, reinterpret_cast<half_bits*>(y.data_ptr()));
      break;
    default: TORCH_CHECK(false, "unsupported dtype ", x.scalar_type(), " (float32, bfloat16, float16)");
  }
  return y;
}

// ------------------------- quantized Top-K GEMVs ----------------------------
void check_quantized(const at::Tensor& x, const at::Tensor& qweight_t, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, int64_t in, int64_t out, int64_t keep_k,
                     bool several_tokens = false) {
  TORCH_CHECK(x.device().is_cpu() && qweight_t.device().is_cpu() && scales.device().is_cpu(),
              "rotsparse quantized topk_gemv (C++): tensors must be on the CPU");
  TORCH_CHECK(qweight_t.dim() == 2 && qweight_t.is_contiguous(),
              "qweight_t must be a contiguous 2-D (in, ...) tensor");
  TORCH_CHECK(scales.is_contiguous(), "scales must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "unsupported dtype ", x.scalar_type(), " (float32, bfloat16, float16)");
  check_tokens(x, in, several_tokens);
  TORCH_CHECK(keep_k >= 0 && keep_k <= in, "keep_k=", keep_k, " out of range [0, ", in, "]");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == out,
                "bias must be a CPU tensor of shape (", out, ",)");
}

// x (one token) -> exactly keep_k kept channels (ascending) and their values as float.
struct Selection {
  std::vector<int64_t> idx;
  std::vector<float> xs;
  int64_t K = 0;
};

Selection select_token(const at::Tensor& x, int64_t keep_k) {
  Selection sel;
  sel.idx.resize(static_cast<size_t>(keep_k + 1));  // +1: see select_topk
  sel.xs.resize(sel.idx.size());
  const at::Tensor xc = x.contiguous();
  const int64_t n = x.numel();
  switch (x.scalar_type()) {
    case at::kFloat:
      sel.K = select_topk<float>(xc.data_ptr<float>(), n, keep_k, sel.idx.data(), sel.xs.data());
      break;
    case at::kBFloat16:
      sel.K = select_topk<bf16_t>(reinterpret_cast<const bf16_t*>(xc.data_ptr()), n, keep_k,
                                  sel.idx.data(), sel.xs.data());
      break;
    default:
      sel.K = select_topk<half_bits>(reinterpret_cast<const half_bits*>(xc.data_ptr()), n, keep_k,
                                     sel.idx.data(), sel.xs.data());
  }
  return sel;
}

const float* float_bias(const std::optional<at::Tensor>& bias, at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  holder = bias->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

template <typename Run>
void dispatch_output(at::Tensor& y, const Run& run) {
  switch (y.scalar_type()) {
    case at::kFloat: run(y.data_ptr<float>()); break;
    case at::kBFloat16: run(reinterpret_cast<bf16_t*>(y.data_ptr())); break;
    default: run(reinterpret_cast<half_bits*>(y.data_ptr()));
  }
}

// y = scale * sum over the keep_k largest |x_i| of x_i * q[i, :] (+ bias), per token of x (..., in);
// q (in, out) int8, scale (out,) float32.  keep_k = in is the dense int8 GEMV.
at::Tensor topk_gemv_int8(const at::Tensor& x, const at::Tensor& qweight_t, const at::Tensor& scale,
                          const std::optional<at::Tensor>& bias, int64_t keep_k) {
  TORCH_CHECK(qweight_t.scalar_type() == at::kChar, "int8 qweight_t must be int8, got ",
              qweight_t.scalar_type());
  TORCH_CHECK(qweight_t.dim() == 2, "qweight_t must be 2-D (in, out)");
  const int64_t in = qweight_t.size(0), out = qweight_t.size(1);
  check_quantized(x, qweight_t, scale, bias, in, out, keep_k, /*several_tokens=*/true);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == out,
              "int8 scale must be float32 of shape (", out, ",)");
  at::Tensor holder;
  const float* bp = float_bias(bias, holder);
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  const int64_t tokens = in ? x.numel() / in : 0;
  if (tokens != 1) {  // several tokens: passes over the union of their kept rows (as topk_gemv)
    const at::Tensor xc = x.contiguous();
    const float* sp = scale.data_ptr<float>();
    dispatch_output(y, [&](auto* yp) {
      using Y = std::remove_pointer_t<decltype(yp)>;
      topk_gemm_tokens<Y, int8_t>(reinterpret_cast<const Y*>(xc.data_ptr()), tokens, in, keep_k,
                                  qweight_t.data_ptr<int8_t>(), out, [&](int64_t t, int64_t j, float v) {
                                    io<Y>::store(yp + t * out + j, bp ? v * sp[j] + bp[j] : v * sp[j]);
                                  });
    });
    return y;
  }
  Selection sel = select_token(x, keep_k);
  dispatch_output(y, [&](auto* yp) {
    gemv_rows_int8(qweight_t.data_ptr<int8_t>(), scale.data_ptr<float>(), out, sel.idx.data(),
                   sel.xs.data(), sel.K, bp, yp);
  });
  return y;
}

// y = sum over the keep_k largest |x_i| of x_i * scales[i / group, :] * (n[i, :] - 8) (+ bias);
// packed (in, out / 2) uint8 (layout above), scales (in / group, out) float16.
at::Tensor topk_gemv_int4(const at::Tensor& x, const at::Tensor& packed_t, const at::Tensor& scales,
                          const std::optional<at::Tensor>& bias, int64_t keep_k) {
  TORCH_CHECK(packed_t.scalar_type() == at::kByte, "int4 packed_t must be uint8, got ",
              packed_t.scalar_type());
  TORCH_CHECK(packed_t.dim() == 2 && scales.dim() == 2, "packed_t and scales must be 2-D");
  const int64_t in = packed_t.size(0), out = scales.size(1);
  check_quantized(x, packed_t, scales, bias, in, out, keep_k, /*several_tokens=*/true);
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "int4 scales must be float16");
  TORCH_CHECK(out % 2 == 0 && packed_t.size(1) * 2 == out, "packed_t has ", packed_t.size(1),
              " bytes per row; scales have ", out, " columns (even) needing ", out / 2);
  const int64_t groups = scales.size(0);
  TORCH_CHECK(groups > 0 && in % groups == 0, "scales have ", groups,
              " group rows, which does not divide in=", in);
  at::Tensor holder;
  const float* bp = float_bias(bias, holder);
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  const uint8_t* pp = packed_t.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const int64_t tokens = in ? x.numel() / in : 0;
  if (tokens != 1) {
    const at::Tensor xc = x.contiguous();
    dispatch_output(y, [&](auto* yp) {
      using Y = std::remove_pointer_t<decltype(yp)>;
      const Y* xp = reinterpret_cast<const Y*>(xc.data_ptr());
#if RS_INT4_VNNI  // passes over the union of several tokens' kept rows
      topk_gemm_tokens_int4<Y>(xp, tokens, in, keep_k, pp, sp, out, in / groups, [&](int64_t t, int64_t j, float v) {
        io<Y>::store(yp + t * out + j, bp ? v + bp[j] : v);
      });
#else  // token by token
      std::vector<int64_t> idx(static_cast<size_t>(keep_k + 1));  // +1: see select_topk
      std::vector<float> xs(idx.size());
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t K = select_topk<Y>(xp + t * in, in, keep_k, idx.data(), xs.data());
        gemv_rows_int4(pp, sp, out, in / groups, idx.data(), xs.data(), K, bp, yp + t * out);
      }
#endif
    });
    return y;
  }
  Selection sel = select_token(x, keep_k);
  dispatch_output(y, [&](auto* yp) {
    gemv_rows_int4(pp, sp, out, in / groups, sel.idx.data(), sel.xs.data(), sel.K, bp, yp);
  });
  return y;
}

// y = sum over the keep_k largest |x_i| of x_i * weight_t[i, :] + sum over the copy_k largest of the others of
// x_i * R[i, :] (+ bias; copy_k = in - keep_k: every other input); R: the residual copy (codes (in, groups * 64 * bits / 8) uint8,
// scales (in, groups) float16; layout at gemv_rows_residual).
at::Tensor topk_residual_gemv(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& codes,
                              const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                              int64_t keep_k, int64_t bits, int64_t copy_k) {
  check_common(x, weight_t, bias);
  const int64_t in = weight_t.size(0), out = weight_t.size(1);
  TORCH_CHECK(keep_k >= 0 && keep_k <= in, "keep_k=", keep_k, " out of range [0, ", in, "]");
  TORCH_CHECK(copy_k >= 0 && copy_k <= in - keep_k, "copy_k=", copy_k, " out of range [0, ", in - keep_k, "]");
  TORCH_CHECK(bits == 1 || bits == 2, "residual bits must be 1 or 2, got ", bits);
  const int64_t groups = (out + kResidualGroup - 1) / kResidualGroup;
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu(), "codes and scales must be on the CPU");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous() &&
                  codes.size(0) == in && codes.size(1) == groups * kResidualGroup * bits / 8,
              "residual codes must be contiguous uint8 of shape (", in, ", ",
              groups * kResidualGroup * bits / 8, ")");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 2 && scales.is_contiguous() &&
                  scales.size(0) == in && scales.size(1) == groups,
              "residual scales must be contiguous float16 of shape (", in, ", ", groups, ")");
  Selection sel = select_token(x, keep_k);
  // the kept rows (ascending), then the copy_k largest |x| of the others (ascending) with their values: the
  // keep_k + copy_k largest minus the keep_k largest (the same tie rule, so the first set holds the second)
  const Selection wide = select_token(x, keep_k + copy_k);
  std::vector<int64_t> rows(sel.idx.begin(), sel.idx.begin() + sel.K);
  std::vector<float> vals(sel.xs.begin(), sel.xs.begin() + sel.K);
  rows.reserve(static_cast<size_t>(wide.K));
  vals.reserve(static_cast<size_t>(wide.K));
  for (int64_t s = 0, k = 0; s < wide.K; ++s) {
    if (k < sel.K && sel.idx[k] == wide.idx[s]) {
      ++k;
      continue;
    }
    rows.push_back(wide.idx[s]);
    vals.push_back(wide.xs[s]);
  }
  at::Tensor holder;
  const float* bp = float_bias(bias, holder);
  at::Tensor y = at::empty(out_shape(x, out), x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const int64_t ldc = codes.size(1);
  switch (x.scalar_type()) {
    case at::kFloat:
      gemv_rows_residual<float>(weight_t.data_ptr<float>(), cp, ldc, sp, groups, int(bits), out,
                                rows.data(), vals.data(), sel.K, wide.K, bp, y.data_ptr<float>());
      break;
    case at::kBFloat16:
      gemv_rows_residual<bf16_t>(reinterpret_cast<const bf16_t*>(weight_t.data_ptr()), cp, ldc, sp, groups,
                                 int(bits), out, rows.data(), vals.data(), sel.K, wide.K, bp,
                                 reinterpret_cast<bf16_t*>(y.data_ptr()));
      break;
    default:
      gemv_rows_residual<half_bits>(reinterpret_cast<const half_bits*>(weight_t.data_ptr()), cp, ldc, sp,
                                    groups, int(bits), out, rows.data(), vals.data(), sel.K, wide.K, bp,
                                    reinterpret_cast<half_bits*>(y.data_ptr()));
  }
  return y;
}

// Sorted indices (int64) of the keep_k largest |x|, x: one token.
at::Tensor topk_indices(const at::Tensor& x, int64_t keep_k) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
  const int64_t n = x.numel();
  TORCH_CHECK(keep_k >= 0 && keep_k <= n, "keep_k=", keep_k, " out of range [0, ", n, "]");
  at::Tensor xc = x.contiguous();
  // one spare slot for select_topk's branch-free emission
  at::Tensor idx = at::empty({keep_k + 1}, x.options().dtype(at::kLong));
  std::vector<float> vals(static_cast<size_t>(keep_k + 1));
  int64_t* ip = idx.data_ptr<int64_t>();
  switch (x.scalar_type()) {
    case at::kFloat:
      select_topk<float>(xc.data_ptr<float>(), n, keep_k, ip, vals.data());
      break;
    case at::kBFloat16:
      select_topk<bf16_t>(reinterpret_cast<const bf16_t*>(xc.data_ptr()), n, keep_k, ip,
                          vals.data());
      break;
    case at::kHalf:
      select_topk<half_bits>(reinterpret_cast<const half_bits*>(xc.data_ptr()), n, keep_k, ip,
                             vals.data());
      break;
    default: TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
  return idx.narrow(0, 0, keep_k);
}

bool has_avx512() { return RS_AVX512 != 0; }

#ifndef RS_NS
#define RS_NS rotsparse_cpp
#endif
#define RS_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
RS_TORCH_LIBRARY(RS_NS, m) {
  m.def("topk_gemv(Tensor x, Tensor weight_t, Tensor? bias, int keep_k) -> Tensor", &topk_gemv);
  m.def("index_gemv(Tensor x, Tensor indices, Tensor weight_t, Tensor? bias) -> Tensor",
        &index_gemv);
  m.def("topk_indices(Tensor x, int keep_k) -> Tensor", &topk_indices);
  m.def("dense_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &dense_gemv);
  m.def("topk_gemv_int8(Tensor x, Tensor qweight_t, Tensor scale, Tensor? bias, int keep_k) -> Tensor",
        &topk_gemv_int8);
  m.def("topk_gemv_int4(Tensor x, Tensor packed_t, Tensor scales, Tensor? bias, int keep_k) -> Tensor",
        &topk_gemv_int4);
  m.def("topk_residual_gemv(Tensor x, Tensor weight_t, Tensor codes, Tensor scales, Tensor? bias, int keep_k, "
        "int bits, int copy_k) -> Tensor",
        &topk_residual_gemv);
  m.def("has_avx512() -> bool", &has_avx512);
}
