/* hostile: attacks every device with garbage, then proves a well-behaved driver still works.
 *
 * 1. Legacy ports: random reads and writes of every size to the 16550A, the i8042, the RTC,
 *    the ACPI PM block and PCI's configuration ports (never the writes that legitimately
 *    stop the VM: debug-exit, pvpanic, i8042 or ACPI reset, the sleep enable bit).
 * 2. PCI: every virtio function's BARs moved over RAM, over each other and to garbage,
 *    its MSI-X table filled with garbage, its command register toggled; then put back.
 * 3. virtio: every common-configuration register written with every size at every offset,
 *    status bits out of order, notifications before DRIVER_OK, queues at 2^64-1 and of
 *    impossible sizes, rings scribbled with loops, huge lengths and addresses outside RAM.
 * 4. Recovery: reset virtio-blk, set it up properly and read sector 0, which the test
 *    filled with a known pattern. Exits 0 only if that read returns it.
 * seed=N changes the garbage. */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

static struct virtq queue __attribute__((aligned(4096)));
static u8 sector[512] __attribute__((aligned(512)));
static u8 header[16], status_byte;
static u64 seed = 0x9e3779b97f4a7c15UL;

static u64 next(void) {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
}

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void poke_port(u16 port) {
    u64 r = next();
    u32 value = (u32)(r >> 16);
    switch (r % 6) {
    case 0: outb(port, (u8)value); break;
    case 1: outw(port, (u16)value); break;
    case 2: outl(port, value); break;
    case 3: (void)inb(port); break;
    case 4: (void)inw(port); break;
    default: (void)inl(port); break;
    }
}

static void attack_ports(void) {
    /* ACPI PM: the event block only (0x600-0x603): any size there stays below PM1 control. */
    static const u16 ranges[][2] = {{0x3f8, 8}, {0x60, 1}, {0x70, 2}, {0x600, 1}, {0xcf8, 8}, {0x61, 1}};
    for (int round = 0; round < 2000; round++) {
        int which = (int)(next() % 6);
        poke_port((u16)(ranges[which][0] + next() % ranges[which][1]));
    }
    /* The i8042 command port and the ACPI PM control register, avoiding their stop commands. */
    for (int round = 0; round < 200; round++) {
        u8 command = (u8)next();
        if (command < 0xf0 && command != 0xd1) /* not the reset pulses, not "write output port" */
            outb(0x64, command);
        outw(0x604, (u16)(next() & ~(1u << 13))); /* never SLP_EN */
    }
}

