/* Ring-3 part of the runtime: serial output, command line, debug-exit. */
#include "runtime.h"

static const struct hvm_start_info *info;
static const char *command_line = "";

void serial_putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE: the holding register is free */
        ;
    outb(COM1, (u8)c);
}

void serial_puts(const char *s) {
    while (*s)
        serial_putc(*s++);
}

void print_u64(u64 v) {
    char buffer[21];
    int i = 20;
    buffer[i] = 0;
    do {
        buffer[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    serial_puts(buffer + i);
}

void print_hex(u64 v) {
    serial_puts("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        serial_putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

void debug_exit(u8 code) {
    outb(DEBUG_EXIT_PORT, code);
    for (;;)
        ; /* the VMM stops us; under QEMU without the device, spin */
}

const char *cmdline(void) { return command_line; }
const struct hvm_start_info *start_info(void) { return info; }

static int starts_with(const char *s, const char *prefix) {
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

u64 cmdline_u64(const char *key, u64 fallback) { return parse_cmdline_u64(command_line, key, fallback); }

u64 parse_cmdline_u64(const char *command_line, const char *key, u64 fallback) {
    const char *s = command_line;
    while (*s) {
        if ((s == command_line || s[-1] == ' ') && starts_with(s, key)) {
            s += strlen(key);
            u64 value = 0, base = 10;
            if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
                base = 16;
                s += 2;
            }
            for (;; s++) {
                int digit;
                if (*s >= '0' && *s <= '9') digit = *s - '0';
                else if (base == 16 && *s >= 'a' && *s <= 'f') digit = *s - 'a' + 10;
                else if (base == 16 && *s >= 'A' && *s <= 'F') digit = *s - 'A' + 10;
                else break;
                value = value * base + (u64)digit;
            }
            return value;
        }
        s++;
    }
    return fallback;
}

void *memset(void *d, int c, size_t n) {
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

void guest_start(u64 start_info_address) {
    info = (const struct hvm_start_info *)start_info_address;
    if (info && info->magic == 0x336ec578 && info->cmdline_paddr)
        command_line = (const char *)info->cmdline_paddr;
    debug_exit((u8)main(command_line));
}
