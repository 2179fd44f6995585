#!/usr/bin/env bash
# Builds target/deb/labeld_<version>_amd64.deb from the release binary, the libtorch libraries it
# links (private, in /usr/lib/labeld/lib, found through the binary's RUNPATH), the exported model,
# the systemd unit, sysusers/tmpfiles entries and /etc/labeld/labeld.toml (a conffile).
#
#   scripts/build-deb.sh [OUT_DIR]        (run by `make deb` after set-up and the release build)
#   LABELD_DEB_COMPRESS=none|zstd|xz      compression (default zstd)
#   LABELD_BIN=PATH                       the labeld binary to package (default target/release/labeld)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-target/deb}
COMPRESS=${LABELD_DEB_COMPRESS:-zstd}
BIN=${LABELD_BIN:-target/release/labeld}
MODEL=models/default.pt
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
LIBDIR=/usr/lib/labeld/lib

[[ -x $BIN ]] || { echo "build-deb: no $BIN; run make build" >&2; exit 1; }
[[ -e $MODEL ]] || { echo "build-deb: no $MODEL; run make model" >&2; exit 1; }

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/labeld-deb.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT$LIBDIR" "$ROOT/usr/share/labeld/models" \
    "$ROOT/usr/share/doc/labeld" "$ROOT/etc/labeld" "$ROOT/lib/systemd/system" \
    "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d"

# The binary, pointed at the private library folder relative to itself (/usr/bin/../lib/labeld/lib),
# so it also runs from an unpacked tree (`dpkg-deb -x`).
install -m 0755 "$BIN" "$ROOT/usr/bin/labeld"
patchelf --set-rpath '$ORIGIN/../lib/labeld/lib' "$ROOT/usr/bin/labeld"

# Every library the binary loads from libtorch's folder (directly or through another one), under
# the name the loader asks for. Those libraries find each other through their own $ORIGIN RUNPATH.
TORCH_LIB=$(readelf -d "$BIN" | sed -n 's/.*R\(UN\)\?PATH.*\[\(.*\)\]/\2/p' | tr ':' '\n' | grep -m1 libtorch || true)
[[ -n $TORCH_LIB ]] || { echo "build-deb: $BIN has no RUNPATH into libtorch" >&2; exit 1; }
ldd "$BIN" | awk -v dir="$TORCH_LIB/" 'index($3, dir) == 1 {print $1, $3}' | while read -r name path; do
    install -m 0644 "$(readlink -f "$path")" "$ROOT$LIBDIR/$name"
done
# What the copied libraries need besides each other must come from Debian (checked below).
for lib in "$ROOT$LIBDIR"/*.so*; do
    patchelf --set-rpath '$ORIGIN' "$lib"
done
missing=$(env -u LD_LIBRARY_PATH ldd "$ROOT/usr/bin/labeld" "$ROOT$LIBDIR"/*.so* | grep "not found" || true)
[[ -z $missing ]] || { echo "build-deb: unresolved libraries:" >&2; echo "$missing" >&2; exit 1; }

# The model: the exported file and the default.pt link to it.
model_file=$(readlink -f "$MODEL")
install -m 0644 "$model_file" "$ROOT/usr/share/labeld/models/$(basename "$model_file")"
ln -s "$(basename "$model_file")" "$ROOT/usr/share/labeld/models/default.pt"

install -m 0644 config/system.toml "$ROOT/etc/labeld/labeld.toml"
install -m 0644 config/labeld.toml "$ROOT/usr/share/doc/labeld/labeld.toml.example"
install -m 0644 README.md "$ROOT/usr/share/doc/labeld/README.md"
install -m 0644 systemd/labeld.service "$ROOT/lib/systemd/system/labeld.service"
install -m 0644 systemd/labeld.sysusers "$ROOT/usr/lib/sysusers.d/labeld.conf"
install -m 0644 systemd/labeld.tmpfiles "$ROOT/usr/lib/tmpfiles.d/labeld.conf"
install -m 0755 scripts/deb/postinst scripts/deb/prerm scripts/deb/postrm "$ROOT/DEBIAN/"
echo /etc/labeld/labeld.toml > "$ROOT/DEBIAN/conffiles"

SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: labeld
Version: $VERSION
Architecture: $ARCH
Maintainer: labeld developers <labeld@localhost>
Installed-Size: $SIZE
Depends: libc6 (>= 2.34), libstdc++6 (>= 12), libgcc-s1, libturbojpeg0 (>= 1:2.1), procps, adduser | systemd
Section: graphics
Priority: optional
Description: labels images as they arrive in inbox folders
 A daemon that watches inbox folders, runs each new image through a TorchScript
 ImageNet classifier (libtorch, CPU) and writes a JSON sidecar beside it and a
 row to a CSV results log. Ships libtorch privately in /usr/lib/labeld/lib.
CONTROL

mkdir -p "$OUT"
DEB="$OUT/labeld_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Z"$COMPRESS" --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
