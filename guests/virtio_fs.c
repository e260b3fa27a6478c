/* virtio_fs: a ring-3 FUSE client on a virtio-fs device's request queue (queue 1).
 * INIT, then LOOKUP/OPEN/READ/RELEASE of file=NAME (printed between brackets on the
 * serial console), then CREATE/WRITE/RELEASE of new=NAME with a fixed text (a failure
 * prints the FUSE error, e.g. 30 for EROFS on a read-only share). With
 * until_eio=1 it then reads file=NAME again and again until a reply fails, and exits
 * 0 only if that failure is EIO (the VMM answers so once the back end is gone).
 * Exit status: 0 ok; 2 no device; 3 INIT, 4 LOOKUP, 5 OPEN, 6 READ, 7 RELEASE of file=;
 * 8 CREATE, 9 WRITE, 10 RELEASE of new=; 11 the until_eio loop ended on another error. */
#include "runtime/runtime.h"
#include "runtime/virtio.h"

enum { LOOKUP = 1, OPEN = 14, READ = 15, WRITE = 16, RELEASE = 18, INIT = 26, CREATE = 35 };
#define ROOT_ID 1
#define EIO 5
#define NAME_MAX_LEN 64
#define DONE 255 /* read_back: the until_eio loop ended as it should, stop here */
#define WRITTEN "written by the kvmpy virtio_fs guest\n"

struct in_header { u32 len, opcode; u64 unique, nodeid; u32 uid, gid, pid, padding; };
struct out_header { u32 len; int error; u64 unique; };
struct entry_out { u64 nodeid, generation, entry_valid, attr_valid; u32 entry_nsec, attr_nsec;
                   u64 ino, size; u8 rest[72]; };
struct open_out { u64 fh; u32 open_flags, padding; };
struct rw_in { u64 fh, offset; u32 size, flags; u64 lock_owner; u32 more_flags, padding; };
struct release_in { u64 fh; u32 flags, release_flags; u64 lock_owner; };

static struct virtq queue __attribute__((aligned(4096)));
static u8 request_buffer[4096] __attribute__((aligned(64)));
static u8 reply_buffer[4096] __attribute__((aligned(64)));
static u64 next_unique = 1;
static int last_error;

/* One request: header + `body` readable, the reply's body in `reply_buffer` after its header.
 * Returns the reply body's length, or -1 (last_error holds the FUSE error). */
static int fuse(u32 opcode, u64 nodeid, const void *body, u32 body_len) {
    struct in_header *in = (struct in_header *)request_buffer;
    u32 len = (u32)sizeof(*in) + body_len;
    memset(in, 0, sizeof(*in));
    in->len = len;
    in->opcode = opcode;
    in->unique = next_unique++;
    in->nodeid = nodeid;
    memcpy(request_buffer + sizeof(*in), body, body_len);
    memset(reply_buffer, 0xff, sizeof(struct out_header));
    u64 addr[2] = {(u64)request_buffer, (u64)reply_buffer};
    u32 lens[2] = {len, sizeof(reply_buffer)};
    int writable[2] = {0, 1};
    virtq_submit(&queue, addr, lens, writable, 2);
    u32 used = virtq_wait(&queue);
    struct out_header *out = (struct out_header *)reply_buffer;
    if (used < sizeof(*out) || out->unique != in->unique || out->len != used) {
        last_error = -1000;
        return -1;
    }
    last_error = out->error;
    return out->error ? -1 : (int)(used - sizeof(*out));
}

static u8 *reply_body(void) { return reply_buffer + sizeof(struct out_header); }

/* The value of `key` in the command line, copied into `value` (at most NAME_MAX_LEN - 1). */
static int cmdline_word(const char *key, char *value) {
    const char *s = cmdline();
    u32 key_len = (u32)strlen(key);
    for (; *s; s++) {
        if (s != cmdline() && s[-1] != ' ')
            continue;
        u32 i = 0;
        while (i < key_len && s[i] == key[i])
            i++;
        if (i < key_len)
            continue;
        u32 n = 0;
        for (s += key_len; *s && *s != ' ' && n + 1 < NAME_MAX_LEN; s++)
            value[n++] = *s;
        value[n] = 0;
        return n ? 0 : -1;
    }
    return -1;
}

static int release(u64 nodeid, u64 fh) {
    struct release_in release_in = {.fh = fh};
    return fuse(RELEASE, nodeid, &release_in, sizeof(release_in));
}

static int read_file(u64 nodeid, u64 fh, char *text, u32 size) {
    struct rw_in read_in = {.fh = fh, .size = size};
    int got = fuse(READ, nodeid, &read_in, sizeof(read_in));
    if (got < 0)
        return -1;
    memcpy(text, reply_body(), (u32)got);
    text[got] = 0;
    return got;
}

