// mixsga_fuzz: a seeded random-input harness over every op's input validation and the KV cache.
//
// Every case is (target, seed): the target draws all its inputs from the seed, so a case replays
// exactly. Each case must end in a correct result or a clear c10 error (see fuzz_targets.cpp); a wrong
// result, an unclear error, a non-c10 exception, a crash, a sanitizer report or a hang (a case over
// --case-timeout seconds) fails the run and prints the case to replay.
//
//   mixsga_fuzz --seconds 60 [--seed S]      fuzz for 60 s from seed S (default: from the clock; printed)
//   mixsga_fuzz --replay tests/fuzz/corpus    replay every case of the corpus files (regression tests)
//   mixsga_fuzz --case grouped_kv_pool 1234   replay one case, printing its error message
//   mixsga_fuzz --seconds 30 --target hetero_kv_cache   fuzz one target only
//   mixsga_fuzz --seconds 300 --save-corpus DIR   also write one case per new outcome signature
//                                                  (target + result or error class + argument named)
#include <c10/util/Exception.h>
#include <c10/util/Type.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include <csignal>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <unistd.h>

#include "fuzz_targets.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace {

using mixsga::fuzz::FuzzFailure;
using mixsga::fuzz::Inputs;
using mixsga::fuzz::Target;
using mixsga::fuzz::targets;

// The case in flight, preformatted so signal handlers and sanitizer callbacks can print it with write().
char g_current_case[256] = "(none)";

void print_current_case() {
  const char prefix[] = "\nmixsga_fuzz: the failing case is: mixsga_fuzz --case ";
  (void)!::write(2, prefix, sizeof(prefix) - 1);
  (void)!::write(2, g_current_case, std::strlen(g_current_case));
  (void)!::write(2, "\n", 1);
}

extern "C" void on_fatal_signal(int sig) {
  if (sig == SIGALRM) {
    const char msg[] = "\nmixsga_fuzz: a case ran past --case-timeout (a hang)";
    (void)!::write(2, msg, sizeof(msg) - 1);
  }
  print_current_case();
  std::signal(sig, SIG_DFL);
  std::raise(sig == SIGALRM ? SIGABRT : sig);
}

const Target* find_target(const std::string& name) {
  for (const auto& t : targets()) {
    if (name == t.name) return &t;
  }
  return nullptr;
}

struct Outcome {
  bool failed = false;
  std::string signature;  // e.g. "grouped_kv_pool ValueError group_sizes" or "route_expert_choice ok"
  std::string message;
};

// The argument an error message names: the text before its first ':' (messages read "arg: ...").
std::string named_argument(const std::string& msg) {
  const auto colon = msg.find(':');
  const auto first = msg.substr(0, std::min(colon, msg.find('\n')));
  return first.size() <= 40 ? first : first.substr(0, 40);
}

Outcome run_case(const Target& target, uint64_t seed, int64_t timeout_s) {
  std::snprintf(g_current_case, sizeof(g_current_case), "%s %llu", target.name, static_cast<unsigned long long>(seed));
  Outcome out;
  ::alarm(static_cast<unsigned>(timeout_s));
  mixsga::fuzz::g_error_from_entry_point = false;
  try {
    Inputs in(seed);
    target.run(in);
    out.signature = fmt::format("{} ok", target.name);
  } catch (const FuzzFailure& e) {
    out = {true, fmt::format("{} FAILURE", target.name), e.what()};
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    out.signature = fmt::format("{} {}{} {}", target.name, mixsga::fuzz::g_error_from_entry_point ? "" : "(inputs) ",
                                c10::demangle(typeid(e).name()), named_argument(msg));
    out.message = msg;
  } catch (const std::exception& e) {
    out = {true, fmt::format("{} FAILURE", target.name),
           fmt::format("non-c10 exception {}: {}", c10::demangle(typeid(e).name()), e.what())};
  }
  ::alarm(0);
  return out;
}

// Corpus files: one case per line, "<target> <seed>", '#' starts a comment.
std::vector<std::pair<std::string, uint64_t>> read_corpus(const std::filesystem::path& path) {
  std::vector<std::filesystem::path> files;
  if (std::filesystem::is_directory(path)) {
    for (const auto& f : std::filesystem::directory_iterator(path)) {
      if (f.path().extension() == ".txt") files.push_back(f.path());
    }
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(path);
  }
  std::vector<std::pair<std::string, uint64_t>> cases;
  for (const auto& f : files) {
    std::ifstream in(f);
    TORCH_CHECK(in, fmt::format("mixsga_fuzz: cannot read corpus file {}", f.string()));
    std::string line;
    while (std::getline(in, line)) {
      line = line.substr(0, line.find('#'));
      std::istringstream fields(line);
      std::string name;
      uint64_t seed = 0;
      if (fields >> name >> seed) cases.emplace_back(name, seed);
    }
  }
  return cases;
}

