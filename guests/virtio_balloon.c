/* virtio_balloon: a ring-3 virtio-balloon driver. Writes every page of mib=N MiB above the
 * image, then hands the device as many of those pages as its target asks (num_pages, 4 KiB
 * pages) on the inflate queue and says so in `actual`. With deflate=1 it then takes them all
 * back on the deflate queue and writes them again. Prints the pages it inflated and whether
 * the pages read back as zeros after inflating (the host freed them) and as written after
 * deflating. With changes=N it then follows the target as the host changes it (polling the
 * configuration, as it has no interrupts), inflating or deflating to match, N times. */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

#define BATCH 256

static struct virtq inflate_queue __attribute__((aligned(4096)));
static struct virtq deflate_queue __attribute__((aligned(4096)));
static u32 frames[BATCH];

static void give(struct virtq *q, u64 start, u64 pages) {
    for (u64 done = 0; done < pages;) {
        u32 n = pages - done < BATCH ? (u32)(pages - done) : BATCH;
        for (u32 i = 0; i < n; i++)
            frames[i] = (u32)((start + (done + i) * 4096) >> 12);
        u64 addr[1] = {(u64)frames};
        u32 len[1] = {4 * n};
        int writable[1] = {0};
        virtq_submit(q, addr, len, writable, 1);
        virtq_wait(q);
        done += n;
    }
}

int main(const char *cmdline) {
    (void)cmdline;
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 5) || virtio_setup_queue(&dev, 0, &inflate_queue) ||
        virtio_setup_queue(&dev, 1, &deflate_queue)) {
        serial_puts("virtio_balloon: no usable virtio-balloon device\n");
        return 2;
    }
    virtio_driver_ok(&dev);
    u64 mib = cmdline_u64("mib=", 32), deflate = cmdline_u64("deflate=", 0);
    u64 start = ((u64)_end + 0x1fffff) & ~0x1fffffUL, pages = mib << 8;
    for (u64 page = 0; page < pages; page++)
        *(volatile u8 *)(start + page * 4096) = 0x5a;
    u64 target = *(volatile u32 *)dev.device_cfg;
    u64 inflated = target < pages ? target : pages;
    give(&inflate_queue, start, inflated);
    *(volatile u32 *)(dev.device_cfg + 4) = (u32)inflated;
    int zeros = 1;
    for (u64 page = 0; page < inflated; page++)
        zeros &= *(volatile u8 *)(start + page * 4096) == 0;
    serial_puts("virtio_balloon inflated ");
    print_u64(inflated);
    serial_puts(zeros ? " pages, zeros\n" : " pages, not zeros\n");
    for (u64 change = 0, wanted = cmdline_u64("changes=", 0); change < wanted; change++) {
        u64 now;
        while ((now = *(volatile u32 *)dev.device_cfg) == target)
            __asm__ volatile("pause");
        target = now;
        u64 goal = target < pages ? target : pages;
        if (goal > inflated)
            give(&inflate_queue, start + inflated * 4096, goal - inflated);
        else
            give(&deflate_queue, start + goal * 4096, inflated - goal);
        inflated = goal;
        *(volatile u32 *)(dev.device_cfg + 4) = (u32)inflated;
        serial_puts("virtio_balloon now ");
        print_u64(inflated);
        serial_puts(" pages\n");
    }
    if (deflate) {
        give(&deflate_queue, start, inflated);
        *(volatile u32 *)(dev.device_cfg + 4) = 0;
        for (u64 page = 0; page < pages; page++)
            *(volatile u8 *)(start + page * 4096) = 0x5a;
        int kept = 1;
        for (u64 page = 0; page < pages; page++)
            kept &= *(volatile u8 *)(start + page * 4096) == 0x5a;
        serial_puts(kept ? "virtio_balloon deflated, pages written again\n" : "virtio_balloon deflated, lost\n");
    }
    return 0;
}
