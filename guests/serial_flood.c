/* serial_flood: writes bytes=N (default 65536) bytes of 'x' to the 16550A as Linux's
 * console driver does, reading LSR until THR is empty before each byte: the emulated
 * twin of virtio_console. */
#include "runtime/runtime.h"

#define COM1_LSR (COM1 + 5)
#define LSR_THRE 0x20

static void putc_polled(char c) {
    while (!(inb(COM1_LSR) & LSR_THRE))
        ;
    outb(COM1, (u8)c);
}

int main(const char *cmdline) {
    (void)cmdline;
    u64 total = cmdline_u64("bytes=", 65536);
    for (u64 i = 0; i < total; i++)
        putc_polled('x');
    serial_puts("\nserial_flood sent ");
    print_u64(total);
    serial_puts("\n");
    return 0;
}
