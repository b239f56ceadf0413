# Resolves MIXSGA_WITH_CUDA (AUTO|ON|OFF) into MIXSGA_CUDA_ENABLED.
# AUTO: on only when torch is a CUDA build AND nvcc exists AND nvcc's major version equals torch's
# CUDA major version (mixing majors gives ABI trouble). ON: the same checks, but failing is an error.
# The CPU build never needs a GPU: the CUDA sources only have to compile and link here.
set(MIXSGA_CUDA_ENABLED OFF)
string(TOUPPER "${MIXSGA_WITH_CUDA}" _mode)
if(NOT _mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MIXSGA_WITH_CUDA must be AUTO, ON or OFF, got '${MIXSGA_WITH_CUDA}'")
endif()

if(NOT _mode STREQUAL "OFF")
  set(_why "")
  if(MIXSGA_TORCH_CUDA_VERSION STREQUAL "")
    set(_why "torch is not a CUDA build")
  else()
    include(CheckLanguage)
    check_language(CUDA)
    if(NOT CMAKE_CUDA_COMPILER)
      set(_why "no nvcc found")
    else()
      execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --version OUTPUT_VARIABLE _nvcc_out)
      string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _ "${_nvcc_out}")
      set(_nvcc_major "${CMAKE_MATCH_1}")
      string(REGEX MATCH "^([0-9]+)" _ "${MIXSGA_TORCH_CUDA_VERSION}")
      set(_torch_major "${CMAKE_MATCH_1}")
      if(NOT _nvcc_major STREQUAL _torch_major)
        set(_why "nvcc CUDA ${_nvcc_major} does not match torch's CUDA ${MIXSGA_TORCH_CUDA_VERSION}")
      endif()
    endif()
  endif()
  if(_why STREQUAL "")
    set(MIXSGA_CUDA_ENABLED ON)
  elseif(_mode STREQUAL "ON")
    message(FATAL_ERROR "MIXSGA_WITH_CUDA=ON but ${_why}")
  else()
    message(STATUS "mixsga: CUDA off (${_why})")
  endif()
endif()

if(MIXSGA_CUDA_ENABLED)
  # Architectures come from TORCH_CUDA_ARCH_LIST (torch's CMake turns them into -gencode flags and
  # ignores CMAKE_CUDA_ARCHITECTURES); cmake/MixsgaTorch.cmake defaults it to 9.0.
  enable_language(CUDA)
  # CMake 3.25 knows no C++20 dialect flag for nvcc, so the REQUIRED CUDA_STANDARD 20 that torch's
  # cuda.cmake copies from CMAKE_CXX_STANDARD fails generation; pass the standard explicitly instead.
  unset(CMAKE_CUDA_STANDARD)
  set(CMAKE_CUDA_STANDARD_REQUIRED OFF)
  string(APPEND CMAKE_CUDA_FLAGS " -std=c++20 --expt-relaxed-constexpr")
  # Torch turns TORCH_CUDA_ARCH_LIST "9.0" into sm_90 machine code only, which no later GPU can load.
  # Also embed PTX for the newest listed architecture (unless the list already asks for it with
  # "+PTX"), so the driver can JIT-compile the kernels for GPUs newer than the build knew about.
  if(NOT MIXSGA_TORCH_CUDA_ARCH_LIST MATCHES "PTX")
    string(REGEX MATCHALL "[0-9]+\\.[0-9]+" _mixsga_archs "${MIXSGA_TORCH_CUDA_ARCH_LIST}")
    set(_mixsga_ptx_arch "")
    foreach(_arch IN LISTS _mixsga_archs)
      string(REPLACE "." "" _arch "${_arch}")
      if(_mixsga_ptx_arch STREQUAL "" OR _arch GREATER _mixsga_ptx_arch)
        set(_mixsga_ptx_arch "${_arch}")
      endif()
    endforeach()
    if(NOT _mixsga_ptx_arch STREQUAL "")
      string(APPEND CMAKE_CUDA_FLAGS " -gencode arch=compute_${_mixsga_ptx_arch},code=compute_${_mixsga_ptx_arch}")
    endif()
  endif()
  # One CUDA runtime in the process: the shared libcudart (one SONAME with the copy torch loads),
  # never a second, static copy whose launch errors C10_CUDA_KERNEL_LAUNCH_CHECK could not see.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  # The CUDA registrations make libmixsga depend on libc10_cuda itself. The loader resolves a library's
  # dependencies through that library's RUNPATH, and a program linking mixsga and torch does not
  # itself need libc10_cuda, so the installed library must name torch's lib folder.
  list(APPEND CMAKE_INSTALL_RPATH "${TORCH_INSTALL_PREFIX}/lib")
  file(GLOB MIXSGA_CUDA_SOURCES CONFIGURE_DEPENDS
    ${CMAKE_CURRENT_SOURCE_DIR}/kernels/*.cu
    ${CMAKE_CURRENT_SOURCE_DIR}/src/ops/cuda/*.cu
    ${CMAKE_CURRENT_SOURCE_DIR}/src/ops/cuda/*.cpp)
  message(STATUS "mixsga: CUDA on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, TORCH_CUDA_ARCH_LIST $ENV{TORCH_CUDA_ARCH_LIST})")
endif()
