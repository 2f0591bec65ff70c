#!/bin/sh
# make deb: the three role packages as .deb files in dist/, built with dpkg-deb from
# trees staged by the Makefile's install targets (no debhelper).
#   packaging/deb.sh VERSION [SLURM_PREFIX]
# Runs as root (the helper is installed setuid root in its stage; dpkg-deb
# --root-owner-group makes every file root's in the archive).
set -eu
cd "$(dirname "$0")/.."
. packaging/common.sh
VERSION=$1
SLURM_PREFIX=${2:-}
DEBVER=$VERSION-1
ARCH=$(dpkg --print-architecture)
OUT=dist
WORK=build/deb
SLURM_VERSION=$(slurm_version "$SLURM_PREFIX")
LIBC=$(dpkg-query -W -f='${Version}' libc6 | sed 's/-[^-]*$//')
mkdir -p "$OUT" "$WORK"
# The stages hold a setuid-root helper: never leave them behind.
trap 'rm -rf "$WORK"' EXIT

# control NAME DEPENDS RECOMMENDS DESCRIPTION-LINES...
control() {
    name=$1 depends=$2 recommends=$3; shift 3
    mkdir -p "$root/DEBIAN"
    {
        echo "Package: $name"
        echo "Version: $DEBVER"
        echo "Architecture: $ARCH"
        echo "Maintainer: Shifter in Python <shifter@localhost>"
        echo "Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)"
        echo "Depends: $depends"
        [ -z "$recommends" ] || echo "Recommends: $recommends"
        echo "Section: admin"
        echo "Priority: optional"
        echo "Homepage: https://github.com/NERSC/shifter"
        echo "Description: $1"
        shift
        for line in "$@"; do echo " $line"; done
    } > "$root/DEBIAN/control"
    (cd "$root" && find etc -type f 2>/dev/null | sed 's|^|/|') > "$root/DEBIAN/conffiles"
    [ -s "$root/DEBIAN/conffiles" ] || rm "$root/DEBIAN/conffiles"
}

# script NAME FILE: a maintainer script running FILE (packaging/*.postinst, *.prerm,
# shared with the spec) on configure / remove only.
script() {
    case $1 in
    postinst) when='[ "$1" = configure ] || exit 0' ;;
    prerm) when='[ "$1" = remove ] || exit 0' ;;
    esac
    printf '#!/bin/sh\nset -e\n%s\n%s\n' "$when" "$(cat "$2")" > "$root/DEBIAN/$1"
    chmod 0755 "$root/DEBIAN/$1"
}

build() {
    dpkg-deb --root-owner-group -Zgzip --build "$root" "$OUT/$1_${DEBVER}_$ARCH.deb" >/dev/null
    echo "dist/$1_${DEBVER}_$ARCH.deb"
}

root=$WORK/gateway
stage gateway "$root" "$SLURM_PREFIX" /lib/systemd/system
control shifter-gateway \
    "libc6 (>= $LIBC), python3 (>= $PYVER), python3 (<< $PYNEXT), libmunge2, munge, squashfs-tools, squashfs-tools-ng, adduser" \
    "openssh-client" \
    "Shifter image gateway (shifter-imagegw) with its own Python environment" \
    "Pulls registry images and converts them to squashfs for the nodes. Python environment" \
    "in /opt/shifter/gateway; service user shifter; /var/lib/shifter; systemd units" \
    "shifter-imagegw.service and shifter-imagegw-autoexpire.timer."
script postinst packaging/gateway.postinst
script prerm packaging/gateway.prerm
build shifter-gateway

root=$WORK/runtime
stage runtime "$root" "$SLURM_PREFIX" /lib/systemd/system
control shifter-runtime \
    "libc6 (>= $LIBC), python3 (>= 3.11), python3-requests, libmunge2, openssh-client, xfsprogs, kmod" \
    "munge" \
    "Shifter container runtime for compute and login nodes" \
    "shifter, setupRoot and unsetupRoot (the setuid-root helper in /usr/libexec/shifter)," \
    "the shifterimg gateway client, shifter-etc-sync and its timer, the prep tools" \
    "(shifter-prep-mpi, shifter-prep-udiimage) and the udiImage tree (/opt/shifter/udiImage)." \
    "Needs munged on the node for shifterimg (Recommends: munge)."
script postinst packaging/runtime.postinst
script prerm packaging/runtime.prerm
build shifter-runtime

root=$WORK/slurm
stage slurm "$root" "$SLURM_PREFIX" /lib/systemd/system
control shifter-slurm "shifter-runtime (= $DEBVER), python3 (>= 3.11)" "" \
    "Shifter SPANK plugin for Slurm $SLURM_VERSION" \
    "/usr/lib/shifter/shifter_slurm.so: --image, --volume, --module on sbatch, salloc and" \
    "srun; setupRoot/unsetupRoot in the job prolog/epilog. Built against the headers of" \
    "Slurm $SLURM_VERSION${SLURM_PREFIX:+ ($SLURM_PREFIX)}: Slurm loads it only at that version."
build shifter-slurm
