/* rcopy_cmp.h - block compare kernels (placeholder until the native issue fills it in). */
#ifndef RCOPY_CMP_H
#define RCOPY_CMP_H
#include <stddef.h>
#include <stdint.h>

/* ABI version of this header; rcopy/native.py refuses a module of another version. */
#define RCOPY_CMP_ABI 1
int rcopy_cmp_abi(void);

#endif
