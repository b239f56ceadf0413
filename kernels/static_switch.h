#pragma once
// Compile-time switches: turn a runtime value into a constexpr (or a type) for the lambda that follows,
// so each kernel is instantiated only for the cases it supports. Host code only; no torch here.
//
//   BOOL_SWITCH(aligned, kAligned, [&] { launch<kAligned>(params, stream); });
//   SCALAR_SWITCH(ScalarKind::kBFloat16, elem_t, [&] { launch<elem_t>(params, stream); });
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "kernel_types.h"

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

#define SCALAR_SWITCH(KIND, TYPE_NAME, ...)                                            \
  [&] {                                                                                \
    switch (KIND) {                                                                    \
      case ::mixsga::kernels::ScalarKind::kFloat32: {                                  \
        using TYPE_NAME = float;                                                       \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::mixsga::kernels::ScalarKind::kFloat64: {                                  \
        using TYPE_NAME = double;                                                      \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::mixsga::kernels::ScalarKind::kBFloat16: {                                 \
        using TYPE_NAME = __nv_bfloat16;                                               \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case ::mixsga::kernels::ScalarKind::kFloat16: {                                  \
        using TYPE_NAME = __half;                                                      \
        return __VA_ARGS__();                                                          \
      }                                                                                \
    }                                                                                  \
    throw std::logic_error("SCALAR_SWITCH: unhandled ScalarKind");                     \
  }()

// Head dims the tensor-core decode kernel is instantiated for; HEAD_DIM must be 64, 128 or 256
// (the caller picks the generic kernel for any other).
#define HEAD_DIM_SWITCH(HEAD_DIM, CONST_NAME, ...)                                \
  [&] {                                                                           \
    switch (HEAD_DIM) {                                                           \
      case 64: {                                                                  \
        constexpr static int CONST_NAME = 64;                                     \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      case 128: {                                                                 \
        constexpr static int CONST_NAME = 128;                                    \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      case 256: {                                                                 \
        constexpr static int CONST_NAME = 256;                                    \
        return __VA_ARGS__();                                                     \
      }                                                                           \
    }                                                                             \
    throw std::logic_error("HEAD_DIM_SWITCH: head dim must be 64, 128 or 256");   \
  }()