/* Read again and again (the test kills the back end meanwhile); 0 if the first failure is EIO. */
static int read_until_error(u64 node, u64 fh, char *text, u32 size) {
    serial_puts("virtio_fs reading until an error\n");
    (void)inb(COM1 + 5); /* an exit: KVM hands over the output it buffered (the loop has none) */
    u64 reads = 0;
    while (read_file(node, fh, text, size) >= 0)
        reads++;
    serial_puts("virtio_fs error ");
    print_u64((u64)-last_error);
    serial_puts(" after ");
    print_u64(reads);
    serial_puts(" reads\n");
    return last_error == -EIO ? 0 : 11;
}

static int read_back(const char *name) {
    static char text[2048];
    u32 name_len = (u32)strlen(name) + 1;
    if (fuse(LOOKUP, ROOT_ID, name, name_len) < 0)
        return 4;
    struct entry_out *entry = (struct entry_out *)reply_body();
    u64 node = entry->nodeid, size = entry->size;
    u32 open_in[2] = {0, 0}; /* O_RDONLY */
    if (size >= sizeof(text) || fuse(OPEN, node, open_in, sizeof(open_in)) < 0)
        return 5;
    u64 fh = ((struct open_out *)reply_body())->fh;
    int got = read_file(node, fh, text, (u32)size);
    if (got != (int)size)
        return 6;
    serial_puts("virtio_fs read ");
    print_u64(size);
    serial_puts(" bytes: [");
    serial_puts(text);
    serial_puts("]\n");
    if (cmdline_u64("until_eio=", 0))
        return read_until_error(node, fh, text, (u32)size) ?: DONE;
    return release(node, fh) < 0 ? 7 : 0;
}

static int create_and_write(const char *name) {
    static u8 body[16 + NAME_MAX_LEN];
    u32 create_in[4] = {0x1 | 0x40 | 0x80, 0100644, 022, 0}; /* O_WRONLY|O_CREAT|O_EXCL, mode, umask */
    u32 name_len = (u32)strlen(name) + 1;
    memcpy(body, create_in, sizeof(create_in));
    memcpy(body + sizeof(create_in), name, name_len);
    if (fuse(CREATE, ROOT_ID, body, (u32)sizeof(create_in) + name_len) < 0)
        return 8;
    u64 node = ((struct entry_out *)reply_body())->nodeid;
    u64 fh = ((struct open_out *)(reply_body() + sizeof(struct entry_out)))->fh;
    static u8 write_body[sizeof(struct rw_in) + sizeof(WRITTEN)];
    struct rw_in write_in = {.fh = fh, .size = sizeof(WRITTEN) - 1};
    memcpy(write_body, &write_in, sizeof(write_in));
    memcpy(write_body + sizeof(write_in), WRITTEN, sizeof(WRITTEN) - 1);
    if (fuse(WRITE, node, write_body, (u32)sizeof(write_in) + write_in.size) < 0
        || *(u32 *)reply_body() != write_in.size)
        return 9;
    return release(node, fh) < 0 ? 10 : 0;
}

int main(const char *command_line) {
    (void)command_line;
    static char file[NAME_MAX_LEN], created[NAME_MAX_LEN];
    struct virtio_dev dev = {0};
    if (virtio_find(&dev, 26) || virtio_setup_queue(&dev, 1, &queue)) {
        serial_puts("virtio_fs: no usable virtio-fs device\n");
        return 2;
    }
    virtio_driver_ok(&dev);
    u32 init_in[4] = {7, 31, 0, 0}; /* FUSE 7.31 (virtiofsd's minimum), no flags */
    if (fuse(INIT, 0, init_in, sizeof(init_in)) < 16 || ((u32 *)reply_body())[0] != 7) {
        serial_puts("virtio_fs: FUSE_INIT failed\n");
        return 3;
    }
    int status = 0;
    if (cmdline_word("file=", file) == 0 && (status = read_back(file)) != 0)
        return status == DONE ? 0 : status;
    if (cmdline_word("new=", created) == 0 && (status = create_and_write(created)) != 0) {
        serial_puts("virtio_fs: writing ");
        serial_puts(created);
        serial_puts(" failed, error ");
        print_u64((u64)-last_error);
        serial_puts("\n");
        return status;
    }
    static char tag[37]; /* the configuration's tag: 36 bytes, NUL-padded only if shorter */
    for (int i = 0; i < 36; i++)
        tag[i] = (char)dev.device_cfg[i];
    serial_puts("virtio_fs ok, tag ");
    serial_puts(tag);
    serial_puts("\n");
    return 0;
}
