// mixsga._C: the pybind11 module of the Python package.
//
// The ops reach Python through the dispatcher (torch.ops.mixsga.*, registered when libmixsga loads),
// not through this module. What is here is what is not an op: the C++ modules, so that Python can
// drive (and test against) exactly the code a LibTorch user runs, the compact KV cache, and a few C++
// helpers. Each module is bound with torch::python::bind_module, which makes it a torch.nn.Module
// subclass in Python (parameters(), named_parameters(), state_dict(), train()/eval(), to()).
#include <dlfcn.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/python.h>

#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "mixsga/mixsga.h"

namespace py = pybind11;

namespace mixsga::python {
namespace {

using OptTensor = std::optional<torch::Tensor>;
using mixsga::HeteroKVCache;
using mixsga::HeteroKVCacheOptions;

// The path of the libmixsga this module is linked to: what C++ code loaded into the same process (or
// a LibTorch program built against the installed package) must use so the ops register only once.
std::string library_path() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&mixsga::kv_fraction), &info) == 0 || info.dli_fname == nullptr) {
    throw std::runtime_error("mixsga: could not locate libmixsga (dladdr failed)");
  }
  return info.dli_fname;
}

// c10 errors carry a C++ backtrace in what(); Python users get the message alone, as a ValueError /
// TypeError / IndexError like the ops raise through torch.ops. Registered module-locally so torch's
// own translation of its errors is untouched.
void translate_c10_errors() {
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
}

// set_routing / routing of the router and the attention layer (both keep ratios and decode offsets in
// their options). routing() is a method because the Python wrapper copies attributes once, when made.
template <typename Class>
Class& add_routing(Class& cls) {
  using Module = typename Class::type;
  cls.def(
         "set_routing",
         [](Module& m, std::vector<double> ratios, std::optional<std::vector<double>> offsets) {
           m.set_routing(std::move(ratios), offsets.value_or(std::vector<double>{}));
         },
         py::arg("ratios"), py::arg("decode_offsets") = py::none(),
         "Replaces the capacity ratios (expert choice) and the decode offsets (causal argmax; None: none).")
      .def("routing", [](const Module& m) { return py::make_tuple(m.options.ratios(), m.options.decode_offsets()); },
           "(ratios, decode_offsets) as set now.");
  return cls;
}

// torch::python::bind_module gives parameters() / named_parameters() / train() / to(), but
// torch.nn.Module's state_dict() would recurse into the C++ children, which are not Python modules.
// These make the C++ module interchangeable with its Python twin for checkpoints and parity tests.
template <typename Class>
Class& add_state_dict(Class& cls) {
  using Module = typename Class::type;
  cls.def(
         "state_dict",
         [](Module& module) {
           py::dict state;  // insertion-ordered, like torch's OrderedDict
           for (const auto& item : module.named_parameters()) state[py::str(item.key())] = item.value().detach();
           for (const auto& item : module.named_buffers()) state[py::str(item.key())] = item.value().detach();
           return state;
         },
         "Parameters and buffers by name (detached, sharing storage), as torch.nn.Module.state_dict().")
      .def(
          "load_state_dict",
          [](Module& module, const std::map<std::string, torch::Tensor>& state, bool strict) {
            torch::NoGradGuard no_grad;
            std::vector<std::string> missing;
            auto load = [&](const std::string& name, torch::Tensor& target) {
              const auto it = state.find(name);
              if (it == state.end()) {
                missing.push_back(name);
                return;
              }
              TORCH_CHECK_VALUE(it->second.sizes().equals(target.sizes()),
                                fmt::format("state_dict: '{}' has shape [{}], the module expects [{}]", name,
                                            fmt::join(it->second.sizes(), ", "), fmt::join(target.sizes(), ", ")));
              target.copy_(it->second);
            };
            auto params = module.named_parameters();
            auto buffers = module.named_buffers();
            std::vector<std::string> unexpected;
            for (const auto& item : state) {
              if (!params.contains(item.first) && !buffers.contains(item.first)) unexpected.push_back(item.first);
            }
            if (strict) {
              TORCH_CHECK_VALUE(unexpected.empty(),
                                fmt::format("state_dict: unexpected keys [{}]", fmt::join(unexpected, ", ")));
            }
            for (auto& item : params) load(item.key(), item.value());
            for (auto& item : buffers) load(item.key(), item.value());
            if (strict) {
              TORCH_CHECK_VALUE(missing.empty(), fmt::format("state_dict: missing keys [{}]", fmt::join(missing, ", ")));
            }
            return py::make_tuple(missing, unexpected);
          },
          py::arg("state_dict"), py::arg("strict") = true,
          "Copies tensors into the parameters and buffers of the same names; strict: the keys must match "
          "exactly. Returns (missing_keys, unexpected_keys).");
  // Replaces (not overloads) bind_module's __repr__/__str__, which print only the type name.
  for (const char* name : {"__repr__", "__str__"}) {
    cls.attr(name) = py::cpp_function(
        [](Module& module) { return c10::str(static_cast<torch::nn::Module&>(module)); }, py::is_method(cls),
        py::name(name));
  }
  return cls;
}

