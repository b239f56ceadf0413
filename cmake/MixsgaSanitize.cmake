# MIXSGA_SANITIZE=ON builds everything of this project (library, tests, fuzz harness) with
# AddressSanitizer + UndefinedBehaviorSanitizer. torch's own libraries are not instrumented; the
# runtime options and suppressions that this needs live in tests/sanitize/ (each one explained).
option(MIXSGA_SANITIZE "Build with AddressSanitizer + UndefinedBehaviorSanitizer (tests/sanitize/)" OFF)
if(MIXSGA_SANITIZE)
  if(MIXSGA_CUDA_ENABLED)
    message(FATAL_ERROR "mixsga: MIXSGA_SANITIZE needs -DMIXSGA_WITH_CUDA=OFF (nvcc objects are not instrumented)")
  endif()
  # -fno-sanitize-recover: every UBSan report aborts, so a finding fails its test instead of
  #   scrolling past in the log.
  # -fno-sanitize=vptr: the vptr check validates member calls and downcasts against the dynamic
  #   type's RTTI. Nearly every polymorphic object here (TensorImpl, autograd nodes, nn::Module) is
  #   created inside torch's prebuilt, uninstrumented libraries, whose typeinfo objects need not be the
  #   ones our code sees, a known source of false reports with prebuilt libraries; every other UBSan
  #   check stays on.
  # -fno-omit-frame-pointer -g1: usable stack traces (line tables only: full -g over the torch headers
  #   doubles the compile time).
  set(_mixsga_san_flags -fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined
      -fno-omit-frame-pointer -g1)
  add_compile_options(${_mixsga_san_flags})
  add_link_options(-fsanitize=address,undefined)
  message(STATUS "mixsga: ASan + UBSan build (MIXSGA_SANITIZE=ON)")
endif()

# The sanitizer build runs in CI; a precompiled <torch/torch.h> per target saves most of the time every
# translation unit spends parsing torch's headers. No-op unless MIXSGA_SANITIZE.
function(mixsga_sanitize_pch target)
  if(MIXSGA_SANITIZE)
    target_precompile_headers(${target} PRIVATE <torch/torch.h>)
  endif()
endfunction()
