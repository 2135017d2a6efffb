// The CPU provider's meta-attention kernel: one call runs a step's task table over a paged KV
// cache read in place through its block table (no gather copy), over torch's thread pool.
//
// A task is (query tile of one row) x (key chunk) x (KV head). Its rows are the tile's tokens
// times the query heads of that KV head, token-major (row m = token i * G + head g), so every key
// of the chunk is read once for the whole GQA group. Keys are walked page by page (at most kSpan
// at a time); each span is QK -> mask -> online softmax (fp32) -> PV into an fp32 accumulator.
// A query tile whose keys were split into several chunks writes fp32 partials (O, max, sum); a
// second pass merges them by log-sum-exp. The output is rounded once, at the end.
//
// Tasks come from the host's plan (kernels/attention_plan.py, converted by tasks.py) in its
// heaviest-first order; threads pull them from a shared counter, so a slow core never holds a
// static share. Each output element is made by the same operations in the same order whatever
// the thread count: results are bitwise identical for any number of threads.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_micro.h"
#include "attention_dpbf16.h"
#include "attention_pairs.h"
#include "mask_rows.h"

namespace {

using namespace xyserve_cpu;

// Per-thread scratch, grown as needed and kept: no allocation per call.
struct Scratch {
  std::vector<float> q, s, o, m, l, k, v, alpha;
};
thread_local Scratch tls;

inline float* grow(std::vector<float>& buf, int64_t n) {
  if ((int64_t)buf.size() < n) buf.resize(n);
  return buf.data();
}

struct Step {
  // tensors' data and strides (elements)
  const void* q;
  int64_t qs0, qs1;
  const void* k;
  int64_t ks0, ks1, ks2;
  const void* v;
  int64_t vs0, vs1, vs2;
  void* out;
  int64_t os0, os1;
  const void* bt;
  bool bt32;
  int64_t bts0, bts1, num_blocks;
  const int32_t* q_start;
  const int32_t* q_len;
  const int32_t* kv_len;
  const int32_t* k_start;  // null: every row's keys start at slot 0 of its block table
  int D, Dv, G, bs;
  float scale;
  bool causal;
  int64_t window;  // <= 0: none
  const int64_t* tree;  // null: no tree rows; else each query token's ancestor bits (-1: all)
  float* part_o;
  float* part_m;
  float* part_l;
  int64_t part_rows;
};

inline int64_t block_id(const Step& s, int64_t row, int64_t j) {
  const int64_t off = row * s.bts0 + j * s.bts1;
  return s.bt32 ? (int64_t) static_cast<const int32_t*>(s.bt)[off]
                : static_cast<const int64_t*>(s.bt)[off];
}

template <typename T>
void run_task(const Step& s, const int32_t* task, std::atomic<int64_t>& bad_block) {
  const int64_t row = task[kRow], q0 = task[kQ0], head = task[kHead], part = task[kPart];
  const int64_t qn = std::min<int64_t>(task[kQTile], s.q_len[row] - q0);
  const int64_t kvl = s.kv_len[row];
  const int64_t kpos0 = s.k_start != nullptr ? s.k_start[row] : 0;  // the row's key 0 in the table
  const int64_t offset = kvl - s.q_len[row];  // key position of the row's first query
  const int D = s.D, Dv = s.Dv, G = s.G;
  const int64_t M = std::max<int64_t>(qn, 0) * G;
  Scratch& sc = tls;
  float* Q = grow(sc.q, (int64_t)kRowBlock * D);
  float* S = grow(sc.s, (int64_t)kRowBlock * kSpan);  // either score layout fits
  float* O = grow(sc.o, (int64_t)kRowBlock * Dv);
  float* mrun = grow(sc.m, kRowBlock);
  float* lrun = grow(sc.l, kRowBlock);
  const T* qbase = static_cast<const T*>(s.q);
  const T* kbase = static_cast<const T*>(s.k) + head * s.ks2;
  const T* vbase = static_cast<const T*>(s.v) + head * s.vs2;
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int R = (int)std::min<int64_t>(kRowBlock, M - r0);
    const bool few = R <= kFewRows;
    constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
    const bool aligned = D % 32 == 0 && Dv % 32 == 0;
    // bf16 with AVX512-BF16: QK by vdpbf16ps on the cache in place, the query kept in bf16.
    const bool dpq = kHaveDpbf16 && bf16 && aligned;
    // bf16 on AVX-512: PV widens V in registers, the accumulator in paired order.
    const bool pairs = kHavePairs && bf16 && aligned && (few || dpq);
    const int Rp = (R + kVL - 1) / kVL * kVL;  // many rows: padded to whole vectors
    const Vec vscale(s.scale);
    auto* Qb = reinterpret_cast<c10::BFloat16*>(Q);  // the bf16 query of the dpq kernels
    // Query rows of this block: fp32 and scaled, Q [R][D] for few rows, Qt [D][Rp] for many;
    // with dpq, bf16 as given, Qb [R][D] for few rows, pairs [D / 2][Rp][2] for many. Padding
    // rows are zero: their scores are computed and never written.
    if (!few && dpq) std::fill(Qb, Qb + (int64_t)D * Rp, c10::BFloat16(0.f));
    if (!few && !dpq) std::fill(Q, Q + (int64_t)D * Rp, 0.f);
    for (int i = 0; i < R; ++i) {
      const int64_t m = r0 + i, tok = s.q_start[row] + q0 + m / G, h = head * G + m % G;
      const T* src = qbase + tok * s.qs0 + h * s.qs1;
      if (dpq && few) {
        std::memcpy(Qb + (int64_t)i * D, src, sizeof(T) * D);
      } else if (dpq) {
        for (int p = 0; p < D / 2; ++p) {
          std::memcpy(Qb + ((int64_t)p * Rp + i) * 2, src + 2 * p, 2 * sizeof(T));
        }
      } else if (pairs) {
        pair_row(src, s.scale, Q + (int64_t)i * D, D);
      } else if (few) {
        for (int d = 0; d < D; d += kVL) (load_f(src + d) * vscale).store(Q + (int64_t)i * D + d);
      } else {
        for (int d = 0; d < D; ++d) Q[(int64_t)d * Rp + i] = static_cast<float>(src[d]) * s.scale;
      }
    }
    std::fill(mrun, mrun + Rp, kNegInf);
    std::fill(lrun, lrun + Rp, 0.f);
    std::fill(O, O + (int64_t)R * Dv, 0.f);
    const int64_t first_pos = offset + q0 + r0 / G, last_pos = offset + q0 + (r0 + R - 1) / G;
    int64_t lo = task[kK0], hi = std::min<int64_t>(task[kK1], kvl);
    if (s.causal) hi = std::min(hi, last_pos + 1);
    if (s.window > 0) lo = std::max(lo, first_pos - s.window + 1);
    for (int64_t a = lo; a < hi;) {
      const int64_t page = (kpos0 + a) / s.bs;
      const int64_t b = std::min({hi, (page + 1) * s.bs - kpos0, a + kSpan});
      const int n = (int)(b - a);
      const int64_t blk = block_id(s, row, page);
      if (blk < 0 || blk >= s.num_blocks) {
        bad_block.store(row, std::memory_order_relaxed);
        return;
      }
      const int64_t slot = kpos0 + a - page * s.bs;
      const T* kp = kbase + blk * s.ks0 + slot * s.ks1;
      const T* vp = vbase + blk * s.vs0 + slot * s.vs1;
      // Scores: [R][kSpan] row-major for few rows, [n][Rp] token-major for many.
      const int pr = few ? kSpan : 1, pt = few ? 1 : Rp;
      const float* vsrc_f = nullptr;  // V widened to fp32 (many rows, half precision)
      if (dpq) {
#if defined(CPU_CAPABILITY_AVX512) && defined(XYSERVE_AVX512_BF16)
        if constexpr (bf16) {
          if (few) {
            qk_dp_rows(Qb, R, D, kp, s.ks1, n, s.scale, S, kSpan);
          } else {
            qk_dp_cols(Qb, Rp, D, kp, s.ks1, n, s.scale, S);
          }
        }
#endif
      } else if (pairs) {
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (bf16) qk_pairs(Q, R, D, kp, s.ks1, n, S, kSpan);
#endif
      } else if (few) {
        qk<T>(Q, R, D, kp, s.ks1, n, S, kSpan);
      } else if constexpr (std::is_same_v<T, float>) {
        qk_cols(Q, Rp, D, kp, s.ks1, n, S);
      } else {
        float* kw = grow(sc.k, (int64_t)kSpan * D);
        float* vw = grow(sc.v, (int64_t)kSpan * Dv);
        for (int t = 0; t < n; ++t) {
          at::vec::convert(kp + t * s.ks1, kw + (int64_t)t * D, D);
          at::vec::convert(vp + t * s.vs1, vw + (int64_t)t * Dv, Dv);
        }
        qk_cols(Q, Rp, D, kw, D, n, S);
        vsrc_f = vw;
      }
      // Causal and window bounds of rows whose visible keys end or start inside this span.
      if (s.causal || s.window > 0) {
        for (int i = 0; i < R; ++i) {
          const int64_t pos = offset + q0 + (r0 + i) / G;
          const int64_t vhi = s.causal ? std::min(b, pos + 1) : b;
          const int64_t vlo = s.window > 0 ? std::max(a, pos - s.window + 1) : a;
          for (int64_t t = a; t < std::min(vlo, b); ++t) S[i * pr + (t - a) * pt] = kNegInf;
          for (int64_t t = std::max(vhi, a); t < b; ++t) S[i * pr + (t - a) * pt] = kNegInf;
        }
      }
      // Tree verify rows: among its row's own tokens (from offset) a query sees its ancestors.
      if (s.tree != nullptr && b > offset) {
        for (int i = 0; i < R; ++i) {
          const uint64_t bits = (uint64_t)s.tree[s.q_start[row] + q0 + (r0 + i) / G];
          if (bits == ~uint64_t{0}) continue;
          for (int64_t t = std::max(a, offset); t < b; ++t) {
            const int64_t rel = t - offset;  // >= 64 only past the query itself: hidden anyway
            if (rel >= 64 || !((bits >> rel) & 1u)) S[i * pr + (t - a) * pt] = kNegInf;
          }
        }
      }
      if (few) {
        for (int i = 0; i < R; ++i)
          softmax_step(S + (int64_t)i * kSpan, n, mrun[i], lrun[i], O + (int64_t)i * Dv, Dv);
      } else {
        float* alpha = grow(sc.alpha, Rp);
        softmax_cols(S, n, Rp, mrun, lrun, alpha);
        for (int i = 0; i < R; ++i) {
          if (alpha[i] == 1.f) continue;
          const Vec va(alpha[i]);
          float* o = O + (int64_t)i * Dv;
          for (int d = 0; d < Dv; d += kVL) (Vec::loadu(o + d) * va).store(o + d);
        }
      }
      if (pairs) {
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (bf16) pv_pairs(S, pr, pt, R, n, vp, s.vs1, Dv, O);
#endif
      } else if (vsrc_f != nullptr) {
        pv<float>(S, pr, pt, R, n, vsrc_f, Dv, Dv, O);
      } else {
        pv<T>(S, pr, pt, R, n, vp, s.vs1, Dv, O);
      }
      a = b;
    }
    if (pairs) {
      for (int i = 0; i < R; ++i) unpair_row(O + (int64_t)i * Dv, Dv);
    }
    if (part < 0) {
      T* out = static_cast<T*>(s.out);
      for (int i = 0; i < R; ++i) {
        const int64_t m = r0 + i, tok = s.q_start[row] + q0 + m / G, h = head * G + m % G;
        const float inv = lrun[i] > 0.f ? 1.f / lrun[i] : 0.f;
        store_row<T>(O + (int64_t)i * Dv, inv, out + tok * s.os0 + h * s.os1, Dv);
      }
    } else {
      float* po = s.part_o + part * s.part_rows * Dv + r0 * Dv;
      std::copy(O, O + (int64_t)R * Dv, po);
      std::copy(mrun, mrun + R, s.part_m + part * s.part_rows + r0);
      std::copy(lrun, lrun + R, s.part_l + part * s.part_rows + r0);
    }
  }
}

