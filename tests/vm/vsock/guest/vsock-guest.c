/*
 * Guest side of criv's vsock VM tests (static binary, runs as part of /init).
 *
 * Listens on AF_VSOCK port 1000.  Every accepted connection starts with one command line:
 *   ECHO                      echo bytes until EOF, then close
 *   SINK                      read until EOF, answer "<count> <sha256hex>\n", close
 *   DRAIN [<n>]               read until EOF (or n bytes), answer "<count>\n" (no hashing)
 *   SOURCE <n> <seed>         send n bytes of the test stream, shutdown(SHUT_WR), read until
 *                             EOF (count saved), record the outcome (see RESULT), close
 *   CONNECT <port> <mode> [<n> <seed>]
 *                             connect to CID 2 <port>; mode ECHO|SOURCE|SINK as above but on
 *                             the new connection; the outcome ("OK ..." or "ERR <errno>") is
 *                             written back on the command connection
 *   RESULT                    answer the last SOURCE outcome ("" if none yet), close
 *   SERIAL <name> <mode> [...] same modes over the virtio-serial port called <name>; a
 *                             port has no EOF, so DRAIN and RTT need their count argument
 *   RTT <size> [<count>]      answer every <size>-byte message immediately (ping-pong)
 *   BUFSIZE <bytes> <mode> [...] set the connection's SO_VM_SOCKETS_BUFFER_SIZE (Linux then
 *                             also keeps at most that much in flight to the host), then
 *                             run ECHO|SINK|DRAIN|SOURCE|RTT on it as above
 *   REBOOT                    reboot(2) the guest
 * Test stream: 64 KiB blocks; block k is a xorshift64 block of the seed with the first 8
 * bytes replaced by k (little endian).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BLOCK 65536
#define RESULT_FILE "/tmp/source.result"

/* ---- sha256 ---- */
typedef struct { uint32_t h[8]; uint64_t len; uint8_t buf[64]; size_t n; } sha256_ctx;
static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
static void sha256_block(sha256_ctx *c, const uint8_t *p) {
    uint32_t w[64], a, b, d, e, f, g, h, cc, t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3]; e = c->h[4]; f = c->h[5]; g = c->h[6]; h = c->h[7];
    for (int i = 0; i < 64; i++) {
        t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
        h = g; g = f; f = e; e = d + t1; d = cc; cc = b; b = a; a = t1 + t2;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d; c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}
static void sha256_init(sha256_ctx *c) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv); c->len = 0; c->n = 0;
}
static void sha256_update(sha256_ctx *c, const uint8_t *p, size_t n) {
    c->len += n;
    if (c->n) {
        while (n && c->n < 64) { c->buf[c->n++] = *p++; n--; }
        if (c->n == 64) { sha256_block(c, c->buf); c->n = 0; }
    }
    while (n >= 64) { sha256_block(c, p); p += 64; n -= 64; }
    while (n) { c->buf[c->n++] = *p++; n--; }
}
static void sha256_hex(sha256_ctx *c, char out[65]) {
    uint64_t bits = c->len * 8; uint8_t pad = 0x80, z = 0, lb[8];
    sha256_update(c, &pad, 1);
    while (c->n != 56) sha256_update(c, &z, 1);
    for (int i = 0; i < 8; i++) lb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(c, lb, 8);
    for (int i = 0; i < 8; i++) sprintf(out + 8 * i, "%08x", c->h[i]);
}

/* ---- helpers ---- */
static void make_block(uint8_t *blk, uint64_t seed) {
    uint64_t x = seed ? seed : 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < BLOCK / 8; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(blk + 8 * i, &x, 8);
    }
}
static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0) { if (errno == EINTR) continue; return -errno; }
        p += r; n -= (size_t)r;
    }
    return 0;
}
static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0) return -1;
        if (buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    return (int)n;
}
static void dprint(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void dprint(int fd, const char *fmt, ...) {
    char b[256]; va_list ap; va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b, fmt, ap); va_end(ap);
    if (n > 0) write_all(fd, b, (size_t)n);
}

static char iobuf[BLOCK];

