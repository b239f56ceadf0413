#pragma once
// Option checks shared by the modules (each error names the option and the value seen).
#include <c10/util/Exception.h>
#include <fmt/format.h>

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

}  // namespace mixsga::detail
