# Shared by deb.sh and rpm.sh: what each role's package depends on, and staging one
# role's files with the Makefile's install targets (the same ones `make install` runs).
# shellcheck shell=sh

PY_SYS=${PYTHON_SYS:-/usr/bin/python3}
PYVER=$($PY_SYS -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYNEXT=$($PY_SYS -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')

# The Slurm version the plugin is built against: from SLURM_PREFIX's headers, else the
# system's (Debian's libslurm-dev).
slurm_version() {
    hdr=${1:+$1/include}/slurm/slurm_version.h
    [ -n "$1" ] || hdr=/usr/include/slurm/slurm_version.h
    if [ ! -r "$hdr" ]; then
        echo "packaging: no Slurm headers at $hdr: install libslurm-dev or set SLURM_PREFIX" >&2
        exit 1
    fi
    num=$(sed -n 's/^#define SLURM_VERSION_NUMBER \(0x[0-9a-fA-F]*\).*/\1/p' "$hdr")
    printf '%d.%02d.%d\n' $((num >> 16 & 255)) $((num >> 8 & 255)) $((num & 255))
}

# stage ROLE DIR SLURM_PREFIX UNITDIR: the role's files under DIR, configs included.
stage() {
    role=$1 dir=$2 slurm_prefix=$3 unitdir=$4
    rm -rf "$dir" && mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)  # absolute: the Makefile's sub-makes change directory
    make -s "install-$role" DESTDIR="$dir" PREFIX=/usr UNITDIR="$unitdir" \
        SLURM_PREFIX="$slurm_prefix" GWVENV=/opt/shifter/gateway UDIIMAGE=/opt/shifter/udiImage
    case $role in
    runtime)
        install -d -m 0755 "$dir/etc/shifter/shifter_etc_files"
        install -m 0644 etc/udiRoot.conf.example "$dir/etc/shifter/udiRoot.conf"
        install -d -m 0755 "$dir/usr/share/doc/shifter-runtime"
        install -m 0644 etc/udiRoot.conf.example "$dir/usr/share/doc/shifter-runtime/"
        ;;
    slurm)
        install -d -m 0755 "$dir/usr/share/doc/shifter-slurm"
        sed 's|/usr/local/|/usr/|g' etc/plugstack.conf.example \
            > "$dir/usr/share/doc/shifter-slurm/plugstack.conf.example"
        ;;
    gateway)
        install -d -m 0755 "$dir/etc/shifter" "$dir/usr/sbin"
        install -m 0644 etc/imagemanager.json "$dir/etc/shifter/imagemanager.json"
        ln -s /opt/shifter/gateway/bin/shifter-imagegw "$dir/usr/sbin/shifter-imagegw"
        ln -s /opt/shifter/gateway/bin/shifter-convert "$dir/usr/sbin/shifter-convert"
        ;;
    esac
}
