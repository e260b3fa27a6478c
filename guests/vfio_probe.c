/* vfio_probe: a ring-3 driver for the assigned function kvmpy's fake VFIO device plays
 * (vendor 1b36, device 0010). Finds it on bus 0, prints its capability IDs and BARs,
 * turns on memory decoding and bus mastering, writes words=N words into BAR0 (a KVM
 * memory slot over the device's mapping: no exits) and one into BAR4 (forwarded by
 * kvmpy), reads back what the host put at BAR0+0x1000, programs MSI-X vector 0 through
 * the trapped table, and enables MSI-X. With move=ADDR it then moves BAR0 there and writes
 * 16 words at offset 0x800 again. */
#include "runtime/runtime.h"

#define PCI_ADDRESS 0xcf8
#define PCI_DATA 0xcfc

static u32 cfg_read(int slot, int offset) {
    outl(PCI_ADDRESS, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    return inl(PCI_DATA) >> (8 * (offset & 3));
}

static void cfg_write(int slot, int offset, u32 value) {
    outl(PCI_ADDRESS, 0x80000000u | (u32)slot << 11 | (u32)(offset & 0xfc));
    outl(PCI_DATA, value);
}

static void say(const char *what, u64 value) {
    serial_puts(what);
    print_hex(value);
    serial_puts("\n");
}

int main(const char *cmdline) {
    (void)cmdline;
    int slot = 0;
    while (slot < 32 && cfg_read(slot, 0) != (0x1b36u | 0x0010u << 16))
        slot++;
    if (slot == 32) {
        serial_puts("vfio_probe: no assigned function\n");
        return 2;
    }
    say("slot ", (u64)slot);
    int msix = 0;
    serial_puts("caps");
    for (int cap = cfg_read(slot, 0x34) & 0xff, n = 0; cap && n < 48; cap = cfg_read(slot, cap + 1) & 0xff, n++) {
        serial_puts(" ");
        print_hex(cfg_read(slot, cap) & 0xff);
        if ((cfg_read(slot, cap) & 0xff) == 0x11)
            msix = cap;
    }
    serial_puts("\n");
    u64 bar0 = cfg_read(slot, 0x10) & ~0xfu, bar4 = cfg_read(slot, 0x20) & ~0xfu;
    say("bar0 ", bar0);
    say("bar4 ", bar4);
    cfg_write(slot, 4, cfg_read(slot, 4) | 0x6); /* memory space + bus master */
    u64 words = cmdline_u64("words=", 1024);
    for (u64 i = 0; i < words && i < 1024; i++)
        mmio_write32(bar0 + 4 * i, 0x5a000000u | (u32)i);
    mmio_write32(bar4 + 0x20, 0xcafef00du);
    say("host wrote ", mmio_read32(bar0 + 0x1000 + 4 * 1023));
    say("bar4 reads ", mmio_read32(bar4 + 0x20));
    if (msix) {
        u64 table = bar0 + (cfg_read(slot, msix + 4) & ~7u);
        mmio_write32(table, 0xfee00000u);
        mmio_write32(table + 4, 0);
        mmio_write32(table + 8, 0x41);
        mmio_write32(table + 12, 0);
        cfg_write(slot, msix, (cfg_read(slot, msix) & 0xffff) | 0x8000u << 16); /* MSI-X enable */
        say("msix data ", mmio_read32(table + 8));
    }
    u64 move = cmdline_u64("move=", 0);
    if (move) {
        cfg_write(slot, 4, cfg_read(slot, 4) & ~0x2u); /* decoding off while the BAR moves */
        cfg_write(slot, 0x10, (u32)move);
        cfg_write(slot, 0x14, (u32)(move >> 32));
        cfg_write(slot, 4, cfg_read(slot, 4) | 0x2u);
        for (u64 i = 0; i < 16; i++)
            mmio_write32(move + 0x800 + 4 * i, 0x77000000u | (u32)i);
        say("moved reads ", mmio_read32(move + 0x800 + 4 * 15));
    }
    serial_puts("vfio_probe done\n");
    return 0;
}
