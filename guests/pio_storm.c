/* pio_storm: exactly count=N (default 10000) accesses to port 0x80, OUT or (in=1) IN. */
#include "runtime/runtime.h"

int main(const char *cmdline) {
    (void)cmdline;
    u64 count = cmdline_u64("count=", 10000);
    if (cmdline_u64("in=", 0)) {
        for (u64 i = 0; i < count; i++)
            (void)inb(0x80);
    } else {
        for (u64 i = 0; i < count; i++)
            outb(0x80, (u8)i);
    }
    serial_puts("pio_storm done ");
    print_u64(count);
    serial_puts("\n");
    return 0;
}
