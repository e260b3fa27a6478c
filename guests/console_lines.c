/* console_lines: keeps a virtio-console busy. Writes "line N\n" to hvc0 through the
 * transmit queue, forever (or lines=N times), gap=CYCLES TSC cycles apart, checking each
 * completion: the used entry is the chain submitted and the used index moved by exactly one
 * (otherwise "console BAD" on the serial port and exit status 3). */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

static struct virtq transmit __attribute__((aligned(4096)));
static char line[32];

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static u32 format(u64 n) {
    char digits[21];
    int count = 0;
    do {
        digits[count++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    memcpy(line, "line ", 5);
    u32 length = 5;
    while (count)
        line[length++] = digits[--count];
    line[length++] = '\n';
    return length;
}

int main(const char *cmdline) {
    (void)cmdline;
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 3) || virtio_setup_queue(&dev, 1, &transmit)) {
        serial_puts("console_lines: no usable virtio-console device\n");
        return 2;
    }
    virtio_driver_ok(&dev);
    u64 lines = cmdline_u64("lines=", 0), gap = cmdline_u64("gap=", 1ull << 24);
    for (u64 n = 1; lines == 0 || n <= lines; n++) {
        u64 addr[1] = {(u64)line};
        u32 len[1] = {format(n)};
        int writable[1] = {0};
        int head = virtq_submit(&transmit, addr, len, writable, 1);
        u16 seen = transmit.used_seen;
        virtq_wait(&transmit);
        if (transmit.used.ring[seen % VQ_SIZE].id != (u32)head || transmit.used.idx != transmit.used_seen) {
            serial_puts("console BAD\n");
            return 3;
        }
        for (u64 start = rdtsc(); rdtsc() - start < gap;) {
        }
    }
    return 0;
}
