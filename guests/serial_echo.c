/* serial_echo: reads the 16550A by polling LSR and echoes each line back as "echo: LINE";
 * a line "quit" ends the guest with status 7. Exercises console input end to end. */
#include "runtime/runtime.h"

#define COM1_LSR (COM1 + 5)
#define LSR_DATA_READY 0x01

static char read_char(void) {
    while (!(inb(COM1_LSR) & LSR_DATA_READY))
        ;
    return (char)inb(COM1);
}

int main(const char *cmdline) {
    (void)cmdline;
    char line[128];
    serial_puts("serial_echo ready\n");
    for (;;) {
        size_t n = 0;
        for (char c = read_char(); c != '\n' && c != '\r'; c = read_char())
            if (n < sizeof line - 1)
                line[n++] = c;
        line[n] = 0;
        if (n == 4 && line[0] == 'q' && line[1] == 'u' && line[2] == 'i' && line[3] == 't')
            return 7;
        serial_puts("echo: ");
        serial_puts(line);
        serial_puts("\n");
    }
}
