/* kvmpy-bench: the guest side of the lab benchmarks, a static Linux program that
 * the bench image carries in its initramfs. Each mode prints one line
 * "BENCH key=value ..." that the host parses; figures are measured in the guest
 * with CLOCK_MONOTONIC, so both VMMs are timed by the same clock.
 *
 *   kvmpy-bench blk-read DEV MIB        sequential 1 MiB O_DIRECT reads
 *   kvmpy-bench blk-write DEV MIB       sequential 1 MiB O_DIRECT writes, then fsync
 *   kvmpy-bench blk-randread DEV OPS    4 KiB O_DIRECT reads at random offsets
 *   kvmpy-bench tcp-send IP PORT MIB    bytes to a host sink
 *   kvmpy-bench tcp-recv IP PORT MIB    bytes from a host source
 *   kvmpy-bench tcp-rr IP PORT N        1-byte request/response round trips
 *   kvmpy-bench forkexec N              fork + exec(/bin/true) + wait, N times
 *   kvmpy-bench mmap N MIB              mmap, touch every page, munmap, N times
 *   kvmpy-bench tlb MIB N               N dependent random reads over a MIB buffer
 *   kvmpy-bench console PATH KIB        KIB KiB of text lines written to a console device
 *   kvmpy-bench vsock-echo PORT N       listen on AF_VSOCK PORT, echo N connections to their EOF
 *   kvmpy-bench fs-write PATH MIB       a file written in 1 MiB writes, then fsync
 *   kvmpy-bench fs-read PATH MIB        a file read in 1 MiB reads
 *   kvmpy-bench fs-meta DIR N           N small files created, stat'ed and removed in DIR
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define MIB (1024L * 1024L)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static uint64_t next_random(uint64_t *state) { /* xorshift64 */
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

static void *aligned_buffer(size_t size) {
    void *buffer;
    if (posix_memalign(&buffer, 4096, size))
        die("posix_memalign");
    memset(buffer, 0x5a, size);
    return buffer;
}

static int blk_sequential(const char *device, long mib, int writing) {
    int fd = open(device, (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        die(device);
    char *buffer = aligned_buffer(MIB);
    double start = now();
    for (long i = 0; i < mib; i++) {
        ssize_t done = writing ? pwrite(fd, buffer, MIB, i * MIB) : pread(fd, buffer, MIB, i * MIB);
        if (done != MIB)
            die(writing ? "pwrite" : "pread");
    }
    if (writing && fsync(fd))
        die("fsync");
    double seconds = now() - start;
    printf("BENCH %s mib=%ld seconds=%.6f mbps=%.2f\n", writing ? "blk-write" : "blk-read", mib, seconds,
           mib / seconds * MIB / 1e6);
    return 0;
}

static int blk_random_read(const char *device, long ops) {
    int fd = open(device, O_RDONLY | O_DIRECT);
    if (fd < 0)
        die(device);
    off_t size = lseek(fd, 0, SEEK_END);
    long blocks = size / 4096;
    if (blocks <= 0)
        die("device size");
    char *buffer = aligned_buffer(4096);
    uint64_t state = 88172645463325252ULL;
    double start = now();
    for (long i = 0; i < ops; i++)
        if (pread(fd, buffer, 4096, (off_t)(next_random(&state) % blocks) * 4096) != 4096)
            die("pread");
    double seconds = now() - start;
    printf("BENCH blk-randread ops=%ld seconds=%.6f iops=%.1f\n", ops, seconds, ops / seconds);
    return 0;
}

static int tcp_connect(const char *ip, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || inet_pton(AF_INET, ip, &address.sin_addr) != 1)
        die("socket");
    for (int attempt = 0; connect(fd, (struct sockaddr *)&address, sizeof address); attempt++) {
        if (attempt == 50)
            die("connect");
        usleep(100000);
    }
    return fd;
}

static int tcp_stream(const char *ip, int port, long mib, int sending) {
    int fd = tcp_connect(ip, port);
    char *buffer = aligned_buffer(MIB);
    long total = mib * MIB, moved = 0;
    double start = now();
    while (moved < total) {
        long chunk = total - moved < MIB ? total - moved : MIB;
        ssize_t done = sending ? write(fd, buffer, chunk) : read(fd, buffer, chunk);
        if (done <= 0)
            die(sending ? "write" : "read");
        moved += done;
    }
    if (sending) { /* the host acknowledges with one byte once it has everything */
        shutdown(fd, SHUT_WR);
        if (read(fd, buffer, 1) != 1)
            die("acknowledgement");
    }
    double seconds = now() - start;
    printf("BENCH %s mib=%ld seconds=%.6f mbitps=%.1f\n", sending ? "tcp-send" : "tcp-recv", mib, seconds,
           total * 8 / seconds / 1e6);
    close(fd);
    return 0;
}

static int tcp_round_trips(const char *ip, int port, long count) {
    int fd = tcp_connect(ip, port), one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char byte = 'r';
    double start = now();
    for (long i = 0; i < count; i++)
        if (write(fd, &byte, 1) != 1 || read(fd, &byte, 1) != 1)
            die("round trip");
    double seconds = now() - start;
    printf("BENCH tcp-rr count=%ld seconds=%.6f rtt_us=%.1f\n", count, seconds, seconds / count * 1e6);
    close(fd);
    return 0;
}

static int fork_exec(long count) {
    double start = now();
    for (long i = 0; i < count; i++) {
        pid_t child = fork();
        if (child < 0)
            die("fork");
        if (child == 0) {
            execl("/bin/true", "true", (char *)NULL);
            _exit(127);
        }
        int status;
        if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status))
            die("child");
    }
    double seconds = now() - start;
    printf("BENCH forkexec count=%ld seconds=%.6f us_each=%.1f\n", count, seconds, seconds / count * 1e6);
    return 0;
}