template <typename T>
void run_merge(const Step& s, const int32_t* mg) {
  const int64_t row = mg[kMRow], q0 = mg[kMQ0], head = mg[kMHead];
  const int64_t first = mg[kMFirst], count = mg[kMCount];
  const int64_t qn = std::min<int64_t>(mg[kMQTile], s.q_len[row] - q0);
  const int Dv = s.Dv, G = s.G;
  Scratch& sc = tls;
  float* acc = grow(sc.o, Dv);
  T* out = static_cast<T*>(s.out);
  for (int64_t m = 0; m < qn * G; ++m) {
    float mx = kNegInf;
    for (int64_t c = 0; c < count; ++c) mx = std::max(mx, s.part_m[(first + c) * s.part_rows + m]);
    std::fill(acc, acc + Dv, 0.f);
    float l = 0.f;
    if (mx != kNegInf) {
      for (int64_t c = 0; c < count; ++c) {
        const int64_t p = first + c;
        const float mc = s.part_m[p * s.part_rows + m];
        if (mc == kNegInf) continue;
        const float w = std::exp(mc - mx);
        l += w * s.part_l[p * s.part_rows + m];
        const Vec vw(w);
        const float* po = s.part_o + (p * s.part_rows + m) * Dv;
        for (int d = 0; d < Dv; d += kVL)
          at::vec::fmadd(vw, Vec::loadu(po + d), Vec::loadu(acc + d)).store(acc + d);
      }
    }
    const int64_t tok = s.q_start[row] + q0 + m / G, h = head * G + m % G;
    store_row<T>(acc, l > 0.f ? 1.f / l : 0.f, out + tok * s.os0 + h * s.os1, Dv);
  }
}

