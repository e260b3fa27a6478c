/* Ring-0 part of the runtime: IDT, TSS, interrupts and a few services.
 * Kept minimal because ring-0 guest code is slow on PVM hosts. */
#include "runtime.h"

struct idt_entry {
    u16 offset_low, selector;
    u8 ist, type_attr;
    u16 offset_mid;
    u32 offset_high, zero;
} __attribute__((packed));

struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2, reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3, iomap_base;
    u8 io_bitmap[8192 + 1]; /* all zero: every port allowed in ring 3 */
} __attribute__((packed));

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

extern u64 gdt_tss[2];
extern char kernel_stack_top[];
extern void enter_user(void (*entry)(u64), void *stack, u64 arg) __attribute__((noreturn));
extern void guest_start(u64 start_info);
#define DECLARE(n) extern char isr_##n[];
DECLARE(0) DECLARE(1) DECLARE(2) DECLARE(3) DECLARE(4) DECLARE(5) DECLARE(6) DECLARE(7)
DECLARE(8) DECLARE(9) DECLARE(10) DECLARE(11) DECLARE(12) DECLARE(13) DECLARE(14) DECLARE(15)
DECLARE(16) DECLARE(17) DECLARE(18) DECLARE(19) DECLARE(20) DECLARE(21) DECLARE(64)


static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct tss tss __attribute__((aligned(16)));
static char user_stack[65536] __attribute__((aligned(16)));
static volatile u64 timer_ticks;

#define LAPIC 0xfee00000UL
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE 0x3e0
#define TIMER_VECTOR 64

static void set_gate(int vector, void *handler, int dpl) {
    u64 address = (u64)handler;
    idt[vector].offset_low = address & 0xffff;
    idt[vector].selector = 0x08;
    idt[vector].ist = 0;
    idt[vector].type_attr = 0x8e | (dpl << 5); /* present interrupt gate */
    idt[vector].offset_mid = (address >> 16) & 0xffff;
    idt[vector].offset_high = address >> 32;
    idt[vector].zero = 0;
}

void kernel_init(u32 start_info_address) {
    static void *exceptions[22] = {
        isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7, isr_8, isr_9, isr_10,
        isr_11, isr_12, isr_13, isr_14, isr_15, isr_16, isr_17, isr_18, isr_19, isr_20, isr_21,
    };
    for (int i = 0; i < 22; i++)
        set_gate(i, exceptions[i], 0);
    set_gate(TIMER_VECTOR, isr_64, 0);
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" : : "m"(idtr));

    u64 base = (u64)&tss, limit = sizeof(tss) - 1;
    tss.rsp0 = (u64)kernel_stack_top;
    /* IOPL 3 grants ring 3 the ports; an all-zero I/O bitmap grants them too,
     * for hypervisors (such as PVM) that consult the bitmap rather than IOPL. */
    tss.iomap_base = __builtin_offsetof(struct tss, io_bitmap);
    tss.io_bitmap[8192] = 0xff;
    gdt_tss[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
                 (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt_tss[1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(0x28));

    ring0_prelude(start_info_address);
    enter_user(guest_start, user_stack + sizeof(user_stack), start_info_address);
}

void kputs(const char *s) {
    while (*s)
        outb(COM1, *s++);
}

static void kput_hex(u64 v) {
    kputs("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        outb(COM1, "0123456789abcdef"[(v >> shift) & 0xf]);
}

long hlt_loop(long count) {
    volatile u32 *apic = (volatile u32 *)LAPIC;
    apic[LAPIC_SVR / 4] = 0x1ff;                 /* software enable, spurious vector 0xff */
    apic[LAPIC_TIMER_DIVIDE / 4] = 0xb;          /* divide by 1 */
    apic[LAPIC_LVT_TIMER / 4] = TIMER_VECTOR;    /* one-shot */
    u64 start = timer_ticks;
    for (long i = 0; i < count; i++) {
        u64 before = timer_ticks;
        apic[LAPIC_TIMER_INITIAL / 4] = 100000;
        while (timer_ticks == before)
            __asm__ volatile("sti; hlt; cli");
    }
    return (long)(timer_ticks - start);
}

void triple_fault(void) {
    struct { u16 limit; u64 base; } __attribute__((packed)) empty = { 0, 0 };
    __asm__ volatile("lidt %0; ud2" : : "m"(empty));
    __builtin_unreachable();
}

/* A guest may define ring0_prelude() to run privileged code before main():
 * it runs here, in ring 0, before the drop to ring 3. */
__attribute__((weak)) void ring0_prelude(u32 start_info_address) { (void)start_info_address; }

void interrupt_dispatch(struct frame *f) {
    if (f->vector == TIMER_VECTOR) {
        timer_ticks++;
        *(volatile u32 *)(LAPIC + LAPIC_EOI) = 0;
        return;
    }
    kputs("\nguest exception ");
    kput_hex(f->vector);
    kputs(" error ");
    kput_hex(f->error);
    kputs(" rip ");
    kput_hex(f->rip);
    kputs("\n");
    outb(DEBUG_EXIT_PORT, 200 + (u8)f->vector);
    for (;;)
        __asm__ volatile("cli; hlt");
}
