/* Ring-3 virtio-pci driver for test guests (see virtio.h). */
#include "virtio.h"

#define PCI_ADDRESS 0xcf8
#define PCI_DATA 0xcfc

static u32 pci_read32(int slot, int offset) {
    outl(PCI_ADDRESS, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    return inl(PCI_DATA);
}

static void pci_write32(int slot, int offset, u32 value) {
    outl(PCI_ADDRESS, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    outl(PCI_DATA, value);
}

static u8 pci_read8(int slot, int offset) { return (u8)(pci_read32(slot, offset) >> (8 * (offset & 3))); }

int virtio_find(struct virtio_dev *dev, int type) {
    for (int slot = 0; slot < 32; slot++) {
        if (pci_read32(slot, 0) != (0x1af4u | (u32)(0x1040 + type) << 16))
            continue;
        dev->slot = slot;
        pci_write32(slot, 4, pci_read32(slot, 4) | 0x6); /* memory space + bus master */
        u64 bar0 = pci_read32(slot, 0x10) & ~0xfu;
        for (int cap = pci_read8(slot, 0x34); cap; cap = pci_read8(slot, cap + 1)) {
            if (pci_read8(slot, cap) != 0x09)
                continue;
            int kind = pci_read8(slot, cap + 3);
            u64 where = bar0 + pci_read32(slot, cap + 8);
            if (kind == 1) dev->common = (volatile u8 *)where;
            if (kind == 4) dev->device_cfg = (volatile u8 *)where;
            if (kind == 2) {
                dev->notify_base = (volatile u8 *)where;
                dev->notify_multiplier = pci_read32(slot, cap + 16);
            }
        }
        return dev->common && dev->notify_base ? 0 : -1;
    }
    return -1;
}

#define C8(off) (*(volatile u8 *)(dev->common + (off)))
#define C16(off) (*(volatile u16 *)(dev->common + (off)))
#define C32(off) (*(volatile u32 *)(dev->common + (off)))
#define C64(off) (*(volatile u64 *)(dev->common + (off)))

int virtio_setup_queue(struct virtio_dev *dev, int index, struct virtq *q) {
    if (C8(20) == 0) { /* first queue: reset and negotiate */
        C8(20) = 1 | 2; /* ACKNOWLEDGE | DRIVER */
        C32(8) = 1;
        C32(12) = 1; /* VIRTIO_F_VERSION_1 (bit 32) and nothing else */
        C32(8) = 0;
        C32(12) = 0;
        C8(20) = 1 | 2 | 8; /* FEATURES_OK */
        if (!(C8(20) & 8))
            return -1;
    }
    memset(q, 0, sizeof(*q));
    C16(22) = (u16)index;
    C16(24) = VQ_SIZE;
    C64(32) = (u64)q->desc;
    C64(40) = (u64)&q->avail;
    C64(48) = (u64)&q->used;
    C16(28) = 1;
    q->notify = (volatile u16 *)(dev->notify_base + C16(30) * dev->notify_multiplier);
    return C16(28) == 1 ? 0 : -1;
}

void virtio_driver_ok(struct virtio_dev *dev) { C8(20) = 1 | 2 | 8 | 4; }

int virtq_submit(struct virtq *q, const u64 *addr, const u32 *len, const int *writable, int n) {
    int head = (q->avail_idx * n) % VQ_SIZE; /* chains of a fixed length n reuse slots in turn */
    for (int i = 0; i < n; i++) {
        int d = (head + i) % VQ_SIZE;
        q->desc[d].addr = addr[i];
        q->desc[d].len = len[i];
        q->desc[d].flags = (u16)((writable[i] ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        q->desc[d].next = (u16)((d + 1) % VQ_SIZE);
    }
    q->avail.ring[q->avail_idx % VQ_SIZE] = (u16)head;
    __asm__ volatile("" ::: "memory");
    q->avail.idx = ++q->avail_idx;
    __asm__ volatile("mfence" ::: "memory");
    *q->notify = 0; /* the queue index; the VMM's ioeventfd takes it without an exit */
    return head;
}

u32 virtq_wait(struct virtq *q) {
    while (*(volatile u16 *)&q->used.idx == q->used_seen)
        __asm__ volatile("pause");
    u32 len = q->used.ring[q->used_seen % VQ_SIZE].len;
    q->used_seen++;
    return len;
}
