// Bad-input catalogue: checkpoint files.
// Conventions (exact exception class, message naming the argument and the value): bad_input_helpers.h.
#include "bad_input_helpers.h"

using namespace bad_input;
namespace ops = mixsga::ops;
namespace mnn = mixsga::nn;

// =============================================================================================
// Checkpoints (test_checkpoint.cpp covers option and tensor mismatches)
// =============================================================================================

TEST(BadInput, CheckpointFunctionsNameThePath) {
  mnn::MixSGAAttention layer(mnn::MixSGAAttentionOptions(32, 4, 4));
  const auto dir = std::filesystem::temp_directory_path();
  const auto absent = (dir / "mixsga_bad_input_absent.pt").string();
  expect_error<c10::ValueError>([&] { mixsga::load_checkpoint(*layer, absent); }, {"path", absent});
  expect_error<c10::ValueError>([&] { mixsga::load_checkpoint(*layer, dir.string()); }, {"path", "no checkpoint file"});
  expect_error<c10::ValueError>([&] { mixsga::save_checkpoint(*layer, ""); }, {"path", "empty"});
  const auto garbage = (dir / fmt::format("mixsga_bad_input_garbage_{}.pt", ::getpid())).string();
  { std::ofstream(garbage) << "not a zip archive"; }
  expect_error<c10::ValueError>([&] { mixsga::load_checkpoint(*layer, garbage); }, {"path", garbage, "not a readable checkpoint"});
  std::filesystem::remove(garbage);
}
