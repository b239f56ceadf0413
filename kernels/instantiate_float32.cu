// Every dtype-templated kernel launcher for float elements. One translation unit per dtype keeps the
// nvcc work of a clean build to a few files that compile in parallel.
#include "grouped_kv.cuh"
#include "hetero_decode_attention.cuh"
#include "rope_rotate.cuh"
#include "routing.cuh"

namespace mixsga::kernels {

template void launch_grouped_kv_pool<float>(const GroupedKVPoolParams&, cudaStream_t);
template void launch_group_reduce<float>(const GroupReduceParams&, cudaStream_t);
template void launch_expand_rows<float>(const ExpandRowsParams&, cudaStream_t);
template void launch_route_expert_choice<float>(const RouteExpertChoiceParams&, cudaStream_t);
template void launch_hetero_decode_attention<float>(const HeteroDecodeParams&, cudaStream_t);
template void launch_rope_rotate<float>(const RopeRotateParams&, cudaStream_t);

}  // namespace mixsga::kernels
