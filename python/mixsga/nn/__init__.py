"""mixSGA layers as plain torch.nn.Modules over torch.ops.mixsga.* (traceable by torch.compile).

Same names, constructor arguments, parameter names and shapes as the C++ modules in mixsga::nn."""

from .attention import MixSGAAttention, MixSGAOutput, RoutingAgreement
from .functional import apply_rope
from .router import ExpertChoiceRouter
from .shared_group_kv import SharedGroupKV, clear_kv_weight_cache, pool_kv_weight, pooling_error

__all__ = [
    "ExpertChoiceRouter",
    "MixSGAAttention",
    "MixSGAOutput",
    "RoutingAgreement",
    "SharedGroupKV",
    "apply_rope",
    "clear_kv_weight_cache",
    "pool_kv_weight",
    "pooling_error",
]
