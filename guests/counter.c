/* counter: counts in memory and prints "tick N" about every gap=CYCLES TSC cycles (default 2^27), ticks=N times
 * (default 0: forever), then exits with status 0. It also prints the guest-virtual address of
 * a banner string, so a monitor test can walk the page tables to it on the live guest. */
#include "runtime/runtime.h"

static const char banner[] = "kvmpy counter guest: the banner a monitor can find";
/* The count lives in memory, not in a register: a snapshot or migration that loses a
 * page of RAM shows as a count that jumps back. */
static volatile u64 count;

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

int main(const char *cmdline) {
    (void)cmdline;
    u64 ticks = cmdline_u64("ticks=", 0);
    u64 gap = cmdline_u64("gap=", 1ull << 27);
    serial_puts("banner at ");
    print_hex((u64)banner);
    serial_puts("\n");
    for (count = 1; ticks == 0 || count <= ticks; count++) {
        u64 start = rdtsc();
        while (rdtsc() - start < gap) {
        }
        serial_puts("tick ");
        print_u64(count);
        serial_puts("\n");
    }
    return 0;
}