template <typename F>
void for_each(int64_t count, bool parallel, const F& fn) {
  if (!parallel || count <= 1 || at::get_num_threads() <= 1) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(i);
    }
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "xyserve cpu attention: ", name, " must be a CPU tensor");
}

}  // namespace

// q [tokens, Hq, D]; k_cache/v_cache [blocks, block_size, Hkv, D|Dv] (last dim contiguous, any
// other strides); block_table [rows, width] int32/int64; q_start, q_len, kv_len int32 [rows];
// k_start int32 [rows] or empty: where row r's key 0 sits in the slots its block table names
// (packed and dense calls: the row's first token in one block holding every token);
// tasks int32 [T, 8] and merges int32 [Mg, 6] from tasks.py; part_rows: rows of a partial
// slot; parts: partial slots; tree: int64 [tokens] ancestor bits of tree verify rows (-1 for
// plain rows) or empty; out [tokens, Hq, Dv] (last dim contiguous). parallel: run over
// torch's threads (else on the calling thread).
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_table, const at::Tensor& q_start,
                     const at::Tensor& q_len, const at::Tensor& kv_len,
                     const at::Tensor& k_start, const at::Tensor& tasks,
                     const at::Tensor& merges, int64_t part_rows, int64_t parts, double scale,
                     bool causal, int64_t window, const at::Tensor& tree, at::Tensor& out,
                     bool parallel) {
  for (auto* t : {&q, &k_cache, &v_cache, &block_table, &q_start, &q_len, &kv_len, &tasks,
                  &merges, static_cast<const at::Tensor*>(&out)})
    check_cpu(*t, "every argument");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && out.dim() == 3,
              "xyserve cpu attention: expected q/out [tokens, H, D], caches [blocks, bs, Hkv, D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type()
                  && out.scalar_type() == q.scalar_type(),
              "xyserve cpu attention: q, caches and out must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1
                  && out.stride(2) == 1,
              "xyserve cpu attention: head dims must be contiguous");
  const int64_t hq = q.size(1), hkv = k_cache.size(2), D = q.size(2), Dv = v_cache.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && k_cache.size(3) == D && v_cache.sizes().slice(0, 3)
                  == k_cache.sizes().slice(0, 3),
              "xyserve cpu attention: cache shapes do not match q");
  TORCH_CHECK(D % kVL == 0 && Dv % kVL == 0, "xyserve cpu attention: head sizes must be "
              "multiples of ", kVL);
  TORCH_CHECK(out.size(0) == q.size(0) && out.size(1) == hq && out.size(2) == Dv,
              "xyserve cpu attention: out must be [tokens, Hq, Dv]");
  check_cpu(k_start, "k_start");
  for (auto* t : {&q_start, &q_len, &kv_len, &k_start, &tasks, &merges})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(),
                "xyserve cpu attention: tables must be contiguous int32");
  TORCH_CHECK(block_table.dim() == 2 && (block_table.scalar_type() == at::kInt
                                         || block_table.scalar_type() == at::kLong),
              "xyserve cpu attention: block_table must be 2-D int32 or int64");
  const int64_t rows = q_len.numel();
  TORCH_CHECK(q_start.numel() == rows && kv_len.numel() == rows && block_table.size(0) >= rows,
              "xyserve cpu attention: per-row tables disagree");
  TORCH_CHECK(tasks.dim() == 2 && tasks.size(1) == kTaskCols && merges.dim() == 2
                  && merges.size(1) == kMergeCols,
              "xyserve cpu attention: bad task or merge table");
  const int64_t bs = k_cache.size(1);
  const int32_t* qs = q_start.data_ptr<int32_t>();
  const int32_t* ql = q_len.data_ptr<int32_t>();
  const int32_t* kl = kv_len.data_ptr<int32_t>();
  TORCH_CHECK(k_start.numel() == 0 || k_start.numel() == rows,
              "xyserve cpu attention: k_start must be empty or one entry per row");
  const int32_t* ks = k_start.numel() ? k_start.data_ptr<int32_t>() : nullptr;
  check_cpu(tree, "tree");
  TORCH_CHECK(tree.numel() == 0 || (tree.scalar_type() == at::kLong && tree.is_contiguous()
                                    && tree.numel() == q.size(0) && causal),
              "xyserve cpu attention: tree must be empty or int64 [tokens] (causal only)");
  const int64_t* tr = tree.numel() ? tree.data_ptr<int64_t>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ql[r] >= 0 && kl[r] >= 0 && qs[r] >= 0 && qs[r] + ql[r] <= q.size(0),
                "xyserve cpu attention: row ", r, " has queries outside q");
    const int64_t k0 = ks != nullptr ? ks[r] : 0;
    TORCH_CHECK(k0 >= 0 && k0 + kl[r] <= block_table.size(1) * bs, "xyserve cpu attention: row ",
                r, " has ", kl[r], " keys from slot ", k0, " but its block table holds ",
                block_table.size(1) * bs);
  }
  const int32_t* tk = tasks.data_ptr<int32_t>();
  const int64_t ntasks = tasks.size(0);
  for (int64_t i = 0; i < ntasks; ++i) {
    const int32_t* t = tk + i * kTaskCols;
    TORCH_CHECK(t[kRow] >= 0 && t[kRow] < rows && t[kHead] >= 0 && t[kHead] < hkv
                    && t[kQ0] >= 0 && t[kK0] >= 0 && t[kPart] < parts
                    && (int64_t)t[kQTile] * (hq / hkv) <= part_rows,
                "xyserve cpu attention: task ", i, " is outside the step");
  }
  at::Tensor part_o, part_m, part_l;
  if (parts > 0) {
    part_o = at::empty({parts, part_rows, Dv}, q.options().dtype(at::kFloat));
    part_m = at::empty({parts, part_rows}, q.options().dtype(at::kFloat));
    part_l = at::empty({parts, part_rows}, q.options().dtype(at::kFloat));
  }
  Step s{q.data_ptr(), q.stride(0), q.stride(1),
         k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
         v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
         out.data_ptr(), out.stride(0), out.stride(1),
         block_table.data_ptr(), block_table.scalar_type() == at::kInt, block_table.stride(0),
         block_table.stride(1), k_cache.size(0),
         qs, ql, kl, ks, (int)D, (int)Dv, (int)(hq / hkv), (int)bs, (float)scale, causal, window, tr,
         parts > 0 ? part_o.data_ptr<float>() : nullptr,
         parts > 0 ? part_m.data_ptr<float>() : nullptr,
         parts > 0 ? part_l.data_ptr<float>() : nullptr, part_rows};
  std::atomic<int64_t> bad{-1};
  const int32_t* mg = merges.data_ptr<int32_t>();
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each(ntasks, parallel, [&](int64_t i) { run_task<scalar_t>(s, tk + i * kTaskCols, bad); });
    TORCH_CHECK(bad.load() < 0, "xyserve cpu attention: row ", bad.load(),
                " names a block outside the cache");
    for_each(merges.size(0), parallel,
             [&](int64_t i) { run_merge<scalar_t>(s, mg + i * kMergeCols); });
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "xyserve cpu attention: dtype ", q.scalar_type(), " is not supported");
  }
}

// The vector width the library was built for (floats per vector).
int64_t vector_width() { return kVL; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "xyserve meta-attention over a paged cache");
  m.def("vector_width", &vector_width);
  m.def("mask_row_stats", &xyserve_mask::mask_row_stats,
        "per query of a dense mask: first and last key seen, and how many");
}
