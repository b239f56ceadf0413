// Every dtype-templated kernel launcher for double elements. One translation unit per dtype keeps the
// nvcc work of a clean build to a few files that compile in parallel.
#include "grouped_kv.cuh"
#include "hetero_decode_attention.cuh"
#include "rope_rotate.cuh"
#include "routing.cuh"

namespace mixsga::kernels {

template void launch_grouped_kv_pool<double>(const GroupedKVPoolParams&, cudaStream_t);
template void launch_group_reduce<double>(const GroupReduceParams&, cudaStream_t);
template void launch_expand_rows<double>(const ExpandRowsParams&, cudaStream_t);
template void launch_route_expert_choice<double>(const RouteExpertChoiceParams&, cudaStream_t);
template void launch_hetero_decode_attention<double>(const HeteroDecodeParams&, cudaStream_t);
template void launch_rope_rotate<double>(const RopeRotateParams&, cudaStream_t);

}  // namespace mixsga::kernels
