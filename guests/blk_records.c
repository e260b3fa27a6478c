/* blk_records: writes numbered records to a virtio-blk disk and reads them back, forever
 * (or records=N times), printing "record N ok" after each. Record N fills sector N modulo the
 * disk: its number, then a pattern made from it. After writing record N the guest reads it
 * back and also reads record N-1 again, so a record written before a snapshot is checked after
 * the restore. Every completion is checked too: the used entry must be the chain just
 * submitted and the used index must have moved by exactly one (no used element lost, which
 * would hang here, or repeated). Any mismatch prints "record N BAD: why" and exits 3. The
 * guest polls the used ring (no interrupts), waiting gap=CYCLES TSC cycles between records. */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

static struct virtq queue __attribute__((aligned(4096)));
static struct { u32 type, reserved; u64 sector; } header;
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status;
static u64 capacity;

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void bad(u64 n, const char *why) {
    serial_puts("record ");
    print_u64(n);
    serial_puts(" BAD: ");
    serial_puts(why);
    serial_puts("\n");
    debug_exit(3);
}

static void request(u64 n, u32 type, u64 sector) {
    header.type = type;
    header.sector = sector;
    status = 0xff;
    u64 addr[3] = {(u64)&header, (u64)data, (u64)&status};
    u32 len[3] = {16, 512, 1};
    int writable[3] = {0, type == 0, 1};
    int head = virtq_submit(&queue, addr, len, writable, 3);
    u16 seen = queue.used_seen;
    virtq_wait(&queue);
    if (queue.used.ring[seen % VQ_SIZE].id != (u32)head)
        bad(n, "the used entry is not the chain submitted");
    u16 now = *(volatile u16 *)&queue.used.idx;
    if (now != queue.used_seen) {
        serial_puts("used index ");
        print_u64(now);
        serial_puts(", seen ");
        print_u64(queue.used_seen);
        serial_puts(", before ");
        print_u64(seen);
        serial_puts("\n");
        bad(n, "the used index moved by more than one");
    }
    if (status != 0)
        bad(n, "the request failed");
}

static void fill(u64 n) {
    memcpy(data, &n, 8);
    for (int i = 8; i < 512; i++)
        data[i] = (u8)(n * 7 + i);
}

static int holds(u64 n) {
    u64 stored;
    memcpy(&stored, data, 8);
    if (stored != n)
        return 0;
    for (int i = 8; i < 512; i++)
        if (data[i] != (u8)(n * 7 + i))
            return 0;
    return 1;
}

static u64 sector_of(u64 n) { return 1 + (n - 1) % (capacity - 1); } /* sector 0 left alone */

int main(const char *cmdline) {
    (void)cmdline;
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 2) || virtio_setup_queue(&dev, 0, &queue)) {
        serial_puts("blk_records: no usable virtio-blk device\n");
        return 2;
    }
    virtio_driver_ok(&dev);
    capacity = *(volatile u64 *)dev.device_cfg;
    u64 records = cmdline_u64("records=", 0), gap = cmdline_u64("gap=", 1ull << 24);
    for (u64 n = 1; records == 0 || n <= records; n++) {
        fill(n);
        request(n, 1, sector_of(n));
        memset(data, 0, sizeof(data));
        request(n, 0, sector_of(n));
        if (!holds(n))
            bad(n, "it did not read back");
        if (n > 1 && capacity > 2) {
            request(n, 0, sector_of(n - 1));
            if (!holds(n - 1))
                bad(n, "the record before it did not read back");
        }
        serial_puts("record ");
        print_u64(n);
        serial_puts(" ok\n");
        for (u64 start = rdtsc(); rdtsc() - start < gap;) {
        }
    }
    serial_puts("records done\n");
    return 0;
}
