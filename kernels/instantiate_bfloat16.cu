// Every dtype-templated kernel launcher for __nv_bfloat16 elements. One translation unit per dtype keeps the
// nvcc work of a clean build to a few files that compile in parallel.
#include "grouped_kv.cuh"
#include "hetero_decode_attention.cuh"
#include "rope_rotate.cuh"
#include "routing.cuh"

namespace mixsga::kernels {

template void launch_grouped_kv_pool<__nv_bfloat16>(const GroupedKVPoolParams&, cudaStream_t);
template void launch_group_reduce<__nv_bfloat16>(const GroupReduceParams&, cudaStream_t);
template void launch_expand_rows<__nv_bfloat16>(const ExpandRowsParams&, cudaStream_t);
template void launch_route_expert_choice<__nv_bfloat16>(const RouteExpertChoiceParams&, cudaStream_t);
template void launch_hetero_decode_attention<__nv_bfloat16>(const HeteroDecodeParams&, cudaStream_t);
template void launch_rope_rotate<__nv_bfloat16>(const RopeRotateParams&, cudaStream_t);

}  // namespace mixsga::kernels
