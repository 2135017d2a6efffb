// The CPU kernels of xyserve.gemm and xyserve.attention in C++ (built and loaded by native.py).
//
// Inductor's generated code calls the xyserve ops through PyTorch's dispatcher. With Python
// kernels, each call crosses back from the dispatcher into Python, about 3.5 us per call
// (benchmarks/op_overhead.py); a decode step makes one attention call per layer. These kernels
// serve, without Python, exactly the calls the Python path would hand to ATen's provider as one
// F.linear or one SDPA call:
//
//   - every tensor on the CPU and well formed (the conditions of ops._gemm_args_ok and
//     ops._attention_args_ok);
//   - no use_providers() block open in the process (native.py counts them here);
//   - gemm: at most max_tokens rows (a larger M is counted by the Python path);
//   - attention: fewer than planned_min_scores scores B x Lq x Lk (aten.check_attention
//     plans larger calls from their masks).
//
// Anything else goes to the Python implementation, registered as the twin op
// xyserve::_<op>_python, which checks, raises the argument errors and picks a provider as
// always. native.py loads this library only when ATen is the only provider of the process.
//
// The AutogradCPU kernel is the Python Autograd kernel's rule in C++: an error if gradients
// would be recorded (inference ops), otherwise the call goes below autograd. Calls on fake or
// functional tensors (tracing) go below autograd unchecked, as in Python.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

namespace {

// Calls served here, read by native.py into stats(): (gemm, aten, linear), (attention, aten, sdpa).
std::atomic<int64_t> gemm_calls{0};
std::atomic<int64_t> attention_calls{0};
// use_providers() blocks open in any thread: while one is, every call takes the Python path,
// which reads the block's provider list (a ContextVar, invisible from here). It starts at one,
// held by native.py until it has set the blocks already open and planned_min_scores: the
// kernels are registered the moment the library is loaded.
std::atomic<int64_t> open_overrides{1};
// aten.PLANNED_MIN_SCORES, set by native.py when it loads the library.
std::atomic<int64_t> planned_min_scores{1 << 18};

bool python_decides() { return open_overrides.load(std::memory_order_relaxed) != 0; }

bool plain_cpu(const at::Tensor& t) { return t.is_cpu() && t.layout() == at::kStrided; }

at::Tensor gemm_python(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymInt max_tokens) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xyserve::_gemm_python", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::SymInt)>();
  return op.call(x, weight, bias, std::move(max_tokens));
}

at::Tensor gemm_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::SymInt max_tokens_) {
  const int64_t max_tokens = max_tokens_.expect_int();
  bool ok = !python_decides() && max_tokens >= 1 && x.dim() >= 1 && weight.dim() == 2 &&
            plain_cpu(x) && plain_cpu(weight) && x.scalar_type() == weight.scalar_type();
  if (ok) {
    const int64_t k = x.size(-1);
    // M <= max_tokens, told from numel as the Python path does (K == 0 goes there too).
    ok = k == weight.size(1) && k > 0 && x.numel() <= max_tokens * k;
  }
  if (ok && bias.has_value()) {
    const at::Tensor& b = *bias;
    ok = b.dim() == 1 && b.size(0) == weight.size(0) && plain_cpu(b) &&
         b.scalar_type() == x.scalar_type();
  }
  if (!ok) {
    return gemm_python(x, weight, bias, c10::SymInt(max_tokens));
  }
  gemm_calls.fetch_add(1, std::memory_order_relaxed);
  return at::linear(x, weight, bias);
}

at::Tensor attention_python(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xyserve::_attention_python", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, bool, std::optional<double>)>();
  return op.call(q, k, v, attn_mask, is_causal, scale);
}

