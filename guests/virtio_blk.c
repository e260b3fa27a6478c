/* virtio_blk: a ring-3 virtio-blk driver. Reads sector 3 (the test disk has byte i
 * in every byte of sector i), writes 0xa5 over sector 5, flushes, then does
 * reads=N more reads of sector 3 (for exit counting). With tolerate=1 a failed read of
 * the loop is counted instead of ending the guest, the loop goes on until the disk works
 * again, and the last line says how many failed (a disk whose back end goes away and comes
 * back). */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

static struct virtq queue __attribute__((aligned(4096)));
static struct { u32 type, reserved; u64 sector; } header;
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status;

static int request(u32 type, u64 sector, int write_data) {
    header.type = type;
    header.sector = sector;
    status = 0xff;
    u64 addr[3] = {(u64)&header, (u64)data, (u64)&status};
    u32 len[3] = {16, 512, 1};
    int writable[3] = {0, !write_data, 1};
    if (type == 4) { /* flush: no data */
        addr[1] = (u64)&status;
        len[1] = 1;
        writable[1] = 1;
        virtq_submit(&queue, addr, len, writable, 2);
    } else {
        virtq_submit(&queue, addr, len, writable, 3);
    }
    virtq_wait(&queue);
    return status;
}

int main(const char *cmdline) {
    (void)cmdline;
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 2) || virtio_setup_queue(&dev, 0, &queue)) {
        serial_puts("virtio_blk: no usable virtio-blk device\n");
        return 2;
    }
    virtio_driver_ok(&dev);
    if (request(0, 3, 0) != 0)
        return 3;
    for (int i = 0; i < 512; i++)
        if (data[i] != 3) {
            serial_puts("virtio_blk: sector 3 has wrong contents\n");
            return 4;
        }
    memset(data, 0xa5, sizeof(data));
    if (request(1, 5, 1) != 0 || request(4, 0, 0) != 0)
        return 5;
    u64 reads = cmdline_u64("reads=", 0), tolerate = cmdline_u64("tolerate=", 0), failed = 0, since = 0;
    /* With tolerate=1 the loop also goes on until 100 reads in a row succeeded after a failure:
     * a failing read is quick, and the guest must not finish before its disk is back. */
    for (u64 i = 0; i < reads || (tolerate && failed && since < 100); i++) {
        if (request(0, 3, 0) == 0) {
            since++;
            continue;
        }
        if (!tolerate)
            return 6;
        since = 0;
        if (failed++ == 0)
            serial_puts("virtio_blk: a read failed\n");
    }
    if (tolerate && request(0, 3, 0) != 0) /* the disk works again at the end */
        return 7;
    u64 capacity = *(volatile u64 *)dev.device_cfg;
    serial_puts("virtio_blk ok, capacity ");
    print_u64(capacity);
    serial_puts(" sectors");
    if (tolerate) {
        serial_puts(", failed reads ");
        print_u64(failed);
    }
    serial_puts("\n");
    return 0;
}
