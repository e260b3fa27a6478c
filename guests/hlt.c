/* hlt: count=N (default 10) rounds of arming the local APIC timer and halting
 * until it fires, in ring 0 before main(); main() reports the wake-ups. */
#include "runtime/runtime.h"

static long requested, woke;

void ring0_prelude(u32 start_info_address) {
    const struct hvm_start_info *info = (const struct hvm_start_info *)(u64)start_info_address;
    const char *cmdline = info->cmdline_paddr ? (const char *)info->cmdline_paddr : "";
    requested = (long)parse_cmdline_u64(cmdline, "count=", 10);
    woke = hlt_loop(requested);
}

int main(const char *cmdline) {
    (void)cmdline;
    serial_puts("hlt woke ");
    print_u64((u64)woke);
    serial_puts(" times\n");
    return woke == requested ? 0 : 1;
}