py::tuple routing_tuple(const nn::MixSGAForwardResult& r) {
  return py::make_tuple(r.output, r.aux_loss, r.expert_idx, r.target_idx);
}

void bind_router(py::module_& m) {
  using nn::ExpertChoiceRouterImpl;
  auto cls = torch::python::bind_module<ExpertChoiceRouterImpl, /*force_enable=*/true>(m, "ExpertChoiceRouter");
  add_routing(cls);
  add_state_dict(cls)
      .def(py::init([](int64_t hidden_size, std::vector<double> ratios, std::string aux_loss,
                       std::optional<std::vector<double>> decode_offsets) {
             return std::make_shared<ExpertChoiceRouterImpl>(nn::ExpertChoiceRouterOptions(hidden_size, std::move(ratios))
                                                                 .aux_loss(std::move(aux_loss))
                                                                 .decode_offsets(decode_offsets.value_or(std::vector<double>{})));
           }),
           py::arg("hidden_size"), py::arg("ratios") = std::vector<double>{0.3, 0.1, 0.6},
           py::arg("aux_loss") = "sigmoid_ce", py::arg("decode_offsets") = py::none(),
           "Linear(hidden_size, E) + sigmoid router; E = len(ratios). Mirrors mixsga.nn.ExpertChoiceRouter.")
      .def("forward", &ExpertChoiceRouterImpl::forward, py::arg("x"), "Router logits: [*, D] -> [*, E].")
      .def("__call__", &ExpertChoiceRouterImpl::forward, py::arg("x"))
      .def("scores", &ExpertChoiceRouterImpl::scores, py::arg("x"), "Sigmoid scores: [*, D] -> [*, E].")
      .def("route", &ExpertChoiceRouterImpl::route, py::arg("scores"), py::arg("valid_mask") = py::none(),
           "Expert-choice assignment: scores [B, L, E], valid_mask [B, L] -> [B, L] int64.")
      .def("argmax_route", &ExpertChoiceRouterImpl::argmax_route, py::arg("scores"),
           "Causal argmax routing: scores [*, E] -> [*] int64.")
      .def("aux_loss", &ExpertChoiceRouterImpl::aux_loss, py::arg("logits"), py::arg("target"),
           py::arg("valid_mask") = py::none(),
           "Unscaled aux loss of logits [B, L, E] against target [B, L], mean over valid tokens (0-dim).")
      .def_property_readonly("num_experts", &ExpertChoiceRouterImpl::num_experts)
      .def_property_readonly("ratios", [](const ExpertChoiceRouterImpl& r) { return r.options.ratios(); })
      .def_property_readonly("aux_loss_kind", [](const ExpertChoiceRouterImpl& r) { return r.options.aux_loss(); });
}

