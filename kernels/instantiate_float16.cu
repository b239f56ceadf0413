// The kernel launchers for __half elements (the list: instantiate_launchers.cuh).
#include "instantiate_launchers.cuh"

MIXSGA_INSTANTIATE_LAUNCHERS(__half)
