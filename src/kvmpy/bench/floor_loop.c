/* The C floor of an exit round trip: KVM_RUN in a loop, the exit reason checked, nothing else.
 *
 * Loaded by kvmpy/bench/floor_loop.py with ctypes after kvmpy built and booted the VM, so the
 * guest is set up exactly as under kvmpy and only the loop differs. Port reads answer 0 (the
 * 16550A's LSR answers "transmitter empty", so the guest's console driver goes on); a write
 * to the debug-exit port 0x501 ends the loop with the guest's status. Compiled by gcc when
 * `kvmpy bench` runs; it is no part of kvmpy's run path. */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#define DEBUG_EXIT_PORT 0x501
#define COM1_LSR 0x3fd
#define LSR_TRANSMITTER_EMPTY 0x60

/* Runs vCPU `fd` (its kvm_run page mapped at `run`) until the guest writes the debug-exit
 * port; returns the guest's status, or -errno, or -1000 - exit_reason for an exit it cannot
 * take. `*seconds` is the loop's wall time, `*cpu_seconds` its thread's CPU time (guest time
 * included: what a loaded host's scheduler does not add), `*exits` the exits it took. */
static double since(clockid_t clock, const struct timespec *began) {
    struct timespec now;
    clock_gettime(clock, &now);
    return (double)(now.tv_sec - began->tv_sec) + (double)(now.tv_nsec - began->tv_nsec) * 1e-9;
}

int kvmpy_floor_loop(int fd, struct kvm_run *run, double *seconds, double *cpu_seconds, long *exits) {
    struct timespec began, began_cpu;
    int status;
    long count = 0;
    clock_gettime(CLOCK_MONOTONIC, &began);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &began_cpu);
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            status = -errno;
            break;
        }
        count++;
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (run->io.port == DEBUG_EXIT_PORT) {
                    status = data[0];
                    break;
                }
            } else {
                memset(data, 0, (size_t)run->io.size * run->io.count);
                if (run->io.port == COM1_LSR)
                    data[0] = LSR_TRANSMITTER_EMPTY;
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0, sizeof run->mmio.data);
        } else {
            status = -1000 - (int)run->exit_reason;
            break;
        }
    }
    *cpu_seconds = since(CLOCK_THREAD_CPUTIME_ID, &began_cpu);
    *seconds = since(CLOCK_MONOTONIC, &began);
    *exits = count;
    return status;
}
