#!/bin/sh
# As eclipse-mosquitto's docker-entrypoint.sh: as root, hand /mosquitto to the mosquitto user.
set -e
if [ "$(id -u)" = 0 ]; then
    chown -R mosquitto:mosquitto /mosquitto 2>/dev/null || true
fi
exec "$@"
