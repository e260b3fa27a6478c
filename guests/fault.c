/* fault: triple-faults on purpose (an empty IDT, then ud2 in ring 0). */
#include "runtime/runtime.h"

void ring0_prelude(u32 start_info_address) {
    (void)start_info_address;
    kputs("about to triple fault\n");
    triple_fault();
}

int main(const char *cmdline) {
    (void)cmdline;
    serial_puts("fault: the triple fault did not happen\n");
    return 1;
}
