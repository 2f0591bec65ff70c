"""MPI test programs: ``ring`` built against a vanilla ``libmpi.so.12`` made from
Debian's MPICH (Debian names its library ``libmpich.so.12``; upstream MPICH, Intel MPI
and Cray MPICH ship the MPICH-ABI name ``libmpi.so.12``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

MPICH_LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
MPICH_INCLUDE = "/usr/include/x86_64-linux-gnu/mpich"

# Each rank prints the file its MPI_Init was mapped from; rank 0 the token that went
# round the ring (0 -> 1 -> ... -> 0, rank r appending the digit r+1: "12" for 2 ranks).
RING_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The file MPI_Init was mapped from: its /proc/self/maps line. */
static void mapped_file(void *addr, char *out, size_t n)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4608];
    snprintf(out, n, "?");
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        uintptr_t lo, hi;
        int off = 0;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &lo, &hi, &off) < 2 || off == 0)
            continue;
        if ((uintptr_t)addr >= lo && (uintptr_t)addr < hi) {
            line[strcspn(line, "\n")] = '\0';
            snprintf(out, n, "%s", line + off);
            break;
        }
    }
    fclose(f);
}

/* RING_MAPS set: every shared object file mapped into rank 0, one "mapped PATH" line each. */
static void print_maps(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4608], last[4096] = "";
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        int off = 0;
        sscanf(line, "%*s %*s %*s %*s %*s %n", &off);
        line[strcspn(line, "\n")] = '\0';
        if (off == 0 || line[off] != '/' || !strstr(line + off, ".so") ||
            strcmp(line + off, last) == 0)
            continue;
        snprintf(last, sizeof last, "%s", line + off);
        printf("mapped %s\n", last);
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    int rank, size, token = 1;
    char lib[4096];

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    mapped_file(dlsym(RTLD_DEFAULT, "MPI_Init"), lib, sizeof lib);
    printf("rank %d of %d: libmpi %s\n", rank, size, lib);
    if (rank == 0 && getenv("RING_MAPS"))
        print_maps();
    fflush(stdout);
    /* The token goes 0 -> 1 -> ... -> 0; rank r appends the digit r+1. */
    if (size > 1) {
        if (rank == 0) {
            MPI_Send(&token, 1, MPI_INT, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(&token, 1, MPI_INT, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(&token, 1, MPI_INT, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            token = token * 10 + rank + 1;
            MPI_Send(&token, 1, MPI_INT, (rank + 1) % size, 0, MPI_COMM_WORLD);
        }
    }
    if (rank == 0)
        printf("ring: token %d after %d ranks\n", token, size);
    MPI_Finalize();
    return 0;
}
"""


def build_ring(build: Path) -> tuple[Path, Path]:
    """``<build>/ring`` linked against ``<build>/vanilla/libmpi.so.12`` (a copy of Debian's
    ``libmpich.so.12.2.2`` with the soname ``libmpi.so.12``): (program, vanilla dir)."""
    vanilla = build / "vanilla"
    vanilla.mkdir(parents=True)
    shutil.copyfile(MPICH_LIBDIR / "libmpich.so.12.2.2", vanilla / "libmpi.so.12.2.2")
    subprocess.run(["patchelf", "--set-soname", "libmpi.so.12",
                    str(vanilla / "libmpi.so.12.2.2")], check=True)
    (vanilla / "libmpi.so.12").symlink_to("libmpi.so.12.2.2")
    (vanilla / "libmpi.so").symlink_to("libmpi.so.12")
    (build / "ring.c").write_text(RING_C)
    subprocess.run(["gcc", "-O1", f"-I{MPICH_INCLUDE}", "-o", str(build / "ring"),
                    str(build / "ring.c"), f"-L{vanilla}", "-lmpi"], check=True)
    needed = subprocess.run(["patchelf", "--print-needed", str(build / "ring")],
                            capture_output=True, text=True, check=True).stdout.split()
    assert "libmpi.so.12" in needed and "libmpich.so.12" not in needed
    return build / "ring", vanilla
