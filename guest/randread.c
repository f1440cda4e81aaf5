/*
 * The guest kit's random-read benchmark: COUNT reads of 4 KiB at random 4 KiB-aligned offsets in the
 * first SPAN bytes of DEVICE, opened O_DIRECT (each read is one request to the device, none served
 * by the page cache), one at a time. Prints
 *   ACTORVMM-BLK read-4k-random BYTES SECONDS
 * with SECONDS from CLOCK_MONOTONIC. The offsets come from a fixed xorshift64 sequence, so every run
 * and every VMM reads the same blocks in the same order.
 *
 * usage: actorvmm-randread DEVICE SPAN COUNT
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: actorvmm-randread DEVICE SPAN COUNT\n");
        return 2;
    }
    long long span = atoll(argv[2]);
    long count = atol(argv[3]);
    long long blocks = span / 4096;
    if (blocks <= 0 || count <= 0) {
        fprintf(stderr, "actorvmm-randread: SPAN must be at least 4096 and COUNT positive\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    void *buffer;
    if (posix_memalign(&buffer, 4096, 4096) != 0) {
        perror("posix_memalign");
        return 1;
    }
    uint64_t x = 0x9E3779B97F4A7C15ull;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (pread(fd, buffer, 4096, (off_t)(x % (uint64_t)blocks) * 4096) != 4096) {
            perror("actorvmm-randread: pread");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("ACTORVMM-BLK read-4k-random %lld %.4f\n", (long long)count * 4096, seconds);
    return 0;
}
