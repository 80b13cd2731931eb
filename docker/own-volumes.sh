#!/bin/sh
# The compose stack's volume-init job: hands named volumes to the non-root users of the services
# that write them (minio, mlflow), which could not do it themselves. Runs as root, before them.
#
# Usage: own-volumes.sh FOLDER UID:GID [FOLDER UID:GID]...
# Everything under FOLDER not owned by UID:GID is given to it (a new, empty volume, or one written
# while the service still ran as root), and FOLDER is closed to other users (mode 700). Files that
# are right already are not touched, so every `docker compose up` costs one walk of the tree.
# POSIX sh and find(1) only, so it runs in any Debian-based image.
set -eu

fail() {
    printf 'volume-init: %s\n' "$1" >&2
    exit 1
}

[ "$#" -gt 0 ] && [ $(($# % 2)) -eq 0 ] || fail "usage: own-volumes.sh FOLDER UID:GID [FOLDER UID:GID]..."

while [ "$#" -gt 0 ]; do
    folder=$1 owner=$2
    shift 2
    case $owner in
        0:* | *:0 | *[!0-9:]* | :* | *: | *:*:*) fail "'$owner' for $folder: give a non-root UID:GID in digits" ;;
        *:*) ;;
        *) fail "'$owner' for $folder: give UID:GID" ;;
    esac
    [ -d "$folder" ] || fail "$folder is not a folder: mount the volume there"
    uid=${owner%:*} gid=${owner#*:}
    find "$folder" \( ! -user "$uid" -o ! -group "$gid" \) -exec chown -h "$owner" {} +
    chmod 700 "$folder"
    echo "volume-init: $folder belongs to $owner"
done
