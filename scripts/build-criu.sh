#!/bin/bash
# Build criu 4.1.x from Debian's source package and install it to /opt/criu/sbin/criu.
#
# Why: bookworm's criu 3.17 fails on kernels >= 6.13 ("vdso: Unexpected rt vDSO area
# bounds"); criu 4.1 works. The source comes from a newer Debian suite (deb-src only),
# the build dependencies from bookworm. Used only by the side-by-side benchmarks.
#
# Idempotent: does nothing when the installed binary already reports the wanted version.
# Env: CRIU_PREFIX (default /opt/criu), CRIU_BUILD_DIR (default /var/tmp/pycr-criu-build),
#      CRIU_SRC_SUITES (default "trixie sid"), CRIU_WANT (default 4.1).
set -euo pipefail

PREFIX=${CRIU_PREFIX:-/opt/criu}
BUILD_DIR=${CRIU_BUILD_DIR:-/var/tmp/pycr-criu-build}
SUITES=${CRIU_SRC_SUITES:-"trixie sid"}
WANT=${CRIU_WANT:-4.1}
BIN="$PREFIX/sbin/criu"
SRC_LIST=/etc/apt/sources.list.d/pycr-criu-src.sources

log() { echo "build-criu: $*" >&2; }

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "Version: $WANT"; then
    log "$BIN is already criu $WANT; nothing to do"
    exit 0
fi

[ "$(id -u)" = 0 ] || { log "must run as root (apt-get, install to $PREFIX)"; exit 1; }
export DEBIAN_FRONTEND=noninteractive

# 1. A deb-src entry for the newer suites (sources only: no binaries are taken from them).
if [ ! -f "$SRC_LIST" ]; then
    log "adding deb-src for: $SUITES"
    cat > "$SRC_LIST" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $SUITES
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq

# 2. Pick the newest criu source version that starts with $WANT.
VERSION=$(apt-cache showsrc criu | awk '/^Version:/ {print $2}' | grep "^$WANT" | sort -V | tail -n1 || true)
[ -n "$VERSION" ] || { log "no criu $WANT source package found in: $SUITES"; exit 1; }
log "criu source version $VERSION"

# 3. Build dependencies, from bookworm (criu's own Build-Depends, without the docs toolchain).
apt-get install -y -qq --no-install-recommends \
    build-essential dpkg-dev pkgconf \
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf \
    libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev >/dev/null

# 4. Fetch and unpack the source. The full source package (Debian's patches applied by
#    dpkg-source) is preferred; when the mirror lacks its .dsc/.debian.tar (seen: 404 for
#    4.1.1-1), fall back to the package's upstream tarball alone, checked against the
#    SHA-256 that the signed Sources index gives for it.
mkdir -p "$BUILD_DIR"
cd "$BUILD_DIR"
find_src() { find . -maxdepth 1 -type d -name "criu-$WANT*" | sort -V | tail -n1; }
SRC_DIR=$(find_src)
if [ -z "$SRC_DIR" ]; then
    if ! apt-get source -qq "criu=$VERSION" >apt-source.log 2>&1; then
        log "apt-get source failed ($(grep -m1 '^E:' apt-source.log || echo see apt-source.log)); using the upstream tarball only"
        apt-get source -qq --tar-only "criu=$VERSION" >>apt-source.log 2>&1 || true
        UPSTREAM=${VERSION%-*}
        ORIG="criu_${UPSTREAM}.orig.tar.xz"
        [ -f "$ORIG" ] || { log "could not fetch $ORIG"; exit 1; }
        SUM=$(apt-cache showsrc criu | awk -v f="$ORIG" -v v="$VERSION" \
            '/^Version:/ {ok=($2==v)} /^Checksums-Sha256:/ {c=ok; next} /^[^ ]/ {c=0} c && $3==f {print $1; exit}')
        echo "$SUM  $ORIG" | sha256sum -c --quiet - || { log "$ORIG: checksum mismatch"; exit 1; }
        tar -xf "$ORIG"
    fi
    SRC_DIR=$(find_src)
fi
[ -n "$SRC_DIR" ] || { log "source directory not found after apt-get source"; exit 1; }
cd "$SRC_DIR"

# 5. Build only the criu binary (no docs, no plugins that need extra toolchains).
log "building in $BUILD_DIR/$SRC_DIR"
make -j"$(nproc)" criu >build.log 2>&1 || { tail -n 40 build.log >&2; log "make failed (full log: $PWD/build.log)"; exit 1; }

install -D -m 0755 criu/criu "$BIN"
log "installed $BIN: $("$BIN" --version | tr '\n' ' ')"
