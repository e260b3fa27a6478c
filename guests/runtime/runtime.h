/* The kvmpy test-guest runtime: what a guest's main() can use (ring 3, IOPL 3). */
#ifndef KVMPY_GUEST_RUNTIME_H
#define KVMPY_GUEST_RUNTIME_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0x501

/* struct hvm_start_info and its memory map (Xen's PVH boot ABI). */
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }

/* Serial output on COM1, as Linux's console driver does it: LSR is read until THR
 * is empty, then the byte is written. kvmpy has KVM buffer THR writes in its
 * coalesced ring, so a byte costs one exit (the LSR read), which also delivers
 * the bytes buffered before it. */
void serial_putc(char c);
void serial_puts(const char *s);
void print_u64(u64 v);
void print_hex(u64 v);

/* Stop the VM: kvmpy exits with `code`, QEMU with (code << 1) | 1. */
void debug_exit(u8 code) __attribute__((noreturn));

/* "key=value" lookups in the command line (keys include the '=', e.g. "count="). */
u64 cmdline_u64(const char *key, u64 fallback);
const char *cmdline(void);
const struct hvm_start_info *start_info(void);

/* Ring 0. A guest that needs privileged instructions defines ring0_prelude(),
 * which the runtime calls in ring 0 before main() (privileged instructions are
 * not available from ring 3, and PVM hosts reflect them from SYSCALL-entered
 * code back to the guest, so the prelude is the one place for them). */
void ring0_prelude(u32 start_info_address);
long hlt_loop(long count);            /* arm the LAPIC timer and hlt, count times */
void triple_fault(void) __attribute__((noreturn));
void kputs(const char *s);            /* serial output usable in ring 0 */
u64 parse_cmdline_u64(const char *cmdline, const char *key, u64 fallback);

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
size_t strlen(const char *s);

extern char _end[];

/* Each guest provides this; its return value is the debug-exit status. */
int main(const char *cmdline);

#endif
