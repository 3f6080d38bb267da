#!/bin/sh
# The client image's entrypoint: `ee proxy`, configured by its EE_*
# variables (see the Dockerfile) and any flags given after the image name.
#
# The bundle is mounted read-only as its maker left it: the key file is
# 0600 and owned by the maker's uid, which the image's own user (uid 10001)
# cannot read. Started as root (the default), this copies the bundle into
# a private directory owned by that user under /dev/shm (a tmpfs in every
# Docker container, so the key's copy stays in memory and leaves no trace
# in the container's layer), then drops to it for good, with no way back
# (no new privileges, no capabilities). So the documented path works for
# any owner without loosening the key's permissions on the host. Started
# with `--user`, it runs as that user and reads the mount in place. The
# bundle is named by EE_BUNDLE only (not by a --bundle flag).
# (EE_RUN_AS and EE_PRIVATE_DIR change the user and the directory; the
# tests use them.)
set -eu
bundle="${EE_BUNDLE:-/bundle}"
run_as="${EE_RUN_AS:-ee}"
dir="${EE_PRIVATE_DIR:-/dev/shm/ee}"
if [ "$(id -u)" = 0 ]; then
    rm -rf "$dir/bundle"
    mkdir -p "$dir/bundle"
    cp -R "$bundle/." "$dir/bundle/"
    chown -R "$run_as:" "$dir"
    chmod -R go-rwx "$dir"
    EE_BUNDLE="$dir/bundle" exec setpriv --reuid="$run_as" --regid="$(id -g "$run_as")" \
        --init-groups --inh-caps=-all --bounding-set=-all --no-new-privs ee proxy "$@"
fi
EE_BUNDLE="$bundle" exec ee proxy "$@"
