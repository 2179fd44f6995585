#!/usr/bin/env bash
# Builds target/image/labeld-<version>.docker.tar, a container image of labeld on no base image: a
# Debian 12 root file system made from the Debian archive by mmdebstrap, labeld's .deb installed into it
# (apt resolves its dependencies), committed by buildah as one layer. Docker's image format, because
# OCI's has no HEALTHCHECK; `podman load`, `docker load` and `skopeo copy docker-archive:…` take it.
#
#   scripts/build-image.sh [OUT_DIR]     (run by `make image` after set-up and the release build; as root)
#   LABELD_DEB=PATH                      the package to install (default: scripts/build-deb.sh builds one
#                                        with LABELD_DEB_STRIP=1, without debug info and symbol tables)
#   LABELD_IMAGE_SOURCES=FILE            apt sources for the root file system (default: this machine's
#                                        /etc/apt/sources.list.d/debian.sources, else deb.debian.org)
#   LABELD_IMAGE_SOURCE_URL=URL          the org.opencontainers.image.source label (default: git's origin)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-target/image}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
SUITE=bookworm
# The image's labeld user and group (docs/operations.md#containers): chown a volume to it.
export LABELD_IMAGE_UID=10001
PORT=9187
ARCHIVE=$OUT/labeld-$VERSION.docker.tar
# The image's /etc/labeld/labeld.toml: config/labeld.toml with the container's paths.
mkdir -p "$OUT"
export LABELD_IMAGE_CONFIG=$(realpath "$OUT")/labeld.toml
scripts/packaged-config.py container > "$LABELD_IMAGE_CONFIG"

SOURCES=${LABELD_IMAGE_SOURCES-}
if [[ -z $SOURCES && -e /etc/apt/sources.list.d/debian.sources ]]; then
    SOURCES=/etc/apt/sources.list.d/debian.sources
fi
# The commit's time: the image's created date, and no file in it is newer (a rebuild of the same commit
# from the same Debian packages gives the same layer).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE_URL=${LABELD_IMAGE_SOURCE_URL:-$(git remote get-url origin 2>/dev/null || true)}

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/labeld-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root

# The package sits in $WORK, where mmdebstrap's file-mirror-automount hook mounts it into the root (the
# empty mount point it leaves there goes with $WORK below).
if [[ -n ${LABELD_DEB:-} ]]; then
    install -D -m 0644 "$LABELD_DEB" "$WORK/deb/$(basename "$LABELD_DEB")"
    DEB=$WORK/deb/$(basename "$LABELD_DEB")
else
    DEB=$(LABELD_DEB_STRIP=1 LABELD_DEB_COMPRESS=none scripts/build-deb.sh "$WORK/deb")
fi
DEB=$(realpath "$DEB")

# Debian's essential set plus the .deb and what apt says it needs; merged /usr set up by the hook
# instead of the usrmerge package (which would pull in perl). dpkg leaves out docs (but the copyright
# files and labeld's annotated example config), man pages and translations.
mmdebstrap --variant=essential \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount \
    --hook-dir="$PWD/scripts/image" \
    --include=ca-certificates --include="$DEB" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-include=/usr/share/doc/labeld/labeld.toml.example' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --quiet \
    "$SUITE" "$ROOT" ${SOURCES:+"$SOURCES"} > "$WORK/mmdebstrap.log" 2>&1 \
    || { tail -n 40 "$WORK/mmdebstrap.log" >&2; echo "build-image: mmdebstrap failed" >&2; exit 1; }

# What a container never reads: apt's state (apt is not installed), logs of the build, backups.
rm -rf "${ROOT:?}$WORK" "$ROOT/var/lib/apt" "$ROOT/var/cache/apt" "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old "$ROOT"/etc/*-
find "$ROOT/var/log" -type f -delete

{
    echo "build-image: root file system $(du -sh "$ROOT" | cut -f1), the largest folders:"
    du -xh --max-depth=3 "$ROOT" | sort -rh | sed -n '2,9p' | sed "s|$ROOT||"
} >&2
tar --numeric-owner --sort=name --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime -C "$ROOT" -cf "$WORK/root.tar" .

# A private container store, removed with $WORK: nothing is left in the machine's own.
export BUILDAH_FORMAT=docker
B=(buildah --root "$WORK/store" --runroot "$WORK/run" --storage-driver vfs)
ctr=$("${B[@]}" from scratch)
"${B[@]}" add --quiet "$ctr" "$WORK/root.tar" /
labels=(
    --label org.opencontainers.image.title=labeld
    --label "org.opencontainers.image.description=Labels images as they arrive in inbox folders: a TorchScript ImageNet classifier (libtorch, CPU), JSON sidecars, a CSV results log, optional MQTT"
    --label "org.opencontainers.image.version=$VERSION"
    --label "org.opencontainers.image.revision=$REVISION"
    --label "org.opencontainers.image.created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
)
[[ -n $SOURCE_URL ]] && labels+=(--label "org.opencontainers.image.source=$SOURCE_URL")
"${B[@]}" config \
    --user "$LABELD_IMAGE_UID:$LABELD_IMAGE_UID" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LABELD_CONFIG=/etc/labeld/labeld.toml \
    --env LABELD_LOG_FORMAT=json \
    --volume /etc/labeld --volume /var/lib/labeld \
    --port "$PORT/tcp" \
    --entrypoint '["labeld", "run"]' --cmd '' \
    --stop-signal SIGTERM \
    --healthcheck "CMD labeld probe http://127.0.0.1:$PORT/healthz" \
    --healthcheck-interval 30s --healthcheck-timeout 5s --healthcheck-retries 3 --healthcheck-start-period 2m \
    "${labels[@]}" \
    "$ctr"
mkdir -p "$OUT"
rm -f "$ARCHIVE"
"${B[@]}" commit --quiet --rm --format docker --timestamp "$SOURCE_DATE_EPOCH" "$ctr" \
    "docker-archive:$ARCHIVE:labeld:$VERSION" > /dev/null
echo "build-image: $(du -h "$ARCHIVE" | cut -f1) archive, tagged labeld:$VERSION" >&2
echo "$ARCHIVE"
