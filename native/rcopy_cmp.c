#include "rcopy_cmp.h"

int rcopy_cmp_abi(void) { return RCOPY_CMP_ABI; }
