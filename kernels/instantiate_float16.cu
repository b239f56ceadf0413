// Every dtype-templated kernel launcher for __half elements. One translation unit per dtype keeps the
// nvcc work of a clean build to a few files that compile in parallel.
#include "grouped_kv.cuh"
#include "hetero_decode_attention.cuh"
#include "rope_rotate.cuh"
#include "routing.cuh"

namespace mixsga::kernels {

template void launch_grouped_kv_pool<__half>(const GroupedKVPoolParams&, cudaStream_t);
template void launch_group_reduce<__half>(const GroupReduceParams&, cudaStream_t);
template void launch_expand_rows<__half>(const ExpandRowsParams&, cudaStream_t);
template void launch_route_expert_choice<__half>(const RouteExpertChoiceParams&, cudaStream_t);
template void launch_hetero_decode_attention<__half>(const HeteroDecodeParams&, cudaStream_t);
template void launch_rope_rotate<__half>(const RopeRotateParams&, cudaStream_t);

}  // namespace mixsga::kernels
