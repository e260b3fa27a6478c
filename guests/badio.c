/* badio: reads an unassigned port and an unassigned MMIO address and prints what came back. */
#include "runtime/runtime.h"

int main(const char *cmdline) {
    (void)cmdline;
    u32 port = inl(0x1234);
    outb(0x1234, 0x42);
    u32 mmio = mmio_read32(0xd0001000UL);
    serial_puts("port 0x1234 read ");
    print_hex(port);
    serial_puts("\nmmio 0xd0001000 read ");
    print_hex(mmio);
    serial_puts("\n");
    return 0;
}
