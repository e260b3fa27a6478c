/* mmio_storm: exactly count=N 4-byte writes (or read=1 reads) to addr=A (default
 * 0xd0000000, unassigned in the PCI hole: a userspace exit in kvmpy and QEMU). */
#include "runtime/runtime.h"

int main(const char *cmdline) {
    (void)cmdline;
    u64 count = cmdline_u64("count=", 10000);
    u64 address = cmdline_u64("addr=", 0xd0000000UL);
    u32 sum = 0;
    if (cmdline_u64("read=", 0)) {
        for (u64 i = 0; i < count; i++)
            sum += mmio_read32(address);
    } else {
        for (u64 i = 0; i < count; i++)
            mmio_write32(address, (u32)i);
    }
    serial_puts("mmio_storm done ");
    print_u64(count);
    serial_puts(" at ");
    print_hex(address);
    serial_puts(sum ? " (reads seen)\n" : "\n");
    return 0;
}
