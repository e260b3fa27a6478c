/* pio_storm: exactly count=N (default 10000) accesses to port 0x80, OUT or (in=1) IN;
 * with rep=1 as string I/O (REP OUTSB / REP INSB of up to 512 bytes per instruction). */
#include "runtime/runtime.h"

static u8 buffer[512];

static void string_io(u64 count, int in) {
    for (u64 i = 0; i < sizeof buffer; i++)
        buffer[i] = (u8)i;
    while (count) {
        u64 n = count < sizeof buffer ? count : sizeof buffer;
        u64 left = n;
        u8 *p = buffer;
        if (in)
            __asm__ volatile("rep insb" : "+D"(p), "+c"(left) : "d"(0x80) : "memory");
        else
            __asm__ volatile("rep outsb" : "+S"(p), "+c"(left) : "d"(0x80) : "memory");
        count -= n;
    }
}

int main(const char *cmdline) {
    (void)cmdline;
    u64 count = cmdline_u64("count=", 10000);
    int in = (int)cmdline_u64("in=", 0);
    if (cmdline_u64("rep=", 0)) {
        string_io(count, in);
        if (in) {
            serial_puts("pio_storm read ");
            print_hex(buffer[0]);
            serial_puts(" ");
        }
    } else if (in) {
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
