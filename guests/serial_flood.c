/* serial_flood: writes bytes=N (default 65536) bytes of 'x' to the 16550A as Linux's
 * console driver does (serial_putc polls LSR): the emulated twin of virtio_console. */
#include "runtime/runtime.h"

int main(const char *cmdline) {
    (void)cmdline;
    u64 total = cmdline_u64("bytes=", 65536);
    for (u64 i = 0; i < total; i++)
        serial_putc('x');
    serial_puts("\nserial_flood sent ");
    print_u64(total);
    serial_puts("\n");
    return 0;
}
