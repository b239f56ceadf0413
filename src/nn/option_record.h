#pragma once
// The options record that the mixsga modules write next to their tensors in a torch::serialize
// archive, and the checks that loading runs against it (include/mixsga/checkpoint.h).
#include <torch/nn/module.h>
#include <torch/serialize/archive.h>

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mixsga::detail {

/// (option name, value formatted exactly: doubles in their shortest round-trip form).
using OptionRecord = std::vector<std::pair<std::string, std::string>>;

/// The key of the record in a module's archive.
inline constexpr std::string_view kOptionsKey = "mixsga_options";

/// module.Module::save(archive) plus the record (with "module" = module_kind first).
void save_with_options(const torch::nn::Module& module, torch::serialize::OutputArchive& archive,
                       std::string_view module_kind, const OptionRecord& options);

/// Checks the archive's record against `options` and its tensors (recursively) against the module's
/// parameters and buffers (names, shapes, dtypes), then module.Module::load(archive). Every mismatch
/// is a c10::ValueError naming the option or tensor and both values; nothing is loaded then.
void load_with_options(torch::nn::Module& module, torch::serialize::InputArchive& archive,
                       std::string_view module_kind, const OptionRecord& options);

}  // namespace mixsga::detail
