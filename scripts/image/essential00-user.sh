#!/bin/sh
# mmdebstrap hook (scripts/build-image.sh), after Debian's essential packages: the labeld user and group
# with the image's fixed ids, before the .deb is installed (its postinst then finds the user and keeps
# it). Fixed, so that a volume can be chowned to it and Kubernetes' runAsNonRoot can check it.
set -eu
ROOT=$1
ID=$LABELD_IMAGE_UID
grep -q '^labeld:' "$ROOT/etc/group" || echo "labeld:x:$ID:" >> "$ROOT/etc/group"
grep -q '^labeld:' "$ROOT/etc/passwd" || echo "labeld:x:$ID:$ID:labeld image labeller:/var/lib/labeld:/usr/sbin/nologin" >> "$ROOT/etc/passwd"
