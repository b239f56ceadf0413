// Checkpoints of the C++ modules: torch::save / torch::load and mixsga::save_checkpoint /
// load_checkpoint keep every parameter bit for bit and every option; a checkpoint of other options,
// or with missing or extra router weights, is a c10::ValueError naming what differs; a failed save
// never replaces a good file.
#include <gtest/gtest.h>
#include <mixsga/checkpoint.h>
#include <mixsga/nn/attention.h>
#include <torch/torch.h>

#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <string>
#include <vector>

namespace {

namespace mnn = mixsga::nn;
namespace fs = std::filesystem;

// A fresh, empty directory per test, removed afterwards.
class Checkpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("mixsga_checkpoint_{}_{}", ::testing::UnitTest::GetInstance()->current_test_info()->name(), ::getpid());
    fs::create_directories(dir_);
    ASSERT_TRUE(files().empty()) << dir_ << " is not empty";
  }
  // (Not fs::remove_all: libtorch.so exports its own copy of std::filesystem, whose remove_all wins
  // symbol resolution here and jumps to a null function under ASan.)
  void TearDown() override {
    for (const auto& f : files()) fs::remove(dir_ / f);
    fs::remove(dir_);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    for (const auto& f : fs::directory_iterator(dir_)) out.push_back(f.path().filename().string());
    return out;
  }
  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Bitwise equality (torch::equal would call -0 == 0 equal and NaN != NaN).
bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         torch::equal(a.detach().contiguous().view(torch::kByte), b.detach().contiguous().view(torch::kByte));
}

void expect_same_state(const torch::nn::Module& a, const torch::nn::Module& b) {
  const auto pa = a.named_parameters(), pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& p : pa) EXPECT_TRUE(same_bits(p.value(), pb[p.key()])) << p.key();
  const auto ba = a.named_buffers(), bb = b.named_buffers();
  ASSERT_EQ(ba.size(), bb.size());
  for (const auto& p : ba) EXPECT_TRUE(same_bits(p.value(), bb[p.key()])) << p.key();
}

template <class F>
void expect_value_error(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "lacks \"" << n << "\": " << msg;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected c10::ValueError, got " << c10::demangle(typeid(e).name()) << ": " << e.what();
    return;
  }
  ADD_FAILURE() << "expected c10::ValueError, nothing was thrown";
}

mnn::MixSGAAttentionOptions odd_options() {
  // Every option away from its default, so a field that is not stored would show.
  return mnn::MixSGAAttentionOptions(32, 8, 4)
      .head_dim(6)
      .group_sizes({1, 4})
      .ratios({0.7, 0.3})
      .bias(true)
      .rope_theta(500000.0)
      .aux_loss("bce")
      .aux_alpha(0.25)
      .prefill_routing("argmax")
      .detach_router_input(true)
      .attention_dropout(0.125);
}

TEST_F(Checkpoint, SaveCheckpointRoundTripIsBitForBit) {
  torch::manual_seed(1);
  mnn::MixSGAAttention saved(odd_options());
  {
    torch::NoGradGuard g;
    saved->q_proj->weight[0][0] = -0.0;  // bit patterns equal() would not tell apart
    saved->router->proj->bias[1] = std::nan("");
  }
  mixsga::save_checkpoint(*saved, path("layer.pt"));
  torch::manual_seed(2);
  mnn::MixSGAAttention loaded(odd_options());
  mixsga::load_checkpoint(*loaded, path("layer.pt"));
  expect_same_state(*saved, *loaded);
  EXPECT_EQ(files(), std::vector<std::string>{"layer.pt"}) << "a temporary file was left behind";
}

TEST_F(Checkpoint, TorchSaveKeepsOptionsOfEveryModule) {
  torch::manual_seed(3);
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(16, {0.25, 0.25, 0.5}).aux_loss("logit_ce"));
  torch::save(router, path("router.pt"));
  mnn::ExpertChoiceRouter router2(mnn::ExpertChoiceRouterOptions(16, {0.25, 0.25, 0.5}).aux_loss("logit_ce"));
  torch::load(router2, path("router.pt"));
  expect_same_state(*router, *router2);
  mnn::ExpertChoiceRouter other_kind(mnn::ExpertChoiceRouterOptions(16, {0.25, 0.25, 0.5}));
  expect_value_error([&] { torch::load(other_kind, path("router.pt")); }, {"aux_loss", "logit_ce", "sigmoid_ce"});

  mnn::SharedGroupKV kv(mnn::SharedGroupKVOptions(16, 4, 8).group_sizes({1, 2}).bias(true));
  torch::save(kv, path("kv.pt"));
  mnn::SharedGroupKV kv2(mnn::SharedGroupKVOptions(16, 4, 8).group_sizes({1, 2}).bias(true));
  torch::load(kv2, path("kv.pt"));
  expect_same_state(*kv, *kv2);
  mnn::SharedGroupKV kv_groups(mnn::SharedGroupKVOptions(16, 4, 8).group_sizes({1, 4}).bias(true));
  expect_value_error([&] { torch::load(kv_groups, path("kv.pt")); }, {"group_sizes", "[1, 2]", "[1, 4]"});
}

