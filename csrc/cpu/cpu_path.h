// The CPU code path this translation unit is compiled for. CMakeLists.txt compiles every CPU kernel file once per
// path, defining one of MISTRAL_EXT_CPU_PATH_AVX2 / _AVX512 (none: generic x86-64 or whatever the compiler
// targets), and cpu/dispatch.cpp picks a path at run time (the best the CPU has, or MISTRAL_EXT_CPU_PATH), so every
// machine can run, and test, each path its CPU supports.
//
// Included after every other header: the pragma gives the path's instruction set to the functions defined after it,
// that is our kernels, each in the namespace mistral_ext::<path>. Everything defined before it (torch, the standard
// library, op_checks.h) keeps the compiler's baseline, so the identical inline copies that the linker merges across
// the paths never hold an instruction the CPU may lack (tests/test_build.py checks the binary for that).
#pragma once

#if defined(MISTRAL_EXT_CPU_PATH_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define MISTRAL_EXT_CPU_PATH avx512
#elif defined(MISTRAL_EXT_CPU_PATH_AVX2)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define MISTRAL_EXT_CPU_PATH avx2
#else
#define MISTRAL_EXT_CPU_PATH generic
#endif
