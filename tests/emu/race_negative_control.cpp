// Must be reported by ThreadSanitizer (see CMakeLists.txt): the block sum without its barrier.
#include <cstdio>
#include <vector>

#include "broken_reduction.h"

int main() {
  const int blocks = 4, n = 256;
  std::vector<float> x(blocks * n, 1.0f), out(blocks);
  MX_LAUNCH(dim3(blocks), dim3(128), 0, nullptr, block_sum_kernel<true>)(x.data(), out.data(), n);
  std::printf("sums: %g %g %g %g (256 each if the race went unnoticed)\n", out[0], out[1], out[2], out[3]);
  return 0;
}
