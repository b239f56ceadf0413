#include "mixsga/checkpoint.h"

#include <ATen/core/Dict.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/serialize/archive.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include "nn/option_record.h"
#include "ops/validation.h"

namespace mixsga {
namespace detail {
namespace {

// Every tensor of an archive written by Module::save, by dotted name (children are nested archives;
// "training" and our options record are the only non-tensor attributes).
void collect_archive_tensors(torch::serialize::InputArchive& archive, const std::string& prefix,
                             std::map<std::string, at::Tensor>& out) {
  for (const auto& key : archive.keys()) {
    if (key == "training" || key == kOptionsKey) continue;
    torch::serialize::InputArchive child;
    if (archive.try_read(key, child)) {
      collect_archive_tensors(child, prefix + key + ".", out);
      continue;
    }
    c10::IValue value;
    if (archive.try_read(key, value) && value.isTensor()) out.emplace(prefix + key, value.toTensor());
  }
}

std::string names_str(const std::set<std::string>& names) { return fmt::format("{}", fmt::join(names, ", ")); }

void check_options(torch::serialize::InputArchive& archive, std::string_view module_kind, const OptionRecord& options) {
  c10::IValue stored;
  TORCH_CHECK_VALUE(archive.try_read(std::string(kOptionsKey), stored) && stored.isGenericDict(),
                    fmt::format("checkpoint: has no '{}' record for this {} (not written by mixsga's save, or by a "
                                "version before options were stored); it cannot be checked against the module's "
                                "options",
                                kOptionsKey, module_kind));
  const auto dict = stored.toGenericDict();
  const auto stored_value = [&](const std::string& name) -> std::string {
    const auto it = dict.find(name);
    return it == dict.end() ? std::string("<absent>") : it->value().toStringRef();
  };
  const std::string kind = stored_value("module");
  TORCH_CHECK_VALUE(kind == module_kind, fmt::format("checkpoint: holds a {}, but it is being loaded into a {}",
                                                     kind, module_kind));
  for (const auto& [name, value] : options) {
    const std::string saved = stored_value(name);
    TORCH_CHECK_VALUE(saved == value, fmt::format("{}: the checkpoint's {} has {} = {}, the module has {} = {}", name,
                                                  module_kind, name, saved, name, value));
  }
  // An option the module records only when set (decode_offsets) must not be dropped silently either.
  for (const auto& item : dict) {
    const std::string name = item.key().toStringRef();
    const bool known = name == "module" || std::any_of(options.begin(), options.end(),
                                                       [&](const auto& o) { return o.first == name; });
    TORCH_CHECK_VALUE(known, fmt::format("{}: the checkpoint's {} has {} = {}, the module has {} = <absent>", name,
                                         module_kind, name, item.value().toStringRef(), name));
  }
}

void check_tensors(torch::nn::Module& module, torch::serialize::InputArchive& archive) {
  std::map<std::string, at::Tensor> stored;
  collect_archive_tensors(archive, "", stored);
  std::map<std::string, at::Tensor> own;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) own.emplace(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) own.emplace(b.key(), b.value());
  std::set<std::string> missing, extra;
  for (const auto& [name, t] : own) {
    if (!stored.count(name)) missing.insert(name);
  }
  for (const auto& [name, t] : stored) {
    if (!own.count(name)) extra.insert(name);
  }
  TORCH_CHECK_VALUE(missing.empty(), fmt::format("checkpoint: lacks tensors the module has: {}", names_str(missing)));
  TORCH_CHECK_VALUE(extra.empty(), fmt::format("checkpoint: has tensors the module does not: {}", names_str(extra)));
  for (const auto& [name, t] : own) {
    const auto& s = stored.at(name);
    TORCH_CHECK_VALUE(s.sizes().equals(t.sizes()), fmt::format("{}: the checkpoint's tensor has shape {}, the module's {}",
                                                               name, shape_str(s.sizes()), shape_str(t.sizes())));
    TORCH_CHECK_VALUE(s.scalar_type() == t.scalar_type(),
                      fmt::format("{}: the checkpoint's tensor has dtype {}, the module's {}", name,
                                  c10::toString(s.scalar_type()), c10::toString(t.scalar_type())));
  }
}

}  // namespace

void save_with_options(const torch::nn::Module& module, torch::serialize::OutputArchive& archive,
                       std::string_view module_kind, const OptionRecord& options) {
  module.torch::nn::Module::save(archive);
  c10::Dict<std::string, std::string> dict;
  dict.insert("module", std::string(module_kind));
  for (const auto& [name, value] : options) dict.insert(name, value);
  archive.write(std::string(kOptionsKey), c10::IValue(dict));
}

void load_with_options(torch::nn::Module& module, torch::serialize::InputArchive& archive,
                       std::string_view module_kind, const OptionRecord& options) {
  check_options(archive, module_kind, options);
  check_tensors(module, archive);
  module.torch::nn::Module::load(archive);
}

}  // namespace detail

void save_checkpoint(const torch::nn::Module& module, const std::string& path) {
  TORCH_CHECK_VALUE(!path.empty(), "path: expected a file name, got an empty string");
  // Same directory as the target, so the rename never crosses file systems; a random suffix, so two
  // writers never share a temporary file.
  // POSIX calls, not std::filesystem: libtorch.so exports its own copy of std::filesystem, which then
  // wins symbol resolution in every program linked to torch.
  const std::string tmp = fmt::format("{}.tmp-{}-{:08x}", path, static_cast<long>(::getpid()), std::random_device{}());
  try {
    torch::serialize::OutputArchive archive;
    module.save(archive);
    archive.save_to(tmp);
    // Flush the data before the rename publishes it: after a crash, `path` holds the old or the new
    // checkpoint, never a truncated one.
    const int fd = ::open(tmp.c_str(), O_RDONLY);
    TORCH_CHECK(fd >= 0, fmt::format("path: could not reopen the temporary file '{}' to flush it", tmp));
    const int synced = ::fsync(fd);
    ::close(fd);
    TORCH_CHECK(synced == 0, fmt::format("path: could not flush '{}' to disk", tmp));
    TORCH_CHECK(::rename(tmp.c_str(), path.c_str()) == 0,
                fmt::format("path: could not rename '{}' to '{}': {}", tmp, path, std::strerror(errno)));
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
}

void load_checkpoint(torch::nn::Module& module, const std::string& path) {
  struct stat info {};
  TORCH_CHECK_VALUE(::stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode),
                    fmt::format("path: no checkpoint file at '{}'", path));
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, fmt::format("path: '{}' is not a readable checkpoint ({})", path, e.what_without_backtrace()));
  }
  module.load(archive);
}

}  // namespace mixsga
