#!/bin/sh
# The compose stack's first job (service `preflight`): refuse to start while a secret in .env is
# still an .env.example placeholder, empty or short, or the Fernet key is missing. Every other
# service waits for it, so Postgres and MinIO never create their volumes with known passwords.
#
# Usage: preflight.sh NAME...   checks the environment variables NAME...; AIRFLOW_FERNET_KEY must
# be a Fernet key (32 url-safe base64 bytes) or, while rotating, a comma-separated list of them;
# every other NAME a random string of 16+ characters.
# Prints one line naming the first bad variable and how to make a value, and exits 1.
# POSIX sh and shell built-ins only, so it runs in any image.
set -eu

MIN_LENGTH=16
RANDOM_HINT='generate one with `openssl rand -hex 24` and put it in .env'
FERNET_HINT='generate one with `python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"` and put it in .env'

fail() {
    printf 'preflight: %s\n' "$1" >&2
    exit 1
}

[ "$#" -gt 0 ] || fail "no variables to check: pass their names as arguments"

for name in "$@"; do
    case $name in
        *[!A-Za-z0-9_]* | [0-9]* | '') fail "not a variable name: '$name'" ;;
    esac
    eval "value=\${$name-}"
    case $value in
        *[Cc][Hh][Aa][Nn][Gg][Ee][Mm][Ee]*)
            fail "$name still holds the .env.example placeholder; $RANDOM_HINT"
            ;;
    esac
    if [ "$name" = AIRFLOW_FERNET_KEY ]; then
        [ -n "$value" ] || fail "$name is empty, so Airflow would store connection passwords unencrypted; $FERNET_HINT"
        # While rotating, Airflow takes `new,old`: check each key.
        rest=$value,
        while [ -n "$rest" ]; do
            key=${rest%%,*}
            rest=${rest#*,}
            case $key in
                *[!A-Za-z0-9_=-]*) fail "$name is not a Fernet key (url-safe base64 only); $FERNET_HINT" ;;
            esac
            [ "${#key}" -eq 44 ] && [ "${key%=}" != "$key" ] ||
                fail "$name is not a Fernet key (44 characters ending in '='); $FERNET_HINT"
        done
        continue
    fi
    [ -n "$value" ] || fail "$name is empty; $RANDOM_HINT"
    [ "${#value}" -ge "$MIN_LENGTH" ] ||
        fail "$name is shorter than $MIN_LENGTH characters; $RANDOM_HINT"
done
echo "preflight: $# secrets set, none of them a placeholder"
