// Lanes 0-15 wait at a warp barrier that lanes 16-31 never reach (they wait at __syncthreads, which lanes 0-15
// never reach). The emulator must report the deadlock and abort instead of hanging: a child process runs the
// kernel and this test checks that it died of SIGABRT with the report on stderr.
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <string>

#include "cuda/kernel_prelude.h"

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 32 < 16) __syncwarp();
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

int main() {
  int fds[2];
  if (pipe(fds) != 0) return 2;
  const pid_t child = fork();
  if (child == 0) {
    dup2(fds[1], STDERR_FILENO);
    float out[128];
    MX_LAUNCH(dim3(1), dim3(128), 0, nullptr, divergent_barrier_kernel)(out);
    _exit(0);  // reached only if the deadlock went unreported
  }
  close(fds[1]);
  std::string err;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) err.append(buf, n);
  int status = 0;
  waitpid(child, &status, 0);
  const bool aborted = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
  const bool reported = err.find("emu: deadlock in block (0, 0, 0)") != std::string::npos;
  std::printf("child %s; report %s\n", aborted ? "aborted" : "did not abort", reported ? "found" : "missing");
  return aborted && reported ? 0 : 1;
}
