// QK for bfloat16 caches on CPUs with AVX512-BF16 (vdpbf16ps: 32 bf16 products summed into 16
// fp32 lanes per instruction): keys are read in place and never widened. Products of two bf16
// are exact in fp32, so the scores keep fp32 accuracy; the softmax scale is applied to them in
// fp32 (the query stays as given, unscaled, in bf16). PV stays in fp32 (attention_pairs.h).

#pragma once

#include <c10/util/BFloat16.h>

#include <cstring>

#include "attention_micro.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(XYSERVE_AVX512_BF16)
#include <immintrin.h>
#endif

namespace xyserve_cpu {

#if defined(CPU_CAPABILITY_AVX512) && defined(XYSERVE_AVX512_BF16)
constexpr bool kHaveDpbf16 = true;

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// Few rows: S[m * lds + t] = scale * dot(Q[m], K[t]); Q [M][D] bf16 as given; D % 32 == 0.
// Blocks of 4 rows × 4 keys keep 16 sums in registers and reduce them together (hsum16): at
// head size 64 the reduction, not the dot product, is most of the work.
inline void qk_dp_rows(const c10::BFloat16* Q, int M, int D, const c10::BFloat16* K, int64_t ldk,
                       int n, float scale, float* S, int lds) {
  const __m512 vs = _mm512_set1_ps(scale);
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    const c10::BFloat16* q0 = Q + (int64_t)m * D;
    int t = 0;
    for (; t + 4 <= n; t += 4) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 32) {
        __m512i kv[4];
        for (int i = 0; i < 4; ++i) kv[i] = _mm512_loadu_si512(K + (t + i) * ldk + d);
        for (int j = 0; j < 4; ++j) {
          const __m512i qv = _mm512_loadu_si512(q0 + (int64_t)j * D + d);
          for (int i = 0; i < 4; ++i) acc[4 * j + i] = dp(acc[4 * j + i], qv, kv[i]);
        }
      }
      const __m512 sums = _mm512_mul_ps(hsum16(acc), vs);  // lane 4 j + i: row j, key t + i
      _mm_storeu_ps(S + (int64_t)m * lds + t, _mm512_castps512_ps128(sums));
      _mm_storeu_ps(S + (int64_t)(m + 1) * lds + t, _mm512_extractf32x4_ps(sums, 1));
      _mm_storeu_ps(S + (int64_t)(m + 2) * lds + t, _mm512_extractf32x4_ps(sums, 2));
      _mm_storeu_ps(S + (int64_t)(m + 3) * lds + t, _mm512_extractf32x4_ps(sums, 3));
    }
    for (; t < n; ++t) {
      const c10::BFloat16* k = K + t * ldk;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int d = 0; d < D; d += 32) {
        const __m512i kv = _mm512_loadu_si512(k + d);
        a0 = dp(a0, _mm512_loadu_si512(q0 + d), kv);
        a1 = dp(a1, _mm512_loadu_si512(q0 + D + d), kv);
        a2 = dp(a2, _mm512_loadu_si512(q0 + 2 * D + d), kv);
        a3 = dp(a3, _mm512_loadu_si512(q0 + 3 * D + d), kv);
      }
      hsum4_store(_mm512_mul_ps(a0, vs), _mm512_mul_ps(a1, vs), _mm512_mul_ps(a2, vs),
                  _mm512_mul_ps(a3, vs), S + (int64_t)m * lds + t, lds);
    }
  }
  for (; m < M; ++m) {
    const c10::BFloat16* q0 = Q + (int64_t)m * D;
    for (int t = 0; t < n; ++t) {
      const c10::BFloat16* k = K + t * ldk;
      __m512 a0 = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 32) a0 = dp(a0, _mm512_loadu_si512(q0 + d), _mm512_loadu_si512(k + d));
      S[(int64_t)m * lds + t] = scale * _mm512_reduce_add_ps(a0);
    }
  }
}

// Many rows: St[t][r] = scale * dot(Q[r], K[t]) with Qp the query block transposed into pairs,
// [D / 2][Rp][2] bf16 (padding rows zero), so one broadcast of a key's pair of elements meets
// 16 rows' pairs per instruction. TB keys, NJ vectors of 16 rows at a time.
template <int TB, int NJ>
inline void qk_dp_cols_block(const c10::BFloat16* Qp, int Rp, int D, const c10::BFloat16* K,
                             int64_t ldk, int t0, float scale, float* St) {
  __m512 acc[TB][NJ];
  for (int i = 0; i < TB; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int p = 0; p < D / 2; ++p) {
    __m512i qv[NJ];
    for (int j = 0; j < NJ; ++j) qv[j] = _mm512_loadu_si512(Qp + ((int64_t)p * Rp + 16 * j) * 2);
    for (int i = 0; i < TB; ++i) {
      int32_t pair;
      std::memcpy(&pair, K + (t0 + i) * ldk + 2 * p, sizeof(pair));
      const __m512i kb = _mm512_set1_epi32(pair);
      for (int j = 0; j < NJ; ++j) acc[i][j] = dp(acc[i][j], kb, qv[j]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < TB; ++i)
    for (int j = 0; j < NJ; ++j)
      _mm512_storeu_ps(St + (int64_t)(t0 + i) * Rp + 16 * j, _mm512_mul_ps(acc[i][j], vs));
}

template <int NJ>
inline void qk_dp_cols_n(const c10::BFloat16* Qp, int D, const c10::BFloat16* K, int64_t ldk,
                         int n, float scale, float* St) {
  constexpr int Rp = NJ * 16;
  int t = 0;
  for (; t + 4 <= n; t += 4) qk_dp_cols_block<4, NJ>(Qp, Rp, D, K, ldk, t, scale, St);
  for (; t < n; ++t) qk_dp_cols_block<1, NJ>(Qp, Rp, D, K, ldk, t, scale, St);
}

inline void qk_dp_cols(const c10::BFloat16* Qp, int Rp, int D, const c10::BFloat16* K,
                       int64_t ldk, int n, float scale, float* St) {
  switch (Rp / 16) {
    case 1: qk_dp_cols_n<1>(Qp, D, K, ldk, n, scale, St); break;
    case 2: qk_dp_cols_n<2>(Qp, D, K, ldk, n, scale, St); break;
    case 3: qk_dp_cols_n<3>(Qp, D, K, ldk, n, scale, St); break;
    default: qk_dp_cols_n<4>(Qp, D, K, ldk, n, scale, St); break;
  }
}
#else
constexpr bool kHaveDpbf16 = false;
#endif

}  // namespace xyserve_cpu
