# Finds Torch from the torch installed in MIXSGA_PYTHON (the project's .venv by default), so the
# library always builds against the same torch the Python side imports.
if(NOT EXISTS "${MIXSGA_PYTHON}")
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  set(MIXSGA_PYTHON "${Python3_EXECUTABLE}" CACHE FILEPATH "" FORCE)
endif()
execute_process(
  COMMAND "${MIXSGA_PYTHON}" -c "import torch; print(torch.utils.cmake_prefix_path); print(torch.version.cuda or ''); print(torch.__version__)"
  OUTPUT_VARIABLE _mixsga_torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _mixsga_torch_rc)
if(NOT _mixsga_torch_rc EQUAL 0)
  message(FATAL_ERROR "mixsga: could not import torch with MIXSGA_PYTHON='${MIXSGA_PYTHON}'. Run scripts/bootstrap.sh (or make test) first.")
endif()
string(REPLACE "\n" ";" _mixsga_torch_info "${_mixsga_torch_info}")
list(GET _mixsga_torch_info 0 _mixsga_torch_prefix)
list(GET _mixsga_torch_info 1 MIXSGA_TORCH_CUDA_VERSION)
list(GET _mixsga_torch_info 2 MIXSGA_TORCH_VERSION)
list(APPEND CMAKE_PREFIX_PATH "${_mixsga_torch_prefix}")
message(STATUS "mixsga: torch ${MIXSGA_TORCH_VERSION} (CUDA '${MIXSGA_TORCH_CUDA_VERSION}') from ${MIXSGA_PYTHON}")

# Torch's CMake config probes for a GPU to pick architectures; there is none on CPU machines, so
# default to Hopper (the project's GPU) unless the user chose otherwise.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "9.0")
endif()
set(MIXSGA_TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
find_package(Torch REQUIRED)
