#!/bin/sh
# mmdebstrap hook (scripts/build-image.sh), after every package is installed: the container's config in
# place of the .deb's, which writes its results log to /var/log/labeld, outside the container's volume.
set -eu
install -m 0644 "$LABELD_IMAGE_CONFIG" "$1/etc/labeld/labeld.toml"
