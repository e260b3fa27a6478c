/* virtio_console: writes bytes=N (default 65536) bytes of 'x' to hvc0 through the
 * transmit queue in 4 KiB chains, then reports on the serial port. */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

static struct virtq transmit __attribute__((aligned(4096)));
static char chunk[4096];

int main(const char *cmdline) {
    (void)cmdline;
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 3) || virtio_setup_queue(&dev, 1, &transmit)) {
        serial_puts("virtio_console: no usable virtio-console device\n");
        return 2;
    }
    virtio_driver_ok(&dev);
    memset(chunk, 'x', sizeof(chunk));
    u64 total = cmdline_u64("bytes=", 65536), sent = 0;
    while (sent < total) {
        u32 length = total - sent < sizeof(chunk) ? (u32)(total - sent) : (u32)sizeof(chunk);
        u64 addr[1] = {(u64)chunk};
        u32 len[1] = {length};
        int writable[1] = {0};
        virtq_submit(&transmit, addr, len, writable, 1);
        virtq_wait(&transmit);
        sent += length;
    }
    serial_puts("\nvirtio_console sent ");
    print_u64(sent);
    serial_puts("\n");
    return 0;
}
