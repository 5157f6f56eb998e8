/* C11 atomics on plain 64-bit words of the shared-memory segment (fastgw/_core/shm.pyx).
 * The segment is a byte array shared by processes, so its words are declared plain and cast to
 * _Atomic at each access; lock-free 64-bit atomics are address-free, hence valid across processes.
 * Counters use relaxed ordering: they are only summed, never used to order other memory. */
#ifndef FASTGW_ATOMICS_H
#define FASTGW_ATOMICS_H
#include <stdatomic.h>
#include <stdint.h>

static inline uint64_t fg_add(uint64_t *p, uint64_t v) {
    return atomic_fetch_add_explicit((_Atomic uint64_t *)p, v, memory_order_relaxed);
}
static inline uint64_t fg_sub(uint64_t *p, uint64_t v) {
    return atomic_fetch_sub_explicit((_Atomic uint64_t *)p, v, memory_order_relaxed);
}
static inline uint64_t fg_load(uint64_t *p) {
    return atomic_load_explicit((_Atomic uint64_t *)p, memory_order_relaxed);
}
static inline void fg_store(uint64_t *p, uint64_t v) {
    atomic_store_explicit((_Atomic uint64_t *)p, v, memory_order_relaxed);
}
/* Compare-and-swap for read-modify-write updates (EWMA, later GCRA): 1 when `desired` was stored,
 * else 0 with *expected updated to the current value. */
static inline int fg_cas(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return atomic_compare_exchange_weak_explicit((_Atomic uint64_t *)p, expected, desired,
                                                 memory_order_acq_rel, memory_order_relaxed);
}
#endif