void bind_shared_group_kv(py::module_& m) {
  using nn::SharedGroupKVImpl;
  auto cls = torch::python::bind_module<SharedGroupKVImpl, /*force_enable=*/true>(m, "SharedGroupKV");
  add_state_dict(cls)
      .def(py::init([](int64_t hidden_size, int64_t num_kv_heads, int64_t head_dim, std::vector<int64_t> group_sizes,
                       bool bias) {
             return std::make_shared<SharedGroupKVImpl>(nn::SharedGroupKVOptions(hidden_size, num_kv_heads, head_dim)
                                                            .group_sizes(std::move(group_sizes))
                                                            .bias(bias));
           }),
           py::arg("hidden_size"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("group_sizes") = std::vector<int64_t>{1, 2, 4}, py::arg("bias") = false,
           "The weight-shared K/V projections of all experts. Mirrors mixsga.nn.SharedGroupKV.")
      .def("forward", &SharedGroupKVImpl::forward, py::arg("x"), py::arg("expert_idx"),
           "(K, V), each [B, L, Hkv, d], from x [B, L, D] and expert_idx [B, L].")
      .def("__call__", &SharedGroupKVImpl::forward, py::arg("x"), py::arg("expert_idx"))
      .def(
          "expert_weights",
          [](const SharedGroupKVImpl& kv, int64_t expert, bool key) {
            auto [w, b] = kv.expert_weights(expert, key);
            return py::make_tuple(w, b.defined() ? py::cast(b) : py::none());
          },
          py::arg("expert"), py::arg("key") = true,
          "Pooled (weight [(Hkv/g_e)*d, D], bias [(Hkv/g_e)*d] or None) of one expert for K or V.");
}

void bind_cache(py::module_& m) {
  py::class_<HeteroKVCacheOptions>(m, "HeteroKVCacheOptions",
                                   "Options of HeteroKVCache (see mixsga/cache.h); keyword constructor, plain fields.")
      .def(py::init([](int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, std::vector<int64_t> group_sizes,
                       c10::ScalarType dtype, c10::Device device, int64_t max_tokens, double growth,
                       double kv_cap) {
             HeteroKVCacheOptions o;
             o.num_layers = num_layers;
             o.num_kv_heads = num_kv_heads;
             o.head_dim = head_dim;
             o.group_sizes = std::move(group_sizes);
             o.dtype = dtype;
             o.device = device;
             o.max_tokens = max_tokens;
             o.growth = growth;
             o.kv_cap = kv_cap;
             return o;
           }),
           py::arg("num_layers") = 1, py::arg("num_kv_heads") = 1, py::arg("head_dim") = 64,
           py::arg("group_sizes") = std::vector<int64_t>{1, 2, 4}, py::arg("dtype") = c10::kFloat,
           py::arg("device") = c10::Device(c10::kCPU), py::arg("max_tokens") = 0, py::arg("growth") = 1.5,
           py::arg("kv_cap") = 0.0)
      .def_readwrite("num_layers", &HeteroKVCacheOptions::num_layers)
      .def_readwrite("num_kv_heads", &HeteroKVCacheOptions::num_kv_heads)
      .def_readwrite("head_dim", &HeteroKVCacheOptions::head_dim)
      .def_readwrite("group_sizes", &HeteroKVCacheOptions::group_sizes)
      .def_readwrite("dtype", &HeteroKVCacheOptions::dtype)
      .def_readwrite("device", &HeteroKVCacheOptions::device)
      .def_readwrite("max_tokens", &HeteroKVCacheOptions::max_tokens)
      .def_readwrite("growth", &HeteroKVCacheOptions::growth)
      .def_readwrite("kv_cap", &HeteroKVCacheOptions::kv_cap,
                     "Hard per-sequence cap on the stored K/V as a share of the full K/V (0 = none; else in\n"
                     "[1/g_max, 1]): every prefix of every sequence stays within it, in every layer.");

  py::class_<HeteroKVCache, std::shared_ptr<HeteroKVCache>>(
      m, "HeteroKVCache",
      "The compact inference KV cache (mixsga/cache.h): per layer, per expert pools [B, Hkv/g_e, T_e, d] holding\n"
      "each token with only its expert's Hkv/g_e heads; positions are kept as one start per sequence plus each\n"
      "token's expert id in ceil(log2 E) bits; padding is never stored.\n"
      "Build it from a layer's cache_options(num_layers) and pass it as cache= to the attention layers.\n"
      "Memory: bytes_stored() / stored_bytes_per_token() (= bytes_per_token()) count what the tokens need;\n"
      "bytes_allocated() / allocated_bytes_per_token() add the growth slack and batch padding.")
      .def(py::init<HeteroKVCacheOptions>(), py::arg("options"))
      .def("append", &HeteroKVCache::append, py::arg("layer"), py::arg("keys"), py::arg("values"),
           py::arg("expert_idx"), py::arg("valid") = py::none(), py::arg("decode") = py::none(),
           py::arg("positions") = py::none(),
           "Appends keys/values [B, L, Hkv, d] of one layer, stored compactly per token's expert (group means).\n"
           "positions: optional [B, L] or [L] integer; default: each sequence continues (next_positions()).")
      .def("append_compact", &HeteroKVCache::append_compact, py::arg("layer"), py::arg("keys"), py::arg("values"),
           py::arg("expert_idx"), py::arg("valid") = py::none(), py::arg("decode") = py::none(),
           py::arg("positions") = py::none(),
           "Appends tokens given at their compact size: keys[e] / values[e] are [N_e, Hkv/g_e, d], the valid\n"
           "tokens of expert e in batch-major order; never expanded to Hkv heads. Other arguments as append().")
      .def("cap_routing", &HeteroKVCache::cap_routing, py::arg("layer"), py::arg("expert_idx"),
           py::arg("valid") = py::none(),
           "expert_idx [B, L] adjusted to kv_cap and reserved pools for the tokens about to be appended to\n"
           "`layer`: in order, a token keeps its expert while its sequence's running K/V fits, else goes to the\n"
           "nearest coarser expert that fits. Causal; changes nothing; expert_idx itself without a cap.")
      .def("reserve", &HeteroKVCache::reserve, py::arg("batch"), py::arg("max_length"), py::arg("ratios"),
           "Allocates every pool once for `batch` sequences of at most `max_length` tokens within kv_cap (which\n"
           "must be set): expert e < E-1 gets floor(ratios[e] * max_length) slots, the coarsest the rest.\n"
           "ratios' KV budget must be <= kv_cap. The cache must be empty; reset() drops the reservation.")
      .def_property_readonly("reserved_length", &HeteroKVCache::reserved_length,
                             "Tokens per sequence the pools are reserved for (0: not reserved).")
      .def("worst_case_bytes", &HeteroKVCache::worst_case_bytes, py::arg("max_length"), py::arg("batch") = 1,
           "The most bytes_stored() can reach with `batch` sequences of `max_length` tokens: kv_cap (1 without a\n"
           "cap) times the full K/V, rounded down to what the group sizes store, plus the index bits.")
      .def("keys", &HeteroKVCache::keys, py::arg("layer"), "E views [B, Hkv/g_e, T_e, d] of the stored keys.")
      .def("values", &HeteroKVCache::values, py::arg("layer"), "E views [B, Hkv/g_e, T_e, d] of the stored values.")
      .def("positions", &HeteroKVCache::positions, py::arg("layer"),
           "E tensors [B, T_e] int32: each stored slot's position (rebuilt from the index).")
      .def("next_positions", &HeteroKVCache::next_positions, py::arg("layer") = 0,
           "[B] int64 default position of each sequence's next token (last stored + 1, 0 when empty).")
      .def("lengths", &HeteroKVCache::lengths, py::arg("layer"), "[B, E] int64 tokens per sequence and expert.")
      .def("seq_lengths", &HeteroKVCache::seq_lengths, py::arg("layer") = 0, "[B] int64 tokens per sequence.")
      .def("max_seq_length", &HeteroKVCache::max_seq_length, py::arg("layer") = 0)
      .def_property_readonly("batch_size", &HeteroKVCache::batch_size)
      .def_property_readonly("num_experts", &HeteroKVCache::num_experts)
      .def_property_readonly("options", &HeteroKVCache::options)
      .def("reorder", &HeteroKVCache::reorder, py::arg("beam_idx"), "Keeps sequences beam_idx[i] as sequence i.")
      .def("crop", &HeteroKVCache::crop, py::arg("length"), "Drops every token at position >= length.")
      .def("reset", &HeteroKVCache::reset)
      .def("shrink_to_fit", &HeteroKVCache::shrink_to_fit)
      .def("bytes_allocated", &HeteroKVCache::bytes_allocated,
           "Bytes allocated for K/V pools and indexes (growth slack and batch padding included).")
      .def("bytes_used", &HeteroKVCache::bytes_used, "The same as bytes_allocated() (its older name).")
      .def("bytes_stored", &HeteroKVCache::bytes_stored,
           "Bytes the stored tokens need: 2 * (Hkv/g_e) * d * elem_size per token and layer, plus the expert\n"
           "ids (ceil(log2 E) bits per token and layer, rounded up to bytes per sequence and layer).")
      .def("index_bits_per_token", &HeteroKVCache::index_bits_per_token,
           "Index bits a token costs over all layers: num_layers * ceil(log2 E).")
      .def("stored_bytes_per_token", &HeteroKVCache::stored_bytes_per_token,
           "bytes_stored() / stored tokens (0 when empty): compare with full_bytes_per_token().")
      .def("allocated_bytes_per_token", &HeteroKVCache::allocated_bytes_per_token,
           "bytes_allocated() / stored tokens (0 when empty): growth slack included.")
      .def("bytes_per_token", &HeteroKVCache::bytes_per_token, "The same as stored_bytes_per_token().")
      .def("full_bytes_per_token", &HeteroKVCache::full_bytes_per_token,
           "Bytes per token of an uncompressed cache of the same model: 2 * Hkv * d * elem_size per layer.")
      .def("token_counts", &HeteroKVCache::token_counts, py::arg("layer"), "[E] int64 tokens stored per expert.")
      .def("decode_ratios", &HeteroKVCache::decode_ratios, py::arg("layer") = -1,
           "[E] float64 realised expert ratios of decode steps (all layers when layer < 0).");
}

void bind_attention(py::module_& m) {
  using nn::MixSGAAttentionImpl;
  using Rope = std::optional<nn::RopeAngles>;
  auto forward = [](MixSGAAttentionImpl& a, const torch::Tensor& x, const OptTensor& mask, const OptTensor& pos,
                    HeteroKVCache* cache, int64_t layer, const Rope& rope) {
    return a.forward(x, mask, pos, cache, layer, rope);
  };
  auto cls = torch::python::bind_module<MixSGAAttentionImpl, /*force_enable=*/true>(m, "MixSGAAttention");
  add_routing(cls);
  add_state_dict(cls)
      .def(py::init([](int64_t hidden_size, int64_t num_heads, int64_t num_kv_heads, std::optional<int64_t> head_dim,
                       std::vector<int64_t> group_sizes, std::vector<double> ratios, bool bias, double rope_theta,
                       std::string aux_loss, double aux_alpha, std::string prefill_routing, bool detach_router_input,
                       double attention_dropout, std::string key_scale, std::string routing_signal,
                       bool aux_in_backward, std::optional<std::vector<double>> decode_offsets) {
             // head_dim None means hidden_size / num_heads; the C++ options spell that 0, so 0 itself
             // must not slip through as "derive it".
             TORCH_CHECK_VALUE(!head_dim.has_value() || *head_dim > 0,
                               fmt::format("head_dim: must be > 0 or None, got {}", head_dim.value_or(0)));
             return std::make_shared<MixSGAAttentionImpl>(nn::MixSGAAttentionOptions(hidden_size, num_heads, num_kv_heads)
                                                              .head_dim(head_dim.value_or(0))
                                                              .group_sizes(std::move(group_sizes))
                                                              .ratios(std::move(ratios))
                                                              .bias(bias)
                                                              .rope_theta(rope_theta)
                                                              .aux_loss(std::move(aux_loss))
                                                              .aux_alpha(aux_alpha)
                                                              .prefill_routing(std::move(prefill_routing))
                                                              .detach_router_input(detach_router_input)
                                                              .attention_dropout(attention_dropout)
                                                              .key_scale(std::move(key_scale))
                                                              .routing_signal(std::move(routing_signal))
                                                              .aux_in_backward(aux_in_backward)
                                                              .decode_offsets(decode_offsets.value_or(std::vector<double>{})));
           }),
           py::arg("hidden_size"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim") = py::none(),
           py::arg("group_sizes") = std::vector<int64_t>{1, 2, 4}, py::arg("ratios") = std::vector<double>{0.3, 0.1, 0.6},
           py::arg("bias") = false, py::arg("rope_theta") = 10000.0, py::arg("aux_loss") = "sigmoid_ce",
           py::arg("aux_alpha") = 0.1, py::arg("prefill_routing") = "expert_choice",
           py::arg("detach_router_input") = false, py::arg("attention_dropout") = 0.0, py::arg("key_scale") = "none",
           py::arg("routing_signal") = "router", py::arg("aux_in_backward") = false,
           py::arg("decode_offsets") = py::none(),
           "The C++ mixsga::nn::MixSGAAttention; same arguments, parameter names and shapes as "
           "mixsga.nn.MixSGAAttention.")
      .def("forward", forward, py::arg("hidden_states"), py::arg("attention_mask") = py::none(),
           py::arg("position_ids") = py::none(), py::arg("cache") = nullptr, py::arg("layer_idx") = 0,
           py::arg("rope") = py::none(),
           "(output [B, L, D], aux_loss 0-dim) from hidden_states [B, L, D], an optional [B, L] 0/1 padding "
           "mask and optional [B, L] or [L] positions. With a HeteroKVCache: prefill on an empty cache, "
           "argmax-routed decode (compact attention for L = 1) on a non-empty one; `layer_idx` indexes the cache. "
           "rope: optional (cos, sin), each [B, L, d] or [1, L, d], instead of the layer's own RoPE.")
      .def("__call__", forward, py::arg("hidden_states"), py::arg("attention_mask") = py::none(),
           py::arg("position_ids") = py::none(), py::arg("cache") = nullptr, py::arg("layer_idx") = 0,
           py::arg("rope") = py::none())
      .def(
          "forward_with_routing",
          [](MixSGAAttentionImpl& a, const torch::Tensor& x, const OptTensor& mask, const OptTensor& pos,
             HeteroKVCache* cache, int64_t layer, const Rope& rope) {
            return routing_tuple(a.forward_with_routing(x, mask, pos, cache, layer, rope));
          },
          py::arg("hidden_states"), py::arg("attention_mask") = py::none(), py::arg("position_ids") = py::none(),
          py::arg("cache") = nullptr, py::arg("layer_idx") = 0, py::arg("rope") = py::none(),
          "(output [B, L, D], aux_loss, expert_idx [B, L] int64 (the expert each token's K/V used), "
          "target_idx [B, L] int64 (the expert-choice assignment, the aux loss target)).")
      .def("forward_routed", &MixSGAAttentionImpl::forward_routed, py::arg("hidden_states"), py::arg("expert_idx"),
           py::arg("attention_mask") = py::none(), py::arg("position_ids") = py::none(),
           "The layer with routing given (expert_idx [B, L] integer) instead of computed: output [B, L, D].")
      .def(
          "routing_agreement",
          [](MixSGAAttentionImpl& a, const torch::Tensor& x, const OptTensor& mask) {
            const auto r = a.routing_agreement(x, mask);
            return py::make_tuple(r.agreement, r.argmax_ratios, r.expert_choice_ratios);
          },
          py::arg("hidden_states"), py::arg("attention_mask") = py::none(),
          "(agreement, argmax_ratios [E] float64, expert_choice_ratios [E] float64) on given text.")
      .def(
          "cache_options", [](const MixSGAAttentionImpl& a, int64_t num_layers) { return a.cache_options(num_layers); },
          py::arg("num_layers") = 1, "HeteroKVCache options matching this layer (heads, head dim, groups, dtype, device).")
      .def("kv_fraction", &MixSGAAttentionImpl::kv_fraction, "sum_e ratios[e] / group_sizes[e].")
      .def_property_readonly("head_dim", &MixSGAAttentionImpl::head_dim)
      .def_property_readonly("options", [](const MixSGAAttentionImpl& a) {
        const auto& o = a.options;
        py::dict d;
        d["hidden_size"] = o.hidden_size();
        d["num_heads"] = o.num_heads();
        d["num_kv_heads"] = o.num_kv_heads();
        d["head_dim"] = a.head_dim();
        d["group_sizes"] = o.group_sizes();
        d["ratios"] = o.ratios();
        d["bias"] = o.bias();
        d["rope_theta"] = o.rope_theta();
        d["aux_loss"] = o.aux_loss();
        d["aux_alpha"] = o.aux_alpha();
        d["prefill_routing"] = o.prefill_routing();
        d["detach_router_input"] = o.detach_router_input();
        d["attention_dropout"] = o.attention_dropout();
        d["key_scale"] = o.key_scale();
        d["routing_signal"] = o.routing_signal();
        d["aux_in_backward"] = o.aux_in_backward();
        d["decode_offsets"] = o.decode_offsets();
        return d;
      })

      // A method, not a property: torch's Python wrapper of C++ modules copies the C++ object's attributes
      // when it is made (a property would read stale) and keeps attribute writes for itself; methods reach
      // the C++ object.
      .def(
          "set_aux_backward_scale",
          [](MixSGAAttentionImpl& a, double scale) {
            TORCH_CHECK_VALUE(std::isfinite(scale) && scale >= 0.0,
                              fmt::format("aux_backward_scale: must be finite and >= 0, got {}", scale));
            a.options.aux_backward_scale(scale);
          },
          py::arg("scale"), "With aux_in_backward: the factor of the aux gradient (default 1).");
}

}  // namespace
}  // namespace mixsga::python

