/* memtouch: writes then verifies one byte per 4 KiB page of mib=N MiB (default 64)
 * of RAM above the image, checking the PVH memory map says it is RAM. */
#include "runtime/runtime.h"

int main(const char *cmdline) {
    (void)cmdline;
    u64 mib = cmdline_u64("mib=", 64);
    u64 start = ((u64)_end + 0x1fffff) & ~0x1fffffUL;
    u64 end = start + (mib << 20);
    const struct hvm_start_info *info = start_info();
    const struct hvm_memmap_entry *map = (const struct hvm_memmap_entry *)info->memmap_paddr;
    int ok = 0;
    for (u32 i = 0; i < info->memmap_entries; i++)
        if (map[i].type == 1 && map[i].addr <= start && end <= map[i].addr + map[i].size)
            ok = 1;
    if (!ok) {
        serial_puts("memtouch: not enough RAM for ");
        print_u64(mib);
        serial_puts(" MiB\n");
        return 2;
    }
    for (u64 page = start; page < end; page += 4096)
        *(volatile u8 *)page = (u8)(page >> 12);
    for (u64 page = start; page < end; page += 4096)
        if (*(volatile u8 *)page != (u8)(page >> 12)) {
            serial_puts("memtouch: mismatch at ");
            print_hex(page);
            serial_puts("\n");
            return 1;
        }
    serial_puts("memtouch ok ");
    print_u64(mib);
    serial_puts(" MiB\n");
    return 0;
}
