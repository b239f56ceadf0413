#pragma once
/// Checkpoints of the mixsga modules (and of any torch::nn::Module that contains them).
///
/// torch::save / torch::load of ExpertChoiceRouter, SharedGroupKV and MixSGAAttention store every
/// parameter, buffer and option (group sizes, ratios, aux loss kind, ...: the record "mixsga_options"
/// in the module's archive). Loading checks that record against the module's own options and the
/// archive's tensors against the module's: any difference is a c10::ValueError naming the option (with
/// both values) or the tensor, and the module is left as it was. Options that do not change a shape
/// (aux_alpha, attention_dropout, ...) must match too; change them on the loaded module if you mean to.

#include <torch/nn/module.h>

#include <string>

namespace mixsga {

/// Saves `module` (parameters, buffers and, for mixsga modules, options) to `path` without ever leaving
/// a half-written file there: the archive is written to a temporary file in the same directory, flushed
/// to disk, then renamed over `path` (atomic on POSIX file systems). On any error the temporary file is
/// removed, `path` keeps its previous content, and the error is rethrown.
void save_checkpoint(const torch::nn::Module& module, const std::string& path);

/// Loads a checkpoint written by save_checkpoint (or torch::save) into `module`, checking options and
/// tensors as described above. A missing or unreadable file is a c10::ValueError naming `path`.
void load_checkpoint(torch::nn::Module& module, const std::string& path);

}  // namespace mixsga
