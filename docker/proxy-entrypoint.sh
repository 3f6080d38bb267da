#!/bin/sh
# The client image's entrypoint: `ee proxy`, configured by its EE_*
# variables (see the Dockerfile) and any flags given after the image name.
#
# The bundle is mounted read-only as its maker left it: the key file is
# 0600 and owned by the maker's uid, which the image's own user (uid 10001)
# cannot read. Started as root (the default), this copies the bundle into
# a private directory owned by that user (in memory, where compose mounts
# a tmpfs), then drops to it for good, so the documented path works for any
# owner without loosening the key's permissions on the host. Started with
# `--user`, it runs as that user and reads the mount in place.
# (EE_RUN_AS and EE_PRIVATE_DIR change the user and the directory; the
# tests use them.)
set -eu
bundle="${EE_BUNDLE:-/bundle}"
run_as="${EE_RUN_AS:-ee}"
dir="${EE_PRIVATE_DIR:-/run/ee}"
if [ "$(id -u)" = 0 ]; then
    rm -rf "$dir/bundle"
    mkdir -p "$dir/bundle"
    cp -R "$bundle/." "$dir/bundle/"
    chown -R "$run_as:" "$dir"
    chmod -R go-rwx "$dir"
    EE_BUNDLE="$dir/bundle" exec setpriv --reuid="$run_as" --regid="$(id -g "$run_as")" \
        --init-groups --inh-caps=-all --bounding-set=-all ee proxy "$@"
fi
EE_BUNDLE="$bundle" exec ee proxy "$@"
