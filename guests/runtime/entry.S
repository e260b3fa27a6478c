/*
 * PVH entry for kvmpy test guests.
 *
 * The VMM (kvmpy or QEMU) starts us in 32-bit protected mode, paging off,
 * with EBX = physical address of struct hvm_start_info. We build identity
 * page tables for the first 4 GiB (2 MiB pages, user-accessible), switch to
 * long mode and call kernel_init() in C, which sets up the IDT and TSS and
 * drops to ring 3. Ring-0 code is kept short on purpose: on PVM hosts it is
 * emulated instruction by instruction.
 */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10

        .section .note.Xen, "a"
        .balign 4
        .long 4                 /* namesz: "Xen\0" */
        .long 8                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .quad pvh_start

        .section .text.entry, "ax"
        .code32
        .globl pvh_start
pvh_start:
        cli
        cld
        mov     %ebx, start_info_address
        mov     $boot_stack_top, %esp

        /* Page directories: 2048 entries of 2 MiB, present|writable|user|huge. */
        xor     %ecx, %ecx
1:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x87, %eax
        mov     %eax, page_directories(,%ecx,8)
        inc     %ecx
        cmp     $2048, %ecx
        jb      1b
        /* PDPT entries 0-3 point at the four directories; PML4[0] at the PDPT. */
        xor     %ecx, %ecx
2:      mov     %ecx, %eax
        shl     $12, %eax
        add     $page_directories, %eax
        or      $0x7, %eax
        mov     %eax, page_directory_pointers(,%ecx,8)
        inc     %ecx
        cmp     $4, %ecx
        jb      2b
        mov     $page_directory_pointers, %eax
        or      $0x7, %eax
        mov     %eax, page_map_level4

        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $page_map_level4, %eax
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx       /* EFER */
        rdmsr
        or      $0x100, %eax            /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80010001, %eax       /* PG | WP | PE */
        mov     %eax, %cr0
        lgdt    gdt_pointer
        ljmp    $KERNEL_CS, $long_mode

        .code64
long_mode:
        mov     $KERNEL_DS, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $kernel_stack_top, %rsp
        mov     start_info_address, %edi
        call    kernel_init
3:      hlt
        jmp     3b

/* enter_user(entry rdi, stack rsi, argument rdx): iretq to ring 3 with IOPL 3. */
        .globl enter_user
enter_user:
        pushq   $0x1b                   /* user data selector | RPL 3 */
        pushq   %rsi
        pushq   $0x3002                 /* IOPL 3, reserved bit 1, interrupts off */
        pushq   $0x23                   /* user code selector | RPL 3 */
        pushq   %rdi
        mov     %rdx, %rdi
        mov     $0x1b, %ax
        mov     %ax, %ds
        mov     %ax, %es
        iretq

/* Interrupt and exception stubs: push a vector (and a dummy error code where
 * the CPU pushes none), save registers, call interrupt_dispatch(frame). */
        .macro STUB vector, has_error
        .globl isr_\vector
isr_\vector:
        .if \has_error == 0
        pushq   $0
        .endif
        pushq   $\vector
        jmp     isr_common
        .endm

        STUB 0,0
        STUB 1,0
        STUB 2,0
        STUB 3,0
        STUB 4,0
        STUB 5,0
        STUB 6,0
        STUB 7,0
        STUB 8,1
        STUB 9,0
        STUB 10,1
        STUB 11,1
        STUB 12,1
        STUB 13,1
        STUB 14,1
        STUB 15,0
        STUB 16,0
        STUB 17,1
        STUB 18,0
        STUB 19,0
        STUB 20,0
        STUB 21,1
        STUB 64,0

isr_common:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rbx
        push    %rbp
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %rsp, %rdi
        call    interrupt_dispatch
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rbp
        pop     %rbx
        pop     %rdx
        pop     %rcx
        pop     %rax
        add     $16, %rsp               /* vector and error code */
        iretq

        .section .data
        .balign 16
gdt:
        .quad 0
        .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00CFF2000000FFFF        /* 0x18 user data, DPL 3 */
        .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit, DPL 3 */
        .globl gdt_tss
gdt_tss:
        .quad 0, 0                      /* 0x28 TSS, filled in by kernel_init */
gdt_end:
gdt_pointer:
        .word gdt_end - gdt - 1
        .quad gdt
        .globl start_info_address
start_info_address:
        .long 0


        .section .bss
        .balign 4096
page_map_level4:         .skip 4096
page_directory_pointers: .skip 4096
page_directories:        .skip 4 * 4096
boot_stack:              .skip 1024
boot_stack_top:
        .balign 16
kernel_stack:            .skip 16384
        .globl kernel_stack_top
kernel_stack_top:
