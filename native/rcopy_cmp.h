/* rcopy_cmp.h - block compare kernels for rcopy (plain C, no Python.h).
 *
 * One pass over two equally long buffers OLD and NEW cut into blocks of BLOCK_SIZE bytes (the last
 * block may be short): for each block, whether it differs and, if it does, whether the NEW block is
 * all zero (so the sender can use a write-zeroes request instead of the bytes). A block that is zero
 * in both buffers is equal, hence unchanged. OLD may be NULL, meaning "compare against nothing":
 * every block differs (a full sync), and all-zero blocks of NEW are still marked.
 *
 * Kernels: 0 is the scalar reference (byte loops, obviously correct); faster kernels must give
 * exactly the same flags and are tested against it over random and edge-sized inputs. Kernel
 * RCOPY_KERNEL_AUTO picks the fastest one this CPU can run; whether the CPU can run a kernel is
 * checked at run time (cpuid), so one build serves every x86-64.
 *
 * Nothing here allocates, locks or keeps a pointer after returning: callers may run it on any thread
 * (rcopy calls it with the GIL released).
 */
#ifndef RCOPY_CMP_H
#define RCOPY_CMP_H
#include <stddef.h>
#include <stdint.h>

/* ABI version of this header; rcopy/native.py refuses a module of another version. */
#define RCOPY_CMP_ABI 4

/* Valid block sizes: powers of two in [RCOPY_BLOCK_MIN, RCOPY_BLOCK_MAX]. */
#define RCOPY_BLOCK_MIN 512
#define RCOPY_BLOCK_MAX 1048576

/* Per-block output flags. RCOPY_FLAG_ZERO is only ever set together with RCOPY_FLAG_DIFF, so a flag
 * byte is 0 (unchanged), 1 (changed data) or 3 (changed, new block all zero). */
#define RCOPY_FLAG_DIFF 1
#define RCOPY_FLAG_ZERO 2

/* Kernel ids. */
#define RCOPY_KERNEL_AUTO (-1)
#define RCOPY_KERNEL_REF 0    /* scalar byte loops: the reference */
#define RCOPY_KERNEL_WORD 1   /* libc memcmp() for equality, 64-bit words for the zero test */
#define RCOPY_KERNEL_AVX2 2   /* 256-bit vectors, 128 bytes per step; needs AVX2 */
#define RCOPY_KERNEL_COUNT 3

/* Negative return codes. */
#define RCOPY_EBLOCKSIZE (-1) /* block_size is not a power of two in [RCOPY_BLOCK_MIN, RCOPY_BLOCK_MAX] */
#define RCOPY_EFLAGS (-2)     /* the flags array is too small: nflags < rcopy_block_count(len, block_size) */
#define RCOPY_EKERNEL (-3)    /* unknown kernel id, or this CPU cannot run that kernel */
#define RCOPY_ENULL (-4)      /* NEW or FLAGS is NULL while len > 0 */
#define RCOPY_EPIECE (-5)     /* piece is 0 or not a multiple of block_size */
#define RCOPY_EIO (-6)        /* a read failed or hit end of file; details in struct rcopy_io_error */

/* Returns RCOPY_CMP_ABI of the compiled code. */
int rcopy_cmp_abi(void);

/* Number of kernel ids (RCOPY_KERNEL_COUNT). */
int rcopy_kernel_count(void);

/* Static name of a kernel ("ref", "word", "avx2"), or NULL for an unknown id. */
const char *rcopy_kernel_name(int kernel);

/* 1 if this CPU can run the kernel, 0 if not or if the id is unknown. */
int rcopy_kernel_available(int kernel);

/* The kernel RCOPY_KERNEL_AUTO resolves to on this CPU (always available). */
int rcopy_kernel_best(void);

/* 1 if block_size is valid (see RCOPY_BLOCK_MIN/MAX), else 0. */
int rcopy_block_size_valid(size_t block_size);

/* Number of blocks len bytes make, counting a short last block: ceil(len / block_size).
 * block_size must be valid (returns 0 otherwise). */
size_t rcopy_block_count(size_t len, size_t block_size);

/* Compare OLD and NEW (both len bytes; OLD may be NULL, see above) block by block and write one
 * flag byte per block to FLAGS[0 .. rcopy_block_count(len, block_size) - 1]; bytes of FLAGS past
 * that are left untouched. Buffers need no alignment.
 * Returns the number of differing blocks (>= 0), or a negative RCOPY_E* code, in which case FLAGS
 * is untouched. */
int64_t rcopy_cmp_blocks(int kernel, const uint8_t *old, const uint8_t *new_, size_t len,
                         size_t block_size, uint8_t *flags, size_t nflags);

/* Where rcopy_cmp_fds() stopped on RCOPY_EIO. */
struct rcopy_io_error {
    int err;          /* errno of the failed pread(), or 0 when the file ended early (short read) */
    int which;        /* 0: fd_old, 1: fd_new */
    uint64_t offset;  /* file offset of the failed or short pread() */
};

/* Read [offset, offset + len) of fd_old and fd_new with pread(), piece bytes at a time into buf_old
 * and buf_new (each at least piece bytes; piece a multiple of block_size, small enough to stay in
 * the CPU cache between the read and the compare), and compare each piece as rcopy_cmp_blocks() does,
 * writing the flags of the blocks of the whole range to FLAGS[0 ..]. fd_old < 0 compares against
 * nothing (buf_old unused, may be NULL). offset must be a multiple of block_size for the flags to mean
 * blocks of the file; len need not be (a short last block). Buffered I/O only: for O_DIRECT the caller
 * aligns lengths itself. Retries EINTR. Returns the number of differing blocks, RCOPY_EIO with *err
 * filled in, or another negative RCOPY_E* code; on error FLAGS is partly written. */
int64_t rcopy_cmp_fds(int kernel, int fd_old, int fd_new, uint64_t offset, size_t len,
                      size_t block_size, uint8_t *buf_old, uint8_t *buf_new, size_t piece,
                      uint8_t *flags, size_t nflags, struct rcopy_io_error *err);

/* The changed runs in FLAGS[*pos .. nflags): for each maximal run of equal non-zero flag bytes,
 * writes three numbers to RUNS: its first block, its length in blocks, its flag byte. Stops after
 * CAP runs. Returns the number of runs written and advances *pos past them, so a caller loops until
 * it returns 0 (then *pos == nflags). Skips unchanged blocks eight at a time: with 1% changed, this
 * is what keeps turning flags into extents from costing as much as the compare. */
size_t rcopy_flag_runs(const uint8_t *flags, size_t nflags, size_t *pos, uint64_t *runs, size_t cap);

/* Benchmark ceiling: memcmp() A and B block by block and nothing else. Returns the number of
 * differing blocks, or RCOPY_EBLOCKSIZE / RCOPY_ENULL. */
int64_t rcopy_bench_memcmp(const uint8_t *a, const uint8_t *b, size_t len, size_t block_size);

#endif