static int map_unmap(long count, long mib) {
    double start = now();
    for (long i = 0; i < count; i++) {
        char *area = mmap(NULL, mib * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (area == MAP_FAILED)
            die("mmap");
        for (long offset = 0; offset < mib * MIB; offset += 4096)
            area[offset] = (char)i;
        munmap(area, mib * MIB);
    }
    double seconds = now() - start;
    printf("BENCH mmap count=%ld mib=%ld seconds=%.6f us_each=%.1f\n", count, mib, seconds,
           seconds / count * 1e6);
    return 0;
}

static int tlb_misses(long mib, long reads) {
    long words = mib * MIB / sizeof(uint64_t);
    uint64_t *area = mmap(NULL, mib * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED)
        die("mmap");
    madvise(area, mib * MIB, MADV_NOHUGEPAGE); /* 4 KiB pages: one TLB entry per page */
    /* Sattolo's shuffle: one cycle through every word, so the walk never settles into cache. */
    uint64_t state = 2463534242ULL;
    for (long i = 0; i < words; i++)
        area[i] = i;
    for (long i = words - 1; i > 0; i--) {
        long j = next_random(&state) % i;
        uint64_t swap = area[i];
        area[i] = area[j];
        area[j] = swap;
    }
    uint64_t position = 0;
    double start = now();
    for (long i = 0; i < reads; i++)
        position = area[position]; /* each read depends on the last: no overlap */
    double seconds = now() - start;
    printf("BENCH tlb mib=%ld reads=%ld seconds=%.6f ns_each=%.1f (%lu)\n", mib, reads, seconds,
           seconds / reads * 1e9, (unsigned long)position % 10);
    return 0;
}

static int console_write(const char *path, long kib) {
    int fd = open(path, O_WRONLY | O_NOCTTY);
    if (fd < 0)
        die(path);
    char line[64];
    memset(line, 'x', sizeof line - 1);
    line[sizeof line - 1] = '\n';
    double start = now();
    for (long i = 0; i < kib * 1024 / (long)sizeof line; i++)
        if (write(fd, line, sizeof line) != (ssize_t)sizeof line)
            die("console write");
    tcdrain(fd);
    double seconds = now() - start;
    close(fd);
    printf("BENCH console kib=%ld seconds=%.6f kibps=%.1f\n", kib, seconds, kib / seconds);
    return 0;
}

static int vsock_echo(int port, long connections) {
    int server = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm address = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
    if (server < 0 || bind(server, (struct sockaddr *)&address, sizeof address) || listen(server, 1))
        die("vsock listen");
    printf("VSOCK-LISTENING port=%d\n", port);
    char *buffer = aligned_buffer(MIB);
    long total = 0;
    for (long served = 0; served < connections; served++) {
        int fd = accept(server, NULL, NULL);
        if (fd < 0)
            die("vsock accept");
        ssize_t got;
        while ((got = read(fd, buffer, MIB)) > 0)
            for (ssize_t sent = 0, done; sent < got; sent += done)
                if ((done = write(fd, buffer + sent, got - sent)) <= 0)
                    die("vsock write");
        if (got < 0)
            die("vsock read");
        close(fd);
        total += 1;
    }
    printf("VSOCK-ECHO connections=%ld\n", total);
    close(server);
    return 0;
}

static int fs_stream(const char *path, long mib, int writing) {
    int fd = open(path, writing ? O_WRONLY | O_CREAT | O_TRUNC : O_RDONLY, 0644);
    if (fd < 0)
        die(path);
    char *buffer = aligned_buffer(MIB);
    double start = now();
    for (long i = 0; i < mib; i++) {
        ssize_t done = writing ? write(fd, buffer, MIB) : read(fd, buffer, MIB);
        if (done != MIB)
            die(writing ? "write" : "read");
    }
    if (writing && fsync(fd))
        die("fsync");
    double seconds = now() - start;
    close(fd);
    printf("BENCH %s mib=%ld seconds=%.6f mbps=%.2f\n", writing ? "fs-write" : "fs-read", mib, seconds,
           mib / seconds * MIB / 1e6);
    return 0;
}

static int fs_metadata(const char *dir, long count) {
    char name[4096];
    struct stat info;
    double start = now();
    for (long i = 0; i < count; i++) {
        snprintf(name, sizeof name, "%s/f%ld", dir, i);
        int fd = open(name, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0 || write(fd, "x", 1) != 1 || close(fd))
            die(name);
    }
    for (long i = 0; i < count; i++) {
        snprintf(name, sizeof name, "%s/f%ld", dir, i);
        if (stat(name, &info) || info.st_size != 1)
            die("stat");
    }
    for (long i = 0; i < count; i++) {
        snprintf(name, sizeof name, "%s/f%ld", dir, i);
        if (unlink(name))
            die("unlink");
    }
    double seconds = now() - start;
    printf("BENCH fs-meta files=%ld seconds=%.6f opsps=%.1f\n", count, seconds, 3 * count / seconds);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 4 && !strcmp(argv[1], "blk-read"))
        return blk_sequential(argv[2], atol(argv[3]), 0);
    if (argc >= 4 && !strcmp(argv[1], "blk-write"))
        return blk_sequential(argv[2], atol(argv[3]), 1);
    if (argc >= 4 && !strcmp(argv[1], "blk-randread"))
        return blk_random_read(argv[2], atol(argv[3]));
    if (argc >= 5 && !strcmp(argv[1], "tcp-send"))
        return tcp_stream(argv[2], atoi(argv[3]), atol(argv[4]), 1);
    if (argc >= 5 && !strcmp(argv[1], "tcp-recv"))
        return tcp_stream(argv[2], atoi(argv[3]), atol(argv[4]), 0);
    if (argc >= 5 && !strcmp(argv[1], "tcp-rr"))
        return tcp_round_trips(argv[2], atoi(argv[3]), atol(argv[4]));
    if (argc >= 3 && !strcmp(argv[1], "forkexec"))
        return fork_exec(atol(argv[2]));
    if (argc >= 4 && !strcmp(argv[1], "mmap"))
        return map_unmap(atol(argv[2]), atol(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "tlb"))
        return tlb_misses(atol(argv[2]), atol(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "console"))
        return console_write(argv[2], atol(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "vsock-echo"))
        return vsock_echo(atoi(argv[2]), atol(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "fs-write"))
        return fs_stream(argv[2], atol(argv[3]), 1);
    if (argc >= 4 && !strcmp(argv[1], "fs-read"))
        return fs_stream(argv[2], atol(argv[3]), 0);
    if (argc >= 4 && !strcmp(argv[1], "fs-meta"))
        return fs_metadata(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: see the comment at the top of kvmpy_bench.c\n");
    return 2;
}
