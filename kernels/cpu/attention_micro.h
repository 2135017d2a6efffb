// Micro-kernels of the CPU provider's attention (attention.cpp): QK, online softmax and PV on
// one span of keys for a block of query rows, in fp32 on torch's portable vectors (at::vec).
// Two score layouts: row-major [rows][kSpan] for few rows (decode: dot products, K read in
// place), token-major [keys][rows] for many (prefill: broadcasts of K against vectors of rows).

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace xyserve_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int kVL = Vec::size();
// Keys per inner step: S of a span ([rows][kSpan] fp32) stays in L1/L2 next to the tile.
constexpr int kSpan = 128;
// Rows per block of a task (four vectors of rows in the many-row kernels).
constexpr int kRowBlock = 4 * kVL;
// Up to this many rows a task reads K and V in place row by row (decode, GQA groups); more
// rows (prefill) take the token-major kernels.
constexpr int kFewRows = 8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Task table columns (tasks.py writes the same order).
enum TaskCol { kRow, kQ0, kQTile, kK0, kK1, kHead, kPart, kTaskCols = 8 };
enum MergeCol { kMRow, kMQ0, kMQTile, kMHead, kMFirst, kMCount, kMergeCols = 6 };

template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// The sums of four vectors, stored at s[0], s[ld], s[2 ld], s[3 ld].
inline void hsum4_store(const Vec& a, const Vec& b, const Vec& c, const Vec& d, float* s,
                        int64_t ld) {
#if defined(CPU_CAPABILITY_AVX512)
  // Pairwise within 128-bit lanes, then across lanes: 13 operations for four sums.
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
  u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0x4E));
  u = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, 0xB1));
  alignas(16) float r[4];
  _mm_store_ps(r, _mm512_castps512_ps128(u));
  s[0] = r[0];
  s[ld] = r[1];
  s[2 * ld] = r[2];
  s[3 * ld] = r[3];
#else
  s[0] = hsum(a);
  s[ld] = hsum(b);
  s[2 * ld] = hsum(c);
  s[3 * ld] = hsum(d);
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen sums at once: lane 4 * j + i of the result is the sum of v[4 * j + i]'s lanes. Pairs
// within 128-bit lanes, then the lanes themselves: 45 operations for 16 sums, where
// hsum4_store takes 13 (and four scalar stores) for 4.
inline __m512 hsum16(const __m512 (&v)[16]) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j)
    y[j] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0xEE));
  // y[j]'s four 128-bit lanes each hold partial sums of v[4j .. 4j + 3]: add the lanes.
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88),
                                   _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88),
                                   _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

#endif

// S[m * lds + t] = dot(Q[m], K[t]) for m < M, t < n; K rows ldk elements apart. On AVX-512,
// blocks of 4 rows × 4 keys reduce their 16 sums together (hsum16).
template <typename T>
void qk(const float* Q, int M, int D, const T* K, int64_t ldk, int n, float* S, int lds) {
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    const float* q0 = Q + (int64_t)m * D;
    const float* q1 = q0 + D;
    const float* q2 = q1 + D;
    const float* q3 = q2 + D;
    int t = 0;
#if defined(CPU_CAPABILITY_AVX512)
    for (; t + 4 <= n; t += 4) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int d = 0; d < D; d += kVL) {
        __m512 kv[4];
        for (int i = 0; i < 4; ++i) kv[i] = load_f(K + (t + i) * ldk + d);
        for (int j = 0; j < 4; ++j) {
          const __m512 qv = _mm512_loadu_ps(q0 + (int64_t)j * D + d);
          for (int i = 0; i < 4; ++i) acc[4 * j + i] = _mm512_fmadd_ps(qv, kv[i], acc[4 * j + i]);
        }
      }
      const __m512 sums = hsum16(acc);  // lane 4 j + i: row m + j, key t + i
      _mm_storeu_ps(S + (int64_t)m * lds + t, _mm512_castps512_ps128(sums));
      _mm_storeu_ps(S + (int64_t)(m + 1) * lds + t, _mm512_extractf32x4_ps(sums, 1));
      _mm_storeu_ps(S + (int64_t)(m + 2) * lds + t, _mm512_extractf32x4_ps(sums, 2));
      _mm_storeu_ps(S + (int64_t)(m + 3) * lds + t, _mm512_extractf32x4_ps(sums, 3));
    }
