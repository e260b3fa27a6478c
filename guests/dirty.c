/* dirty: writes rate=R MiB/s (default 16; 0 for none) of pages across mib=M MiB (default 64) of
 * RAM above the image, one 8-byte store per 4 KiB page, cycling, and prints "tick N" every
 * 100 ms, ticks=N times (default 0: forever). The pace comes from the TSC, whose frequency the
 * host passes as tsc_khz= (KVM_GET_TSC_KHZ): a migration benchmark needs a guest that dirties
 * memory at a rate it knows, under kvmpy and QEMU alike. */
#include "runtime/runtime.h"

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static int is_ram(u64 start, u64 end) {
    const struct hvm_start_info *info = start_info();
    const struct hvm_memmap_entry *map = (const struct hvm_memmap_entry *)info->memmap_paddr;
    for (u32 i = 0; i < info->memmap_entries; i++)
        if (map[i].type == 1 && map[i].addr <= start && end <= map[i].addr + map[i].size)
            return 1;
    return 0;
}

int main(const char *cmdline) {
    (void)cmdline;
    u64 rate = cmdline_u64("rate=", 16);
    u64 mib = cmdline_u64("mib=", 64);
    u64 khz = cmdline_u64("tsc_khz=", 0);
    u64 ticks = cmdline_u64("ticks=", 0);
    u64 start = ((u64)_end + 0x1fffff) & ~0x1fffffUL;
    u64 pages = mib << 8;
    if (khz == 0 || pages == 0) {
        serial_puts("dirty: needs tsc_khz= and mib= above 0\n");
        return 2;
    }
    if (!is_ram(start, start + (mib << 20))) {
        serial_puts("dirty: not enough RAM for ");
        print_u64(mib);
        serial_puts(" MiB\n");
        return 2;
    }
    serial_puts("dirty ");
    print_u64(rate);
    serial_puts(" MiB/s over ");
    print_u64(mib);
    serial_puts(" MiB\n");
    u64 began = rdtsc();
    u64 tick_cycles = khz * 100;
    u64 next_tick = tick_cycles;
    u64 written = 0;
    for (u64 tick = 1; ticks == 0 || tick <= ticks;) {
        u64 elapsed = rdtsc() - began;
        u64 due = elapsed * rate * 256 / (khz * 1000); /* pages owed so far at rate MiB/s */
        for (; written < due; written++)
            *(volatile u64 *)(start + (written % pages) * 4096) = written;
        if (elapsed >= next_tick) {
            serial_puts("tick ");
            print_u64(tick++);
            serial_puts("\n");
            next_tick = elapsed + tick_cycles; /* no burst of ticks after a stall */
        }
    }
    return 0;
}