// ops._attention_args_ok, for CPU tensors: the mask broadcasts to [B, Hq, Lq, Lk].
bool attention_args_ok(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, bool is_causal) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  if (!plain_cpu(q) || !plain_cpu(k) || !plain_cpu(v)) return false;
  const auto dtype = q.scalar_type();
  if (k.scalar_type() != dtype || v.scalar_type() != dtype) return false;
  const int64_t b = q.size(0), hq = q.size(1), lq = q.size(2), d = q.size(3);
  const int64_t hk = k.size(1), lk = k.size(2);
  if (k.size(0) != b || v.size(0) != b || v.size(1) != hk || v.size(2) != lk) return false;
  if (hk == 0 || hq % hk != 0 || k.size(3) != d) return false;
  if (!attn_mask.has_value()) return true;
  const at::Tensor& m = *attn_mask;
  if (is_causal || m.dim() > 4 || !plain_cpu(m)) return false;
  if (m.scalar_type() != at::kBool && m.scalar_type() != dtype) return false;
  const int64_t target[4] = {b, hq, lq, lk};
  for (int64_t i = 1; i <= m.dim(); ++i) {
    const int64_t size = m.size(-i);
    if (size != 1 && size != target[4 - i]) return false;
  }
  return true;
}

at::Tensor attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale) {
  if (python_decides() || !attention_args_ok(q, k, v, attn_mask, is_causal) ||
      q.size(0) * q.size(2) * k.size(2) >= planned_min_scores.load(std::memory_order_relaxed)) {
    return attention_python(q, k, v, attn_mask, is_causal, scale);
  }
  attention_calls.fetch_add(1, std::memory_order_relaxed);
  // enable_gqa lets SDPA read the Hkv heads directly instead of repeating K and V.
  at::Tensor out = at::scaled_dot_product_attention(
      q, k, v, attn_mask, /*dropout_p=*/0.0, is_causal, scale,
      /*enable_gqa=*/q.size(1) != k.size(1));
  // The op promises the [B, Lq, H, D] memory layout of its fake implementation (see
  // aten.run_attention): one copy when the SDPA kernel wrote another.
  if (!out.transpose(1, 2).is_contiguous()) {
    at::Tensor fixed =
        at::empty({q.size(0), q.size(2), q.size(1), v.size(3)}, q.options()).transpose(1, 2);
    fixed.copy_(out);
    out = fixed;
  }
  return out;
}

void inference_only(
    const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const bool tracing =
      keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize);
  if (!tracing && at::GradMode::is_enabled()) {
    const auto n = op.schema().arguments().size();
    for (const c10::IValue& arg : torch::jit::last(*stack, n)) {
      bool grad = arg.isTensor() && arg.toTensor().requires_grad();
      if (arg.isTensorList()) {
        for (const at::Tensor& t : arg.toTensorList().vec()) grad = grad || t.requires_grad();
      }
      if (grad) {
        std::string name = op.schema().name();
        name.replace(name.find("::"), 2, ".");
        TORCH_CHECK(
            false, name,
            " is an inference op and has no backward: call it (or the model compiled with "
            "xyserve) under torch.no_grad() or torch.inference_mode(); xyserve's backend runs "
            "graphs that need gradients as traced");
      }
    }
  }
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(xyserve, CPU, m) {
  m.impl("gemm", &gemm_cpu);
  m.impl("attention", &attention_cpu);
}

TORCH_LIBRARY_IMPL(xyserve, AutogradCPU, m) {
  m.impl("gemm", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
  m.impl("attention", torch::CppFunction::makeFromBoxedFunction<&inference_only>());
}

// For native.py (ctypes).
extern "C" {
int64_t xyserve_native_calls(int64_t op) { return op == 0 ? gemm_calls.load() : attention_calls.load(); }
void xyserve_native_reset_calls() {
  gemm_calls.store(0);
  attention_calls.store(0);
}
void xyserve_native_add_overrides(int64_t delta) { open_overrides.fetch_add(delta); }
void xyserve_native_set_planned_min_scores(int64_t n) { planned_min_scores.store(n); }
}
