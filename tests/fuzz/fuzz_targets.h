#pragma once
// The fuzz targets: one per public entry point family. Each draws its inputs from `Inputs`, calls the
// entry point and checks the result; a rejected input must surface as a c10::Error (propagated), a
// wrong result as a FuzzFailure.
#include <stdexcept>
#include <string>
#include <vector>

#include "fuzz_inputs.h"

namespace mixsga::fuzz {

/// A result that violates the entry point's contract (not an input rejection).
struct FuzzFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Target {
  const char* name;
  void (*run)(Inputs&);
};

/// Set when a c10::Error came out of an entry point call (not out of building the inputs: the
/// generator also asks torch for impossible tensors, e.g. negative sizes, which torch itself rejects).
extern bool g_error_from_entry_point;

/// Every target, in a fixed order (a case seed picks one by index).
const std::vector<Target>& targets();

}  // namespace mixsga::fuzz