PYBIND11_MODULE(_C, m) {
  using namespace mixsga;
  m.doc() = "mixsga C++ bindings: the C++ modules and helpers (the ops are torch.ops.mixsga.*).";
  python::translate_c10_errors();
  python::bind_router(m);
  python::bind_shared_group_kv(m);
  python::bind_cache(m);
  python::bind_attention(m);
  // bind_module creates the Python classes while the module initialises; name them after it.
  for (const char* name : {"ExpertChoiceRouter", "SharedGroupKV", "MixSGAAttention"}) {
    m.attr(name).attr("__module__") = m.attr("__name__");
    m.attr(name).attr("__qualname__") = name;
  }
  m.def("library_path", &python::library_path, "Absolute path of the loaded libmixsga shared library.");
  m.def(
      "kv_fraction",
      [](const std::vector<int64_t>& group_sizes, const std::vector<double>& ratios) {
        return mixsga::kv_fraction(group_sizes, ratios);
      },
      py::arg("group_sizes"), py::arg("ratios"),
        "KV budget relative to the base model: sum_e ratios[e] / group_sizes[e] (validates both).");
  m.def("fit_decode_offsets", &nn::fit_decode_offsets, py::arg("scores"), py::arg("ratios"),
        "Decode offsets [E] (a list) for which causal argmax routing of router scores [N, E] gives each expert "
        "its share ratios[e] of the N tokens as closely as N allows (N >= 100 * E).");
  m.def("ratios_for_budget", &nn::ratios_for_budget, py::arg("group_sizes"), py::arg("ratios"), py::arg("budget"),
        "Capacity ratios with KV budget `budget` that keep the trained ratios' proportions as far as possible.");
  m.def("pool_kv_weight", &ops::pool_kv_weight, py::arg("weight"), py::arg("group_size"), py::arg("head_dim"),
        "Pools the rows of a K/V weight [Hkv*d, ...] (or bias) over groups of group_size heads.");
  m.def("apply_rope", &nn::apply_rope, py::arg("x"), py::arg("positions"), py::arg("theta") = 10000.0,
        "The C++ RoPE (Hugging Face Llama convention): x [B, L, H, d], positions [B, L] or [L].");
}
