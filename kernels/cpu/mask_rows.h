// One pass over a dense attention mask: per query, the first and last key it sees and how many.
// What kernels/attention_plan.py's rows_from_mask decides "rows of padding" from; the ATen
// version (mask_row_stats there) takes several passes and temporaries over the whole mask.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>

namespace xyserve_mask {

// mask [Bm, 1, Lq, Lk], any strides: bool (true = attend) or additive (0 = attend, -inf = not).
// Returns int32 [Bm, Lq, 3]: first, last, count of the keys each query sees (0, 0, 0: none),
// count -1 for a query whose row holds an additive value that is neither 0 nor -inf.
template <typename T>
void scan(const at::Tensor& mask, int32_t* out) {
  const int64_t B = mask.size(0), Lq = mask.size(2), Lk = mask.size(3);
  const int64_t sb = mask.stride(0), sq = mask.stride(2), sk = mask.stride(3);
  const T* base = mask.data_ptr<T>();
  at::parallel_for(0, B * Lq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const T* row = base + (idx / Lq) * sb + (idx % Lq) * sq;
      int64_t first = -1, last = -1, count = 0;
      bool bad = false;
      for (int64_t k = 0; k < Lk; ++k) {
        bool seen;
        if constexpr (std::is_same_v<T, bool>) {
          seen = row[k * sk];
        } else {
          const float v = static_cast<float>(row[k * sk]);
          seen = v == 0.f;
          bad |= !seen && !(std::isinf(v) && v < 0.f);
        }
        if (seen) {
          if (first < 0) first = k;
          last = k;
          ++count;
        }
      }
      int32_t* o = out + idx * 3;
      o[0] = first < 0 ? 0 : (int32_t)first;
      o[1] = last < 0 ? 0 : (int32_t)last;
      o[2] = bad ? -1 : (int32_t)count;
    }
  });
}

at::Tensor mask_row_stats(const at::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 4 && mask.size(1) == 1,
              "xyserve mask_row_stats: expected a CPU mask [B, 1, Lq, Lk]");
  TORCH_CHECK(mask.size(3) < (int64_t{1} << 31), "xyserve mask_row_stats: Lk past int32");
  at::Tensor out = at::empty({mask.size(0), mask.size(2), 3}, mask.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  switch (mask.scalar_type()) {
    case at::kBool: scan<bool>(mask, o); break;
    case at::kFloat: scan<float>(mask, o); break;
    case at::kBFloat16: scan<at::BFloat16>(mask, o); break;
    case at::kHalf: scan<at::Half>(mask, o); break;
    default: TORCH_CHECK(false, "xyserve mask_row_stats: dtype ", mask.scalar_type());
  }
  return out;
}

}  // namespace xyserve_mask