struct Args {
  double seconds = 0;
  uint64_t seed = 0;
  bool seed_given = false;
  int64_t case_timeout = 60;
  std::string replay, save_corpus, case_target, only_target;
  uint64_t case_seed = 0;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto next = [&]() -> std::string {
      TORCH_CHECK(i + 1 < argc, fmt::format("mixsga_fuzz: {} needs a value", arg));
      return argv[++i];
    };
    if (arg == "--seconds") a.seconds = std::stod(next());
    else if (arg == "--seed") a.seed = std::stoull(next()), a.seed_given = true;
    else if (arg == "--case-timeout") a.case_timeout = std::stoll(next());
    else if (arg == "--replay") a.replay = next();
    else if (arg == "--target") a.only_target = next();
    else if (arg == "--save-corpus") a.save_corpus = next();
    else if (arg == "--case") a.case_target = next(), a.case_seed = std::stoull(next());
    else TORCH_CHECK(false, fmt::format("mixsga_fuzz: unknown argument '{}' (see the comment atop fuzz_main.cpp)", arg));
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  torch::set_num_threads(1);
  for (int sig : {SIGALRM, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) std::signal(sig, on_fatal_signal);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_set_death_callback(print_current_case);
#endif

  if (!args.case_target.empty()) {
    const Target* t = find_target(args.case_target);
    TORCH_CHECK(t, fmt::format("mixsga_fuzz: no target '{}'", args.case_target));
    const auto out = run_case(*t, args.case_seed, args.case_timeout);
    fmt::print("{}\n{}\n", out.signature, out.message);
    return out.failed ? 1 : 0;
  }

  std::map<std::string, int64_t> signatures;
  std::map<std::string, std::pair<std::string, uint64_t>> first_case;
  int64_t cases = 0, failures = 0;
  const auto record = [&](const Target& t, uint64_t seed) {
    const auto out = run_case(t, seed, args.case_timeout);
    ++cases;
    if (signatures[out.signature]++ == 0) first_case[out.signature] = {t.name, seed};
    if (out.failed) {
      ++failures;
      fmt::print(stderr, "FAILURE: mixsga_fuzz --case {} {}\n  {}\n", t.name, seed, out.message);
    }
  };

  if (!args.replay.empty()) {
    for (const auto& [name, seed] : read_corpus(args.replay)) {
      const Target* t = find_target(name);
      TORCH_CHECK(t, fmt::format("mixsga_fuzz: corpus names an unknown target '{}'", name));
      record(*t, seed);
    }
  }
  if (args.seconds > 0) {
    const uint64_t base = args.seed_given ? args.seed
                                          : static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
    fmt::print("mixsga_fuzz: fuzzing for {} s from --seed {}\n", args.seconds, base);
    std::fflush(stdout);
    const auto start = std::chrono::steady_clock::now();
    const auto& all = targets();
    TORCH_CHECK(args.only_target.empty() || find_target(args.only_target),
                fmt::format("mixsga_fuzz: no target '{}'", args.only_target));
    for (uint64_t i = 0;; ++i) {
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >= args.seconds) break;
      // Case i of this run: target i mod n, seed base + i (every case replays with --case).
      const Target& t = args.only_target.empty() ? all[i % all.size()] : *find_target(args.only_target);
      record(t, base + i);
    }
  }

  fmt::print("mixsga_fuzz: {} cases, {} failures, {} distinct outcomes\n", cases, failures, signatures.size());
  for (const auto& [sig, n] : signatures) fmt::print("  {:>7}  {}\n", n, sig);
  if (!args.save_corpus.empty()) {
    std::filesystem::create_directories(args.save_corpus);
    const auto path = std::filesystem::path(args.save_corpus) / fmt::format("found-{}.txt", args.seed);
    std::ofstream out(path);
    out << "# one case per distinct outcome found by mixsga_fuzz (target seed  # outcome)\n";
    for (const auto& [sig, c] : first_case) out << fmt::format("{} {}  # {}\n", c.first, c.second, sig);
    fmt::print("mixsga_fuzz: wrote {}\n", path.string());
  }
  return failures == 0 ? 0 : 1;
}
