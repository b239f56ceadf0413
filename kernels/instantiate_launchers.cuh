#pragma once
// Every dtype-templated kernel launcher, instantiated for one element type by the instantiate_<dtype>.cu
// files. One translation unit per dtype keeps the nvcc work of a clean build to a few files that compile
// in parallel; this macro keeps the list of launchers in one place.
#include "grouped_kv.cuh"
#include "hetero_decode_attention.cuh"
#include "rope_rotate.cuh"
#include "routing.cuh"

#define MIXSGA_INSTANTIATE_LAUNCHERS(T)                                                      \
  namespace mixsga::kernels {                                                               \
  template void launch_grouped_kv_pool<T>(const GroupedKVPoolParams&, cudaStream_t);         \
  template void launch_group_reduce<T>(const GroupReduceParams&, cudaStream_t);              \
  template void launch_expand_rows<T>(const ExpandRowsParams&, cudaStream_t);                \
  template void launch_route_expert_choice<T>(const RouteExpertChoiceParams&, cudaStream_t); \
  template void launch_hetero_decode_attention<T>(const HeteroDecodeParams&, cudaStream_t);  \
  template void launch_rope_rotate<T>(const RopeRotateParams&, cudaStream_t);                \
  }
