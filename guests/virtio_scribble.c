/* virtio_scribble: a hostile guest. It sets up virtio-blk, then scribbles over its
 * own rings (descriptors pointing outside RAM, chains that loop, an available index
 * far ahead), kicks, and finally asks to exit: the VMM must survive, flag the device,
 * and still end the VM cleanly. */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

static struct virtq queue __attribute__((aligned(4096)));

int main(const char *cmdline) {
    (void)cmdline;
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 2) || virtio_setup_queue(&dev, 0, &queue)) {
        serial_puts("virtio_scribble: no virtio-blk device\n");
        return 2;
    }
    virtio_driver_ok(&dev);
    u64 seed = 0x9e3779b97f4a7c15UL;
    for (int round = 0; round < 64; round++) {
        for (int i = 0; i < VQ_SIZE; i++) {
            seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
            queue.desc[i].addr = round % 2 ? seed : 0xfffffffff000UL;
            queue.desc[i].len = (u32)(seed >> 32);
            queue.desc[i].flags = (u16)(seed & 7);
            queue.desc[i].next = (u16)i; /* every chain loops on itself */
            queue.avail.ring[i] = (u16)(seed >> 16);
        }
        queue.avail.idx = (u16)(seed >> 48);
        *queue.notify = 0;
    }
    u8 status = 0;
    for (u64 spin = 0; spin < 2000000000UL && !(status & 64); spin++) /* the back end runs asynchronously */
        status = *(volatile u8 *)(dev.common + 20);
    serial_puts("virtio_scribble: device status ");
    print_hex(status);
    serial_puts("\n");
    return (status & 64) ? 0 : 1; /* DEVICE_NEEDS_RESET must be set */
}
