/* nvme_identify: a ring-3 NVMe driver for an assigned controller (the lab's emulated QEMU
 * NVMe behind its IOMMU). Finds class 01:08:02 on bus 0, turns on memory decoding and bus
 * mastering, sets up the admin queues in guest RAM, enables the controller and sends one
 * Identify Controller command, polling its completion (no interrupts). The controller reads
 * the command and writes the 4 KiB answer by DMA to guest-physical addresses, which only
 * reach this guest's RAM because the IOMMU maps IOVA = GPA. Prints the controller's vendor,
 * serial and model; exits 0 if the command completed successfully. */
#include "runtime/runtime.h"

#define PCI_ADDRESS 0xcf8
#define PCI_DATA 0xcfc
#define QUEUE 16
#define SPIN 50000000UL

static u32 cfg_read(int slot, int offset) {
    outl(PCI_ADDRESS, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    return inl(PCI_DATA);
}

static void cfg_write(int slot, int offset, u32 value) {
    outl(PCI_ADDRESS, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    outl(PCI_DATA, value);
}

static u32 sq[QUEUE * 16] __attribute__((aligned(4096)));
static u32 cq[QUEUE * 4] __attribute__((aligned(4096)));
static u8 identify[4096] __attribute__((aligned(4096)));

static void print_text(const char *what, const u8 *bytes, int n) {
    char text[48];
    int end = n;
    while (end > 0 && (bytes[end - 1] == ' ' || bytes[end - 1] == 0))
        end--;
    for (int i = 0; i < end; i++)
        text[i] = bytes[i] >= 0x20 && bytes[i] < 0x7f ? (char)bytes[i] : '?';
    text[end] = 0;
    serial_puts(what);
    serial_puts(text);
    serial_puts("\n");
}

static int wait_ready(u64 bar, u32 want) {
    for (u64 i = 0; i < SPIN; i++) {
        u32 csts = mmio_read32(bar + 0x1c);
        if (csts & 2)
            return -1; /* controller fatal status */
        if ((csts & 1) == want)
            return 0;
    }
    return -1;
}

int main(const char *cmdline) {
    (void)cmdline;
    int slot = 0;
    while (slot < 32 && (cfg_read(slot, 8) >> 8) != 0x010802)
        slot++;
    if (slot == 32) {
        serial_puts("nvme_identify: no NVMe controller\n");
        return 2;
    }
    cfg_write(slot, 4, cfg_read(slot, 4) | 0x6); /* memory space + bus master */
    u64 bar = cfg_read(slot, 0x10) & ~0xfu;
    if ((cfg_read(slot, 0x10) & 0x6) == 0x4)
        bar |= (u64)cfg_read(slot, 0x14) << 32;
    serial_puts("nvme_identify: controller at ");
    print_hex(bar);
    serial_puts(", version ");
    print_hex(mmio_read32(bar + 0x08));
    serial_puts("\n");
    mmio_write32(bar + 0x14, 0); /* CC.EN = 0 */
    if (wait_ready(bar, 0)) {
        serial_puts("nvme_identify: controller does not stop\n");
        return 3;
    }
    mmio_write32(bar + 0x24, (QUEUE - 1) << 16 | (QUEUE - 1)); /* AQA */
    mmio_write32(bar + 0x28, (u32)(u64)sq);
    mmio_write32(bar + 0x2c, (u32)((u64)sq >> 32));
    mmio_write32(bar + 0x30, (u32)(u64)cq);
    mmio_write32(bar + 0x34, (u32)((u64)cq >> 32));
    mmio_write32(bar + 0x14, 4u << 20 | 6u << 16 | 1); /* IOCQES 16 B, IOSQES 64 B, EN */
    if (wait_ready(bar, 1)) {
        serial_puts("nvme_identify: controller does not become ready\n");
        return 4;
    }
    sq[0] = 0x06 | 1u << 16; /* Identify, command id 1 */
    sq[1] = 0;
    sq[6] = (u32)(u64)identify; /* PRP1 */
    sq[7] = (u32)((u64)identify >> 32);
    sq[10] = 1; /* CNS 1: the controller */
    u32 stride = 4u << (mmio_read32(bar + 0x04) & 0xf); /* CAP.DSTRD (bits 32-35 of CAP) */
    mmio_write32(bar + 0x1000, 1); /* admin submission queue tail */
    u64 spins = 0;
    while (!(((volatile u32 *)cq)[3] & (1u << 16)) && spins < SPIN)
        spins++;
    u32 status = (cq[3] >> 17) & 0x7fff;
    mmio_write32(bar + 0x1000 + stride, 1); /* admin completion queue head */
    if (spins == SPIN) {
        serial_puts("nvme_identify: no completion\n");
        return 5;
    }
    serial_puts("nvme_identify: status ");
    print_hex(status);
    serial_puts(", vendor ");
    print_hex((u64)identify[0] | (u64)identify[1] << 8);
    serial_puts("\n");
    print_text("nvme_identify: serial ", identify + 4, 20);
    print_text("nvme_identify: model ", identify + 24, 40);
    mmio_write32(bar + 0x14, 0);
    return status == 0 ? 0 : 6;
}
