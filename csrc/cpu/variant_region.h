// One CPU level of cpu/variants.h: LK_VARIANT_BODY compiled in a target region. Expects LK_ISA,
// LK_NS and LK_TARGET (the target attribute string) defined; undefines them. No include guard.
#define LK_STR_(x) #x
#define LK_PRAGMA_(x) _Pragma(LK_STR_(x))
#if defined(__clang__)
LK_PRAGMA_(clang attribute push(__attribute__((target(LK_TARGET))), apply_to = function))
#else
#pragma GCC push_options
LK_PRAGMA_(GCC target(LK_TARGET))
#endif
#include LK_VARIANT_BODY
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef LK_PRAGMA_
#undef LK_STR_
#undef LK_ISA
#undef LK_NS
#undef LK_TARGET
