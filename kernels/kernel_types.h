#pragma once
// Types and limits shared by every kernel's params and by the code that fills them. Torch-free.
namespace mixsga::kernels {

/// The floating element types the kernels are instantiated for (one instantiation file each).
enum class ScalarKind { kFloat32, kFloat64, kBFloat16, kFloat16 };

/// Largest number of experts the CUDA kernels take: per-expert ratios, group sizes and pools travel
/// by value in the params structs.
inline constexpr int kMaxExperts = 16;

}  // namespace mixsga::kernels