static u32 pci_read32(int slot, int offset) {
    outl(0xcf8, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    return inl(0xcfc);
}

static void pci_write32(int slot, int offset, u32 value) {
    outl(0xcf8, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    outl(0xcfc, value);
}

static void attack_pci(int slot) {
    u32 bar0 = pci_read32(slot, 0x10), bar1 = pci_read32(slot, 0x14), command = pci_read32(slot, 4);
    volatile u32 *msix = (volatile u32 *)(u64)(bar1 & ~0xfu);
    for (int i = 0; i < 64; i++)
        msix[next() % 64] = (u32)next(); /* MSI-X table and PBA garbage */
    pci_write32(slot, 0x10, 0);           /* BAR 0 over RAM */
    pci_write32(slot, 0x14, 0x100000);    /* BAR 1 over the guest's own code */
    pci_write32(slot, 0x10, bar1);        /* BAR 0 over BAR 1 */
    pci_write32(slot, 0x10, 0xffffffff);  /* the size probe */
    (void)pci_read32(slot, 0x10);
    for (int i = 0; i < 200; i++) {
        int offset = (int)(next() % 256) & ~3;
        if (offset == 0x10 || offset == 0x14)
            continue; /* put back below */
        pci_write32(slot, offset, (u32)next());
    }
    pci_write32(slot, 0x10, bar0);
    pci_write32(slot, 0x14, bar1);
    pci_write32(slot, 4, command | 0x6);
}

static void attack_common(struct virtio_dev *dev) {
    volatile u8 *common = dev->common;
    for (int offset = 0; offset < 0x40; offset++) {
        u64 value = next();
        common[offset] = (u8)value;
        if (offset + 2 <= 0x40) *(volatile u16 *)(common + offset) = (u16)value;
        if (offset + 4 <= 0x40) *(volatile u32 *)(common + offset) = (u32)value;
        if (offset + 8 <= 0x40) *(volatile u64 *)(common + offset) = value;
        (void)*(volatile u32 *)(common + (offset & ~3));
    }
    common[20] = 4;                              /* DRIVER_OK before anything */
    *(volatile u16 *)dev->notify_base = 0;       /* a notification before DRIVER_OK */
    common[20] = 0;
    common[20] = 1 | 2;
    *(volatile u16 *)(common + 22) = 0;
    *(volatile u16 *)(common + 24) = 0xffff;     /* an impossible queue size */
    *(volatile u64 *)(common + 32) = ~0ull;      /* rings at 2^64 - 1 */
    *(volatile u64 *)(common + 40) = ~0ull - 4095;
    *(volatile u64 *)(common + 48) = 0x100000000000ull;
    *(volatile u16 *)(common + 28) = 1;          /* enable it anyway */
    common[20] = 1 | 2 | 8 | 4;
    *(volatile u16 *)dev->notify_base = 0;
}

static void scribble(struct virtio_dev *dev) {
    if (virtio_setup_queue(dev, 0, &queue))
        return;
    virtio_driver_ok(dev);
    for (int round = 0; round < 32; round++) {
        for (int i = 0; i < VQ_SIZE; i++) {
            u64 r = next();
            queue.desc[i].addr = round % 3 == 0 ? r : round % 3 == 1 ? ~0ull : 0xfffffffff000ull;
            queue.desc[i].len = (u32)(r >> 32);
            queue.desc[i].flags = (u16)(r & 7);
            queue.desc[i].next = (u16)(round % 2 ? i : (i + 1) % VQ_SIZE);
            queue.avail.ring[i] = (u16)(r >> 16);
        }
        queue.avail.idx = (u16)(next() >> 48);
        *queue.notify = 0;
    }
}

static int recover(struct virtio_dev *dev) {
    dev->common[20] = 0; /* reset: the device forgets everything the guest broke */
    if (virtio_setup_queue(dev, 0, &queue))
        return -1;
    virtio_driver_ok(dev);
    for (int i = 0; i < 16; i++) header[i] = 0; /* VIRTIO_BLK_T_IN, sector 0 */
    u64 addr[3] = {(u64)header, (u64)sector, (u64)&status_byte};
    u32 len[3] = {16, 512, 1};
    int writable[3] = {0, 1, 1};
    status_byte = 0xff;
    virtq_submit(&queue, addr, len, writable, 3);
    virtq_wait(&queue);
    static const char pattern[] = "KVMPY-HOSTILE-SECTOR";
    for (int i = 0; pattern[i]; i++)
        if (sector[i] != (u8)pattern[i])
            return -2;
    return status_byte == 0 ? 0 : -3;
}

int main(const char *cmdline) {
    (void)cmdline;
    seed ^= cmdline_u64("seed=", 1) * 0x2545f4914f6cdd1dUL;
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 2)) {
        serial_puts("hostile: no virtio-blk device\n");
        return 2;
    }
    attack_ports();
    /* A driver that finds the UART in a state it did not leave it in sets it up again:
     * 115200 8N1, no loopback (the garbage may have turned MCR's loopback on). */
    outb(0x3fb, 0x80); outb(0x3f8, 1); outb(0x3f9, 0);
    outb(0x3fb, 0x03); outb(0x3fc, 0x03); outb(0x3f9, 0); outb(0x3fa, 0x07);
    serial_puts("hostile: ports done\n");
    for (int slot = 1; slot < 8; slot++)
        if ((pci_read32(slot, 0) & 0xffff) == 0x1af4)
            attack_pci(slot);
    serial_puts("hostile: pci done\n");
    struct virtio_dev again = {0};
    if (virtio_find(&again, 2)) {
        serial_puts("hostile: virtio-blk lost after the PCI attack\n");
        return 3;
    }
    attack_common(&again);
    scribble(&again);
    serial_puts("hostile: virtio done\n");
    int result = recover(&again);
    serial_puts(result == 0 ? "hostile: recovered, sector 0 read back\n" : "hostile: recovery failed\n");
    return result == 0 ? 0 : 4;
}
