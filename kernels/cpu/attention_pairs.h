// Few-row (decode) micro-kernels for bfloat16 caches on AVX-512: a bf16 is the high half of a
// float, so 32 keys' elements widen with one shift (the even elements) and one mask (the odd
// ones) instead of a widening per 16. The query and the accumulator are kept in the same
// even/odd order per 32 elements ("paired"), so dot products and the PV sums are unchanged;
// rows are put back in order once, before they are written (unpair_row).

#pragma once

#include <c10/util/BFloat16.h>

#include "attention_micro.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace xyserve_cpu {

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kHavePairs = true;

inline void bf16_pairs(const c10::BFloat16* p, __m512& even, __m512& odd) {
  const __m512i x = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// S[m * lds + t] = dot(Q[m], K[t]) with Q's rows paired; D a multiple of 32.
inline void qk_pairs(const float* Q, int M, int D, const c10::BFloat16* K, int64_t ldk, int n,
                     float* S, int lds) {
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    const float* q0 = Q + (int64_t)m * D;
    const float* q1 = q0 + D;
    const float* q2 = q1 + D;
    const float* q3 = q2 + D;
    for (int t = 0; t < n; ++t) {
      const c10::BFloat16* k = K + t * ldk;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 32) {
        __m512 e, o;
        bf16_pairs(k + d, e, o);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), e, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + d), e, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2 + d), e, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3 + d), e, a3);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d + 16), o, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + d + 16), o, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2 + d + 16), o, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3 + d + 16), o, a3);
      }
      hsum4_store(a0, a1, a2, a3, S + (int64_t)m * lds + t, lds);
    }
  }
  for (; m < M; ++m) {
    const float* q0 = Q + (int64_t)m * D;
    for (int t = 0; t < n; ++t) {
      const c10::BFloat16* k = K + t * ldk;
      __m512 a0 = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 32) {
        __m512 e, o;
        bf16_pairs(k + d, e, o);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), e, a0);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d + 16), o, a0);
      }
      S[(int64_t)m * lds + t] = _mm512_reduce_add_ps(a0);
    }
  }
}

// O[m] += sum_t P[m][t] * V[t] for R rows from m0, NB blocks of 32 from d0, O paired.
template <int R, int NB>
inline void pv_pairs_block(const float* P, int pr, int pt, int m0, int n, const c10::BFloat16* V,
                           int64_t ldv, int d0, float* O, int Dv) {
  __m512 acc[R][2 * NB];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 2 * NB; ++j) acc[i][j] = _mm512_loadu_ps(O + (int64_t)(m0 + i) * Dv + d0 + 16 * j);
  for (int t = 0; t < n; ++t) {
    __m512 e[NB], o[NB];
    for (int b = 0; b < NB; ++b) bf16_pairs(V + t * ldv + d0 + 32 * b, e[b], o[b]);
    for (int i = 0; i < R; ++i) {
      const __m512 p = _mm512_set1_ps(P[(int64_t)(m0 + i) * pr + (int64_t)t * pt]);
      for (int b = 0; b < NB; ++b) {
        acc[i][2 * b] = _mm512_fmadd_ps(p, e[b], acc[i][2 * b]);
        acc[i][2 * b + 1] = _mm512_fmadd_ps(p, o[b], acc[i][2 * b + 1]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 2 * NB; ++j) _mm512_storeu_ps(O + (int64_t)(m0 + i) * Dv + d0 + 16 * j, acc[i][j]);
}

template <int NB>
inline void pv_pairs_rows(const float* P, int pr, int pt, int M, int n, const c10::BFloat16* V,
                          int64_t ldv, int d0, float* O, int Dv) {
  int m = 0;
  for (; m + 4 <= M; m += 4) pv_pairs_block<4, NB>(P, pr, pt, m, n, V, ldv, d0, O, Dv);
  for (; m < M; ++m) pv_pairs_block<1, NB>(P, pr, pt, m, n, V, ldv, d0, O, Dv);
}

// O[M][Dv] (paired) += P . V[n][Dv], P[m][t] at P[m * pr + t * pt]; Dv a multiple of 32.
inline void pv_pairs(const float* P, int pr, int pt, int M, int n, const c10::BFloat16* V,
                     int64_t ldv, int Dv, float* O) {
  int d = 0;
  for (; d + 64 <= Dv; d += 64) pv_pairs_rows<2>(P, pr, pt, M, n, V, ldv, d, O, Dv);
  if (d < Dv) pv_pairs_rows<1>(P, pr, pt, M, n, V, ldv, d, O, Dv);
}
#else
constexpr bool kHavePairs = false;
#endif

// Paired order -> element order, per 32: [even 16 | odd 16] -> [e0 o0 e1 o1 ...]. In place.
inline void unpair_row(float* o, int Dv) {
  float tmp[32];
  for (int d = 0; d < Dv; d += 32) {
    for (int j = 0; j < 16; ++j) {
      tmp[2 * j] = o[d + j];
      tmp[2 * j + 1] = o[d + 16 + j];
    }
    std::copy(tmp, tmp + 32, o + d);
  }
}

// Element order -> paired order of a query row (scaled), from any element type.
template <typename T>
inline void pair_row(const T* src, float scale, float* dst, int D) {
  for (int d = 0; d < D; d += 32) {
    for (int j = 0; j < 16; ++j) {
      dst[d + j] = static_cast<float>(src[d + 2 * j]) * scale;
      dst[d + 16 + j] = static_cast<float>(src[d + 2 * j + 1]) * scale;
    }
  }
}

}  // namespace xyserve_cpu
