// The kernel launchers for float elements (the list: instantiate_launchers.cuh).
#include "instantiate_launchers.cuh"

MIXSGA_INSTANTIATE_LAUNCHERS(float)
