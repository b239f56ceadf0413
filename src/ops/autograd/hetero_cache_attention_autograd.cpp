// Autograd registration of hetero_cache_attention: the op is inference-only (it reads a detached KV
// cache), so it gets torch's "not implemented" autograd kernel. A forward with inputs that require grad
// still runs, but its output carries a node that raises, naming the op, if a backward reaches it,
// instead of silently returning no gradient.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_IMPL(mixsga, Autograd, m) {
  m.impl("hetero_cache_attention", torch::autograd::autogradNotImplementedFallback());
}
