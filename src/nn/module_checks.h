#pragma once
// Option checks shared by the modules (each error names the option and the value seen).
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include <initializer_list>
#include <string>
#include <string_view>

namespace mixsga::detail {

inline void check_positive(int64_t value, std::string_view name) {
  TORCH_CHECK_VALUE(value > 0, fmt::format("{}: must be > 0, got {}", name, value));
}

inline void check_aux_loss_kind(const std::string& kind) {
  TORCH_CHECK_VALUE(kind == "sigmoid_ce" || kind == "logit_ce" || kind == "bce",
                    fmt::format("aux_loss: must be one of 'sigmoid_ce', 'logit_ce', 'bce', got '{}'", kind));
}

inline void check_prefill_routing(const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "expert_choice" || mode == "argmax",
                    fmt::format("prefill_routing: must be 'expert_choice' or 'argmax', got '{}'", mode));
}

/// A dtype as Python users read it ("torch.float32"), so C++ and Python errors say the same thing.
inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Bool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

/// A string option that must be one of `choices`; the error names the option, the choices and the value.
inline void check_choice(const std::string& value, std::string_view name, std::initializer_list<std::string_view> choices) {
  for (const auto c : choices) {
    if (value == c) return;
  }
  std::string listed;
  for (const auto c : choices) listed += fmt::format("{}'{}'", listed.empty() ? "" : ", ", c);
  TORCH_CHECK_VALUE(false, fmt::format("{}: must be one of {}, got '{}'", name, listed, value));
}

inline void check_key_scale(const std::string& mode) { check_choice(mode, "key_scale", {"none", "group", "learned"}); }

inline void check_routing_signal(const std::string& mode) {
  check_choice(mode, "routing_signal", {"router", "pooling_error"});
}

}  // namespace mixsga::detail
