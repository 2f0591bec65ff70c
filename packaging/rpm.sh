#!/bin/sh
# make rpm: the three role packages as .rpm files in dist/, from packaging/shifter.spec.
#   packaging/rpm.sh VERSION [SLURM_PREFIX]
# The source tarball is the checkout's tracked and new files (what `git status` shows,
# uncommitted changes included). On a Debian builder rpmbuild cannot see dpkg's
# packages, so BuildRequires are not checked (--nodeps); the build tools are those of
# `make build-deps`. Runs as root (the helper is staged setuid root).
set -eu
cd "$(dirname "$0")/.."
. packaging/common.sh
VERSION=$1
SLURM_PREFIX=${2:-}
TOP=$(pwd)/build/rpm
rm -rf "$TOP" && mkdir -p "$TOP/SOURCES" "$TOP/SPECS" dist
# The build trees hold a setuid-root helper: never leave them behind.
trap 'rm -rf "$TOP"' EXIT
git ls-files -co --exclude-standard | grep -v '^dist/' \
    | tar -czf "$TOP/SOURCES/shifter-$VERSION.tar.gz" --transform "s|^|shifter-$VERSION/|" -T -
cp packaging/*.postinst packaging/*.prerm "$TOP/SOURCES/"
set -- --define "_topdir $TOP" --define "_sourcedir $TOP/SOURCES" \
    --define "shifter_version $VERSION"
[ -z "$SLURM_PREFIX" ] || set -- "$@" --define "slurm_prefix $SLURM_PREFIX"
rpmbuild -bb --nodeps --quiet "$@" \
    --define "slurm_version $(slurm_version "$SLURM_PREFIX")" \
    --define "python_abi $PYVER" \
    packaging/shifter.spec
for f in "$TOP"/RPMS/*/*.rpm; do
    cp "$f" dist/ && echo "dist/$(basename "$f")"
done
