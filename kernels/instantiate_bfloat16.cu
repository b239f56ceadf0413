// The kernel launchers for __nv_bfloat16 elements (the list: instantiate_launchers.cuh).
#include "instantiate_launchers.cuh"

MIXSGA_INSTANTIATE_LAUNCHERS(__nv_bfloat16)
