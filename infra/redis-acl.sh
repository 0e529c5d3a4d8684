#!/bin/sh
# Writes Redis's ACL file (the path in $1) from $REDIS_PASSWORD: the `default` user off with no
# password and no commands, and the user `lorafleet` with every key, channel and command. The file
# holds the password's SHA-256, never the password. Refuses to write without a password.
set -eu
out="${1:?usage: redis-acl.sh ACL_FILE}"
password="${REDIS_PASSWORD:-}"
if [ -z "$password" ]; then
    echo "redis-acl.sh: REDIS_PASSWORD is empty; set it (the same password goes in LORAFLEET_REDIS_URL)" >&2
    exit 1
fi
hash=$(printf '%s' "$password" | sha256sum | cut -d ' ' -f 1)
umask 077
printf 'user default off resetpass resetkeys resetchannels -@all\nuser lorafleet on #%s ~* &* +@all\n' "$hash" > "$out"