/* Each mode returns 0 or -errno and fills `msg` with an outcome line (no newline). */
static int do_echo(int fd, char *msg) {
    uint64_t total = 0;
    for (;;) {
        ssize_t r = read(fd, iobuf, sizeof iobuf);
        if (r < 0) { if (errno == EINTR) continue; sprintf(msg, "ERR %d", errno); return -errno; }
        if (r == 0) break;
        int e = write_all(fd, iobuf, (size_t)r);
        if (e) { sprintf(msg, "ERR %d", -e); return e; }
        total += (uint64_t)r;
    }
    sprintf(msg, "OK %llu", (unsigned long long)total);
    return 0;
}
static int do_sink(int fd, char *msg, int reply_fd) {
    sha256_ctx c; char hex[65]; uint64_t total = 0;
    sha256_init(&c);
    for (;;) {
        ssize_t r = read(fd, iobuf, sizeof iobuf);
        if (r < 0) { if (errno == EINTR) continue; sprintf(msg, "ERR %d", errno); return -errno; }
        if (r == 0) break;
        sha256_update(&c, (uint8_t *)iobuf, (size_t)r);
        total += (uint64_t)r;
    }
    sha256_hex(&c, hex);
    sprintf(msg, "OK %llu %s", (unsigned long long)total, hex);
    if (reply_fd >= 0) dprint(reply_fd, "%llu %s\n", (unsigned long long)total, hex);
    return 0;
}
static int do_drain(int fd, uint64_t limit, char *msg, int reply_fd) {
    uint64_t total = 0;
    while (!limit || total < limit) {
        size_t want = sizeof iobuf;
        if (limit && limit - total < want) want = (size_t)(limit - total);
        ssize_t r = read(fd, iobuf, want);
        if (r < 0) { if (errno == EINTR) continue; sprintf(msg, "ERR %d", errno); return -errno; }
        if (r == 0) break;
        total += (uint64_t)r;
    }
    sprintf(msg, "OK %llu", (unsigned long long)total);
    if (reply_fd >= 0) dprint(reply_fd, "%llu\n", (unsigned long long)total);
    return 0;
}
static int do_source(int fd, uint64_t n, uint64_t seed, char *msg, int is_sock) {
    static uint8_t blk[BLOCK];
    make_block(blk, seed);
    uint64_t sent = 0, k = 0;
    while (sent < n) {
        memcpy(blk, &k, 8);
        size_t chunk = n - sent < BLOCK ? (size_t)(n - sent) : BLOCK;
        int e = write_all(fd, blk, chunk);
        if (e) { sprintf(msg, "ERR %d sent %llu", -e, (unsigned long long)sent); return e; }
        sent += chunk; k++;
    }
    if (!is_sock) { sprintf(msg, "OK %llu", (unsigned long long)sent); return 0; }
    shutdown(fd, SHUT_WR);
    uint64_t back = 0;
    for (;;) {
        ssize_t r = read(fd, iobuf, sizeof iobuf);
        if (r < 0) { if (errno == EINTR) continue;
            sprintf(msg, "ERR %d after-eof", errno); return -errno; }
        if (r == 0) break;
        back += (uint64_t)r;
    }
    sprintf(msg, "OK %llu back %llu", (unsigned long long)sent, (unsigned long long)back);
    return 0;
}
static int do_rtt(int fd, size_t size, uint64_t limit, char *msg) {
    uint64_t count = 0;
    if (size > sizeof iobuf) size = sizeof iobuf;
    while (!limit || count < limit) {
        size_t got = 0;
        while (got < size) {
            ssize_t r = read(fd, iobuf + got, size - got);
            if (r <= 0) { sprintf(msg, "OK %llu", (unsigned long long)count); return 0; }
            got += (size_t)r;
        }
        if (write_all(fd, iobuf, size)) break;
        count++;
    }
    sprintf(msg, "OK %llu", (unsigned long long)count);
    return 0;
}
static int run_mode(int fd, char *mode, char *rest, char *msg, int reply_fd, int is_sock) {
    unsigned long long n = 0, seed = 0;
    if (!strcmp(mode, "ECHO")) return do_echo(fd, msg);
    if (!strcmp(mode, "SINK")) return do_sink(fd, msg, reply_fd);
    if (!strcmp(mode, "SOURCE") && rest && sscanf(rest, "%llu %llu", &n, &seed) == 2)
        return do_source(fd, n, seed, msg, is_sock);
    if (!strcmp(mode, "DRAIN")) {
        if (rest) sscanf(rest, "%llu", &n);
        return do_drain(fd, n, msg, reply_fd);
    }
    if (!strcmp(mode, "RTT") && rest && sscanf(rest, "%llu %llu", &n, &seed) >= 1)
        return do_rtt(fd, n, seed, msg);
    sprintf(msg, "ERR bad-mode");
    return -EINVAL;
}

