// The largest position an index tensor may hold: the host checks' bound (batch_layout.h), and the device guards' of
// kernels whose index values are not checked (cuda/attention.cu). Torch-free, for the .cu files.
#pragma once

#include <cstdint>
#include <limits>

namespace mistral_ext {

// Positions stay far below int64 overflow even after adding a chunk length.
constexpr int64_t kMaxPosition = std::numeric_limits<int64_t>::max() / 4;

}  // namespace mistral_ext
