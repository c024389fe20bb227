/* The guest side of bench/sharefs.py: file throughput and metadata operations on one
 * directory (the pod share's mount), timed with CLOCK_MONOTONIC. Prints
 * "FSBENCH <figure> <value>" lines on stdout, then "FSBENCH done".
 * Usage: fsbench DIR SIZE_MIB NFILES */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    printf("FSBENCH failed %s\n", what);
    exit(1);
}

static void drop_caches(void) {
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, "3\n", 2) < 0) perror("drop_caches");
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: fsbench DIR SIZE_MIB NFILES\n");
        return 2;
    }
    const char *dir = argv[1];
    long mib = atol(argv[2]);
    int nfiles = atoi(argv[3]);
    const size_t chunk = 1 << 20;
    char *buf = malloc(chunk);
    char path[4096];
    for (size_t i = 0; i < chunk; i++) buf[i] = (char)(i * 7);

    snprintf(path, sizeof path, "%s/big", dir);
    double t0 = now();
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("open big");
    for (long i = 0; i < mib; i++)
        if (write(fd, buf, chunk) != (ssize_t)chunk) die("write big");
    if (fsync(fd) < 0) die("fsync big");
    close(fd);
    double t1 = now();
    printf("FSBENCH write_mb_s %.1f\n", mib * 1.048576 / (t1 - t0));

    drop_caches();
    t0 = now();
    fd = open(path, O_RDONLY);
    if (fd < 0) die("open big for reading");
    long got = 0;
    for (;;) {
        ssize_t k = read(fd, buf, chunk);
        if (k < 0) die("read big");
        if (k == 0) break;
        got += k;
    }
    close(fd);
    t1 = now();
    if (got != mib * (long)chunk) die("short read");
    printf("FSBENCH read_mb_s %.1f\n", mib * 1.048576 / (t1 - t0));
    unlink(path);

    snprintf(path, sizeof path, "%s/meta", dir);
    if (mkdir(path, 0755) < 0) die("mkdir meta");
    t0 = now();
    for (int i = 0; i < nfiles; i++) {
        snprintf(path, sizeof path, "%s/meta/f%06d", dir, i);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) die("create");
        if (write(fd, buf, 100) != 100) die("write small");
        close(fd);
    }
    t1 = now();
    printf("FSBENCH create_per_s %.0f\n", nfiles / (t1 - t0));

    drop_caches();
    struct stat st;
    t0 = now();
    for (int i = 0; i < nfiles; i++) {
        snprintf(path, sizeof path, "%s/meta/f%06d", dir, i);
        if (stat(path, &st) < 0 || st.st_size != 100) die("stat");
    }
    t1 = now();
    printf("FSBENCH stat_per_s %.0f\n", nfiles / (t1 - t0));

    t0 = now();
    snprintf(path, sizeof path, "%s/meta", dir);
    DIR *d = opendir(path);
    if (!d) die("opendir");
    int seen = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] == 'f') seen++;
    closedir(d);
    t1 = now();
    if (seen != nfiles) die("readdir count");
    printf("FSBENCH readdir_entries_per_s %.0f\n", nfiles / (t1 - t0));

    t0 = now();
    for (int i = 0; i < nfiles; i++) {
        snprintf(path, sizeof path, "%s/meta/f%06d", dir, i);
        if (unlink(path) < 0) die("unlink");
    }
    t1 = now();
    printf("FSBENCH unlink_per_s %.0f\n", nfiles / (t1 - t0));
    snprintf(path, sizeof path, "%s/meta", dir);
    rmdir(path);
    printf("FSBENCH done\n");
    fflush(stdout);
    return 0;
}
