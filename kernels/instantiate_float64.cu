// The kernel launchers for double elements (the list: instantiate_launchers.cuh).
#include "instantiate_launchers.cuh"

MIXSGA_INSTANTIATE_LAUNCHERS(double)
