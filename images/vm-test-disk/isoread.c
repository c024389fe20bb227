/* isoread: print one file of the root directory of a NoCloud seed (ISO9660, volume id "cidata").
 *
 *   isoread DEVICE NAME     the file's bytes on stdout; exit 1 if absent, 2 if not a cidata ISO
 *   isoread DEVICE          exit 0 if DEVICE is a cidata ISO
 *
 * The test disk's kernel has no iso9660 driver, so the init reads the seed in userspace.
 * Names come from Rock Ridge NM entries when present, else the ISO name without ";1",
 * compared case-insensitively. Only the root directory is read; every size is bounded
 * (directory 64 KiB, file 1 MiB) and every record is checked against its buffer.
 * Built static (gcc -static) by images/vm-test-disk/build.py. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define SECTOR 2048
#define MAX_DIR (64 * 1024)
#define MAX_FILE (1024 * 1024)

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int read_at(int fd, unsigned char *buf, size_t len, off_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, off + (off_t)done);
        if (n <= 0) return -1;
        done += (size_t)n;
    }
    return 0;
}

/* The record's name into out (NUL-terminated): Rock Ridge NM if present, else the ISO name. */
static void record_name(const unsigned char *rec, size_t rlen, char *out, size_t outlen) {
    size_t fi = rec[32];
    size_t su = 33 + fi + ((fi % 2) == 0 ? 1 : 0);
    out[0] = 0;
    while (su + 4 <= rlen) {
        const unsigned char *e = rec + su;
        size_t elen = e[2];
        if (elen < 4 || su + elen > rlen) break;
        if (e[0] == 'N' && e[1] == 'M' && elen > 5) {
            size_t n = elen - 5;
            size_t have = strlen(out);
            if (have + n >= outlen) n = outlen - 1 - have;
            memcpy(out + have, e + 5, n);
            out[have + n] = 0;
            if (!(e[4] & 1)) return; /* no CONTINUE flag: name complete */
        }
        su += elen;
    }
    if (out[0]) return;
    size_t n = fi < outlen - 1 ? fi : outlen - 1;
    memcpy(out, rec + 33, n);
    out[n] = 0;
    char *semi = strchr(out, ';');
    if (semi) *semi = 0;
    size_t l = strlen(out);
    if (l && out[l - 1] == '.') out[l - 1] = 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: isoread DEVICE [NAME]\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) return 2;
    unsigned char pvd[SECTOR];
    if (read_at(fd, pvd, SECTOR, 16 * SECTOR) != 0) return 2;
    if (pvd[0] != 1 || memcmp(pvd + 1, "CD001", 5) != 0) return 2;
    if (memcmp(pvd + 40, "CIDATA ", 7) != 0 && memcmp(pvd + 40, "cidata ", 7) != 0) return 2;
    if (argc == 2) return 0;
    const unsigned char *root = pvd + 156;
    uint32_t dir_lba = le32(root + 2), dir_len = le32(root + 10);
    if (dir_len == 0 || dir_len > MAX_DIR) return 2;
    unsigned char *dir = malloc(dir_len);
    if (!dir || read_at(fd, dir, dir_len, (off_t)dir_lba * SECTOR) != 0) return 2;
    size_t off = 0;
    while (off < dir_len) {
        size_t rlen = dir[off];
        if (rlen == 0) { /* records do not cross sectors: skip to the next one */
            off = (off / SECTOR + 1) * SECTOR;
            continue;
        }
        if (rlen < 34 || off + rlen > dir_len || 33 + (size_t)dir[off + 32] > rlen) return 2;
        const unsigned char *rec = dir + off;
        char name[256];
        record_name(rec, rlen, name, sizeof name);
        if (!(rec[25] & 2) && strcasecmp(name, argv[2]) == 0) {
            uint32_t lba = le32(rec + 2), len = le32(rec + 10);
            if (len > MAX_FILE) return 2;
            unsigned char *data = malloc(len ? len : 1);
            if (!data || read_at(fd, data, len, (off_t)lba * SECTOR) != 0) return 2;
            return fwrite(data, 1, len, stdout) == len ? 0 : 2;
        }
        off += rlen;
    }
    return 1;
}
