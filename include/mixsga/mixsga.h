#pragma once
/// Everything public of mixsga: the ops and the torch::nn modules.
#include "mixsga/checkpoint.h"
#include "mixsga/nn/attention.h"
#include "mixsga/nn/rope.h"
#include "mixsga/nn/router.h"
#include "mixsga/nn/shared_group_kv.h"
#include "mixsga/ops.h"