#endif
    for (; t < n; ++t) {
      const T* k = K + t * ldk;
      Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
      for (int d = 0; d < D; d += kVL) {
        Vec kv = load_f(k + d);
        a0 = at::vec::fmadd(Vec::loadu(q0 + d), kv, a0);
        a1 = at::vec::fmadd(Vec::loadu(q1 + d), kv, a1);
        a2 = at::vec::fmadd(Vec::loadu(q2 + d), kv, a2);
        a3 = at::vec::fmadd(Vec::loadu(q3 + d), kv, a3);
      }
      hsum4_store(a0, a1, a2, a3, S + (int64_t)m * lds + t, lds);
    }
  }
  for (; m < M; ++m) {
    const float* q0 = Q + (int64_t)m * D;
    for (int t = 0; t < n; ++t) {
      const T* k = K + t * ldk;
      Vec a0(0.f);
      for (int d = 0; d < D; d += kVL) {
        a0 = at::vec::fmadd(Vec::loadu(q0 + d), load_f(k + d), a0);
      }
      S[(int64_t)m * lds + t] = hsum(a0);
    }
  }
}

// Many rows (prefill): St[t][r] = sum_d K[t][d] * Qt[d][r] with the scores token-major, so QK
// is broadcasts of one key element against vectors of query rows (no horizontal sums, K read
// in place) and the softmax runs across rows in vectors. NJ vectors of rows, TB keys at a time.
template <int TB, int NJ>
inline void qk_cols_block(const float* Qt, int ldq, int D, const float* K, int64_t ldk, int t0,
                          float* St, int lds) {
  Vec acc[TB][NJ];
  for (int i = 0; i < TB; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = Vec(0.f);
  for (int d = 0; d < D; ++d) {
    Vec qv[NJ];
    for (int j = 0; j < NJ; ++j) qv[j] = Vec::loadu(Qt + (int64_t)d * ldq + j * kVL);
    for (int i = 0; i < TB; ++i) {
      const Vec kb(K[(t0 + i) * ldk + d]);
      for (int j = 0; j < NJ; ++j) acc[i][j] = at::vec::fmadd(kb, qv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < TB; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j].store(St + (int64_t)(t0 + i) * lds + j * kVL);
}

template <int NJ>
inline void qk_cols_n(const float* Qt, int D, const float* K, int64_t ldk, int n, float* St) {
  constexpr int ld = NJ * kVL;
  int t = 0;
  for (; t + 4 <= n; t += 4) qk_cols_block<4, NJ>(Qt, ld, D, K, ldk, t, St, ld);
  for (; t < n; ++t) qk_cols_block<1, NJ>(Qt, ld, D, K, ldk, t, St, ld);
}

// Rp = NJ * kVL rows (a multiple of the vector width, at most 4 vectors).
void qk_cols(const float* Qt, int Rp, int D, const float* K, int64_t ldk, int n, float* St) {
  switch (Rp / kVL) {
    case 1: qk_cols_n<1>(Qt, D, K, ldk, n, St); break;
    case 2: qk_cols_n<2>(Qt, D, K, ldk, n, St); break;
    case 3: qk_cols_n<3>(Qt, D, K, ldk, n, St); break;
    default: qk_cols_n<4>(Qt, D, K, ldk, n, St); break;
  }
}

// Online softmax of St [n][Rp] per row (column), in vectors of rows. alpha[r]: the factor row
// r's accumulator must be rescaled by.
void softmax_cols(float* St, int n, int Rp, float* m_run, float* l_run, float* alpha) {
  for (int j = 0; j < Rp; j += kVL) {
    Vec mx(kNegInf);
    for (int t = 0; t < n; ++t) mx = at::vec::maximum(mx, Vec::loadu(St + (int64_t)t * Rp + j));
    const Vec mo = Vec::loadu(m_run + j);
    const Vec mn = at::vec::maximum(mo, mx);
    // Rows that have seen no key yet and see none here subtract 0, not -inf (no NaN).
    const Vec mu = Vec::blendv(mn, Vec(0.f), mn == Vec(kNegInf));
    Vec sum(0.f);
    for (int t = 0; t < n; ++t) {
      float* p = St + (int64_t)t * Rp + j;
      const Vec e = (Vec::loadu(p) - mu).exp_u20();
      e.store(p);
      sum = sum + e;
    }
    const Vec al = (mo - mu).exp_u20();
    (Vec::loadu(l_run + j) * al + sum).store(l_run + j);
    mn.store(m_run + j);
    al.store(alpha + j);
  }
}

// O[m][d0 : d0 + NV * kVL] += sum_t P[m][t] * V[t][d0 : ...] for rows [m0, m0 + R).
template <typename T, int R, int NV>
inline void pv_block(const float* P, int pr, int pt, int m0, int n, const T* V, int64_t ldv,
                     int d0, float* O, int Dv) {
  Vec acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec::loadu(O + (int64_t)(m0 + i) * Dv + d0 + j * kVL);
  for (int t = 0; t < n; ++t) {
    const T* v = V + t * ldv + d0;
    Vec vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = load_f(v + j * kVL);
    for (int i = 0; i < R; ++i) {
      Vec p(P[(int64_t)(m0 + i) * pr + (int64_t)t * pt]);
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(p, vv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j].store(O + (int64_t)(m0 + i) * Dv + d0 + j * kVL);
}

template <typename T, int NV>
inline void pv_rows(const float* P, int pr, int pt, int M, int n, const T* V, int64_t ldv, int d0,
                    float* O, int Dv) {
  int m = 0;
  for (; m + 4 <= M; m += 4) pv_block<T, 4, NV>(P, pr, pt, m, n, V, ldv, d0, O, Dv);
  for (; m < M; ++m) pv_block<T, 1, NV>(P, pr, pt, m, n, V, ldv, d0, O, Dv);
}

// O[M][Dv] += P . V[n][Dv], P[m][t] at P[m * pr + t * pt]; V rows ldv elements apart.
template <typename T>
void pv(const float* P, int pr, int pt, int M, int n, const T* V, int64_t ldv, int Dv, float* O) {
  int d = 0;
  for (; d + 4 * kVL <= Dv; d += 4 * kVL) pv_rows<T, 4>(P, pr, pt, M, n, V, ldv, d, O, Dv);
  switch ((Dv - d) / kVL) {
    case 3: pv_rows<T, 3>(P, pr, pt, M, n, V, ldv, d, O, Dv); break;
    case 2: pv_rows<T, 2>(P, pr, pt, M, n, V, ldv, d, O, Dv); break;
    case 1: pv_rows<T, 1>(P, pr, pt, M, n, V, ldv, d, O, Dv); break;
    default: break;
  }
}

// One row's online-softmax step over a span of n scores (in place: scores become P). Returns
// false when the row sees none of the span (its P row is zeroed, its state untouched).
inline bool softmax_step(float* s, int n, float& m_run, float& l_run, float* o, int Dv) {
  Vec vmax(kNegInf);
  int t = 0;
  for (; t + kVL <= n; t += kVL) vmax = at::vec::maximum(vmax, Vec::loadu(s + t));
  if (t < n) vmax = at::vec::maximum(vmax, Vec::set(Vec(kNegInf), Vec::loadu(s + t, n - t), n - t));
  float mx = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  if (mx == kNegInf) {
    std::fill(s, s + n, 0.f);
    return false;
  }
  const float m_new = std::max(m_run, mx);
  const Vec vm(m_new);
  Vec vsum(0.f);
  t = 0;
  for (; t + kVL <= n; t += kVL) {
    Vec e = (Vec::loadu(s + t) - vm).exp_u20();
    e.store(s + t);
    vsum = vsum + e;
  }
  if (t < n) {
    Vec e = Vec::set(Vec(0.f), (Vec::loadu(s + t, n - t) - vm).exp_u20(), n - t);
    e.store(s + t, n - t);
    vsum = vsum + e;
  }
  const float sum = hsum(vsum);
  if (m_run == kNegInf) {  // first keys this row sees: nothing to rescale
    l_run = sum;
  } else {
    const float alpha = std::exp(m_run - m_new);
    l_run = l_run * alpha + sum;
    if (alpha != 1.f) {
      const Vec va(alpha);
      for (int d = 0; d < Dv; d += kVL) (Vec::loadu(o + d) * va).store(o + d);
    }
  }
  m_run = m_new;
  return true;
}

template <typename T>
inline void store_row(const float* o, float inv, T* dst, int Dv) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec vi(inv);
    for (int d = 0; d < Dv; d += kVL) (Vec::loadu(o + d) * vi).store(dst + d);
  } else {
    alignas(64) float tmp[kVL];
    const Vec vi(inv);
    for (int d = 0; d < Dv; d += kVL) {
      (Vec::loadu(o + d) * vi).store(tmp);
      at::vec::convert(tmp, dst + d, kVL);
    }
  }
}

}  // namespace xyserve_cpu
