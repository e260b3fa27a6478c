/* A minimal ring-3 virtio-pci driver for test guests: find the device, negotiate
 * VIRTIO_F_VERSION_1 only, set up one split queue, submit chains and poll for them.
 * No interrupts: the guest polls the used ring, so the only exits are the
 * configuration accesses, and kicks go through the VMM's ioeventfd. */
#ifndef KVMPY_GUEST_VIRTIO_H
#define KVMPY_GUEST_VIRTIO_H
#include "runtime.h"

#define VQ_SIZE 16
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc { u64 addr; u32 len; u16 flags, next; };
struct virtq_avail { u16 flags, idx, ring[VQ_SIZE], used_event; };
struct virtq_used_elem { u32 id, len; };
struct virtq_used { u16 flags, idx; struct virtq_used_elem ring[VQ_SIZE]; u16 avail_event; };

struct virtq {
    struct virtq_desc desc[VQ_SIZE] __attribute__((aligned(16)));
    struct virtq_avail avail __attribute__((aligned(2)));
    struct virtq_used used __attribute__((aligned(4)));
    u16 avail_idx, used_seen;
    volatile u16 *notify;
};

struct virtio_dev {
    int slot;
    volatile u8 *common, *device_cfg;
    volatile u8 *notify_base;
    u32 notify_multiplier;
};

/* Find the virtio device of `type` (PCI device ID 0x1040 + type); 0 on success. */
int virtio_find(struct virtio_dev *dev, int type);
/* Reset, negotiate VERSION_1 and set up queue `index` on `q`; 0 on success. */
int virtio_setup_queue(struct virtio_dev *dev, int index, struct virtq *q);
void virtio_driver_ok(struct virtio_dev *dev);
/* Publish a chain of `n` buffers and kick; returns the head. */
int virtq_submit(struct virtq *q, const u64 *addr, const u32 *len, const int *writable, int n);
/* Spin until the device returns a chain; returns the length it wrote. */
u32 virtq_wait(struct virtq *q);
#endif