static void handle(int fd) {
    char line[256], msg[200] = "";
    if (read_line(fd, line, sizeof line) < 0) return;
    char *save = NULL, *cmd = strtok_r(line, " ", &save);
    char *rest = save;
    if (!cmd) return;
    if (!strcmp(cmd, "ECHO") || !strcmp(cmd, "SINK") || !strcmp(cmd, "RTT") ||
        !strcmp(cmd, "DRAIN")) {
        run_mode(fd, cmd, rest, msg, fd, 1);
    } else if (!strcmp(cmd, "SOURCE")) {
        unlink(RESULT_FILE);
        run_mode(fd, cmd, rest, msg, -1, 1);
        int rf = open(RESULT_FILE ".tmp", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (rf >= 0) { dprint(rf, "%s\n", msg); close(rf); rename(RESULT_FILE ".tmp", RESULT_FILE); }
    } else if (!strcmp(cmd, "BUFSIZE")) {
        char *size = strtok_r(NULL, " ", &save), *mode = strtok_r(NULL, " ", &save);
        if (!size || !mode) { dprint(fd, "ERR bad-args\n"); return; }
        unsigned long long b = strtoull(size, NULL, 10);
        if (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &b, sizeof b) < 0) {
            dprint(fd, "ERR %d\n", errno);
            return;
        }
        run_mode(fd, mode, save, msg, fd, 1);
    } else if (!strcmp(cmd, "RESULT")) {
        int rf = open(RESULT_FILE, O_RDONLY);
        if (rf >= 0) { ssize_t r = read(rf, msg, sizeof msg - 1); if (r > 0) write_all(fd, msg, (size_t)r); close(rf); }
    } else if (!strcmp(cmd, "CONNECT")) {
        char *port = strtok_r(NULL, " ", &save), *mode = strtok_r(NULL, " ", &save);
        if (!port || !mode) { dprint(fd, "ERR bad-args\n"); return; }
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = (unsigned)atoi(port)};
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { dprint(fd, "ERR %d\n", errno); close(s); return; }
        dprint(fd, "CONNECTED\n");
        run_mode(s, mode, save, msg, -1, 1);
        close(s);
        dprint(fd, "%s\n", msg);
    } else if (!strcmp(cmd, "SERIAL")) {
        char *name = strtok_r(NULL, " ", &save), *mode = strtok_r(NULL, " ", &save);
        char path[300] = "";
        if (!name || !mode) { dprint(fd, "ERR bad-args\n"); return; }
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char np[300], nm[64] = "";
            snprintf(np, sizeof np, "/sys/class/virtio-ports/%s/name", e->d_name);
            int nf = open(np, O_RDONLY);
            if (nf < 0) continue;
            ssize_t r = read(nf, nm, sizeof nm - 1);
            close(nf);
            if (r > 0 && nm[r - 1] == '\n') nm[r - 1] = 0;
            if (!strcmp(nm, name)) snprintf(path, sizeof path, "/dev/%s", e->d_name);
        }
        if (d) closedir(d);
        if (!path[0]) { dprint(fd, "ERR no-port\n"); return; }
        int s = open(path, O_RDWR);
        if (s < 0) { dprint(fd, "ERR %d\n", errno); return; }
        dprint(fd, "OPENED\n");
        run_mode(s, mode, save, msg, fd, 0);
        close(s);
        dprint(fd, "%s\n", msg);
    } else if (!strcmp(cmd, "OVERRUN")) {
        /* Hostile: a child keeps having the criv_overrun module inflate the credit the
         * kernel believes the host gave (every credit update from the host resets it),
         * so the writes go past the real credit. The outcome goes to RESULT_FILE (the
         * host side does not read this connection). */
        unsigned long long n = rest ? strtoull(rest, NULL, 10) : 0, sent = 0;
        static uint8_t blk[BLOCK];
        char fds[16];
        int fl = snprintf(fds, sizeof fds, "%d", fd), err = 0;
        int pf = open("/proc/criv_overrun", O_WRONLY);
        memset(blk, 'o', sizeof blk);
        unlink(RESULT_FILE);
        pid_t poker = -1;
        if (pf < 0 || write(pf, fds, (size_t)fl) != fl) err = errno;
        else if ((poker = fork()) == 0) {
            while (write(pf, fds, (size_t)fl) == fl) usleep(500);
            _exit(0);
        }
        while (!err && sent < n) {
            ssize_t r = write(fd, blk, sizeof blk);
            if (r < 0) { if (errno != EINTR) err = errno; continue; }
            sent += (unsigned long long)r;
        }
        if (poker > 0) kill(poker, SIGKILL);
        if (pf >= 0) close(pf);
        int rf = open(RESULT_FILE ".tmp", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (rf >= 0) {
            dprint(rf, "OVERRUN sent %llu err %d\n", sent, err);
            close(rf);
            rename(RESULT_FILE ".tmp", RESULT_FILE);
        }
    } else if (!strcmp(cmd, "REBOOT")) {
        dprint(fd, "REBOOTING\n");
        /* Reboot resets the device, dropping tx packets the backend has not taken yet:
         * wait until the host has read the reply and closed (10 s at most). */
        shutdown(fd, SHUT_WR);
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        char sink[64];
        while (poll(&pfd, 1, 10000) > 0 && read(fd, sink, sizeof sink) > 0) {
        }
        close(fd);
        sync();
        reboot(RB_AUTOBOOT);
    } else {
        dprint(fd, "ERR unknown-command\n");
    }
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN); /* auto-reap */
    int ls = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (ls < 0) { perror("socket(AF_VSOCK)"); return 1; }
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = 1000};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    if (listen(ls, 128) < 0) { perror("listen"); return 1; }
    printf("vsock-guest: READY\n");
    fflush(stdout);
    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) { if (errno == EINTR) continue; perror("accept"); sleep(1); continue; }
        pid_t p = fork();
        if (p == 0) { close(ls); handle(c); close(c); _exit(0); }
        close(c);
    }
}
