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

# Commands whose man page and bash completion each package carries.
RUNTIME_COMMANDS="shifter setupRoot unsetupRoot shifterimg shifter-prep-mpi shifter-prep-udiimage shifter-etc-sync"
GATEWAY_COMMANDS="shifter-imagegw shifter-convert"

# docs ROOT COMMANDS...: man pages (gzipped) and completions of COMMANDS from the
# cli-docs directory next to ROOT (tools/cli_docs.py's output) into ROOT.
docs() {
    root=$1; shift
    from=$(dirname "$root")/cli-docs
    install -d -m 0755 "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions"
    for c in "$@"; do
        gzip -9n < "$from/man/man1/$c.1" > "$root/usr/share/man/man1/$c.1.gz"
        install -m 0644 "$from/completion/bash/$c" "$root/usr/share/bash-completion/completions/"
    done
}

# stage ROLE DIR SLURM_PREFIX UNITDIR: the role's files under DIR, configs, man pages and
# completions included. Stage the gateway first: its Python environment generates the
# man pages of every role (tools/cli_docs.py imports every command's parser).
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
        # shellcheck disable=SC2086
        docs "$dir" $RUNTIME_COMMANDS
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
        rm -rf "$(dirname "$dir")/cli-docs"
        "$dir/opt/shifter/gateway/bin/python" -I tools/cli_docs.py "$(dirname "$dir")/cli-docs" >/dev/null
        # shellcheck disable=SC2086
        docs "$dir" $GATEWAY_COMMANDS
        ;;
    esac
}
