/* hello: greets, echoes its command line, exits with status exit=N (default 0). */
#include "runtime/runtime.h"

int main(const char *cmdline) {
    serial_puts("Hello from a kvmpy test guest!\n");
    serial_puts("command line: ");
    serial_puts(cmdline);
    serial_puts("\n");
    return (int)cmdline_u64("exit=", 0);
}