// Each option differs in turn; the error names it and shows both values, and the module keeps its weights.
TEST_F(Checkpoint, LoadingIntoOtherOptionsNamesTheOption) {
  mnn::MixSGAAttention saved(mnn::MixSGAAttentionOptions(32, 8, 4));
  mixsga::save_checkpoint(*saved, path("layer.pt"));
  struct Case {
    mnn::MixSGAAttentionOptions options;
    std::vector<std::string> needles;
  };
  const auto base = mnn::MixSGAAttentionOptions(32, 8, 4);
  const std::vector<Case> cases{
      {mnn::MixSGAAttentionOptions(base).group_sizes({1, 2}).ratios({0.5, 0.5}), {"group_sizes", "[1, 2, 4]", "[1, 2]"}},
      {mnn::MixSGAAttentionOptions(base).ratios({0.25, 0.25, 0.5}), {"ratios", "[0.3, 0.1, 0.6]", "[0.25, 0.25, 0.5]"}},
      {mnn::MixSGAAttentionOptions(base).aux_loss("bce"), {"aux_loss", "sigmoid_ce", "bce"}},
      {mnn::MixSGAAttentionOptions(base).aux_alpha(0.5), {"aux_alpha", "0.1", "0.5"}},
      {mnn::MixSGAAttentionOptions(base).prefill_routing("argmax"), {"prefill_routing", "expert_choice", "argmax"}},
      {mnn::MixSGAAttentionOptions(base).rope_theta(1e6), {"rope_theta", "10000", "1000000"}},
      {mnn::MixSGAAttentionOptions(base).bias(true), {"bias", "false", "true"}},
      {mnn::MixSGAAttentionOptions(32, 8, 8), {"num_kv_heads", "= 4", "= 8"}},
  };
  for (const auto& c : cases) {
    mnn::MixSGAAttention target(c.options);
    std::vector<torch::Tensor> before;
    for (const auto& p : target->parameters()) before.push_back(p.detach().clone());
    try {
      mixsga::load_checkpoint(*target, path("layer.pt"));
      ADD_FAILURE() << "no error for " << c.needles[0];
    } catch (const c10::ValueError& e) {
      const std::string msg = e.what_without_backtrace();
      for (const auto& n : c.needles) EXPECT_NE(msg.find(n), std::string::npos) << "lacks \"" << n << "\": " << msg;
    }
    const auto after = target->parameters();
    for (size_t i = 0; i < after.size(); ++i) EXPECT_TRUE(torch::equal(before[i], after[i])) << c.needles[0];
  }
  mnn::ExpertChoiceRouter router(mnn::ExpertChoiceRouterOptions(32));
  expect_value_error([&] { mixsga::load_checkpoint(*router, path("layer.pt")); },
                     {"MixSGAAttention", "ExpertChoiceRouter"});
}

TEST_F(Checkpoint, MissingOrExtraRouterWeightsAreNamed) {
  mnn::MixSGAAttention routerless(mnn::MixSGAAttentionOptions(32, 8, 4));
  routerless->replace_module("router", std::make_shared<torch::nn::Module>());
  mixsga::save_checkpoint(*routerless, path("routerless.pt"));
  mnn::MixSGAAttention target(mnn::MixSGAAttentionOptions(32, 8, 4));
  expect_value_error([&] { mixsga::load_checkpoint(*target, path("routerless.pt")); },
                     {"lacks", "router.proj.bias", "router.proj.weight"});

  mnn::MixSGAAttention extra(mnn::MixSGAAttentionOptions(32, 8, 4));
  extra->router->register_parameter("temperature", torch::ones({1}));
  mixsga::save_checkpoint(*extra, path("extra.pt"));
  expect_value_error([&] { mixsga::load_checkpoint(*target, path("extra.pt")); },
                     {"has tensors the module does not", "router.temperature"});
}

// A torch::save archive of the same tensors but no options record (e.g. written before options were stored).
TEST_F(Checkpoint, ArchiveWithoutOptionsIsAClearError) {
  mnn::MixSGAAttention layer(mnn::MixSGAAttentionOptions(32, 8, 4));
  auto plain = std::make_shared<torch::nn::Module>();
  for (const auto& child : layer->named_children()) plain->register_module(child.key(), child.value());
  torch::serialize::OutputArchive archive;
  plain->save(archive);
  archive.save_to(path("plain.pt"));
  expect_value_error([&] { mixsga::load_checkpoint(*layer, path("plain.pt")); }, {"mixsga_options", "MixSGAAttention"});
}

TEST_F(Checkpoint, TruncatedFileNamesThePath) {
  mnn::MixSGAAttention layer(mnn::MixSGAAttentionOptions(32, 8, 4));
  mixsga::save_checkpoint(*layer, path("good.pt"));
  const auto bytes = read_bytes(path("good.pt"));
  std::ofstream(path("truncated.pt"), std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  expect_value_error([&] { mixsga::load_checkpoint(*layer, path("truncated.pt")); },
                     {"path", "truncated.pt", "not a readable checkpoint"});
}

// A module whose save() fails after writing part of its archive: the save is abandoned before any
// file is touched, the previous checkpoint stays byte for byte, and no temporary file is left.
struct FailingSaveImpl : torch::nn::Module {
  FailingSaveImpl() { register_parameter("w", torch::ones({4})); }
  void save(torch::serialize::OutputArchive& archive) const override {
    torch::nn::Module::save(archive);
    TORCH_CHECK_VALUE(false, "FailingSave: save failed half way");
  }
};

TEST_F(Checkpoint, FailedSaveLeavesThePreviousFile) {
  mnn::MixSGAAttention layer(mnn::MixSGAAttentionOptions(32, 8, 4));
  mixsga::save_checkpoint(*layer, path("layer.pt"));
  const auto before = read_bytes(path("layer.pt"));
  FailingSaveImpl failing;
  expect_value_error([&] { mixsga::save_checkpoint(failing, path("layer.pt")); }, {"half way"});
  EXPECT_EQ(read_bytes(path("layer.pt")), before);
  EXPECT_EQ(files(), std::vector<std::string>{"layer.pt"});
  // A directory that does not exist: the temporary file cannot be created, nothing appears.
  EXPECT_THROW(mixsga::save_checkpoint(*layer, path("no_such_dir/layer.pt")), c10::Error);
  EXPECT_EQ(files(), std::vector<std::string>{"layer.pt"});
}

// A save killed at a random moment (SIGKILL: no handler, no cleanup) never leaves a broken file at the
// path: it holds the old checkpoint or the complete new one. (A stray temporary file may remain.)
TEST_F(Checkpoint, KilledSaveLeavesTheOldOrTheNewCheckpoint) {
  const auto options = mnn::MixSGAAttentionOptions(512, 8, 8);  // ~4 MB of parameters
  torch::manual_seed(1);
  mnn::MixSGAAttention old_layer(options);
  torch::manual_seed(2);
  mnn::MixSGAAttention new_layer(options);
  mixsga::save_checkpoint(*old_layer, path("layer.pt"));
  int saw_old = 0, saw_new = 0;
  for (int trial = 0; trial < 8; ++trial) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      try {
        mixsga::save_checkpoint(*new_layer, path("layer.pt"));
      } catch (...) {
        ::_exit(2);
      }
      ::_exit(0);
    }
    ::usleep(static_cast<useconds_t>(trial * 15000));  // 0 .. 105 ms into the save
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    mnn::MixSGAAttention loaded(options);
    ASSERT_NO_THROW(mixsga::load_checkpoint(*loaded, path("layer.pt"))) << "trial " << trial;
    const bool is_old = same_bits(loaded->q_proj->weight, old_layer->q_proj->weight);
    const bool is_new = same_bits(loaded->q_proj->weight, new_layer->q_proj->weight);
    EXPECT_TRUE(is_old || is_new) << "trial " << trial;
    saw_old += is_old;
    saw_new += is_new;
    if (is_new) mixsga::save_checkpoint(*old_layer, path("layer.pt"));  // start the next trial from the old one
  }
  RecordProperty("saves_killed_before_rename", saw_old);
  RecordProperty("saves_completed", saw_new);
}

}  // namespace
