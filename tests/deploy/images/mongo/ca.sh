#!/bin/sh
# Trust the CA certificates given as build argument EXTRA_CA_CERTS (a TLS-inspecting proxy
# between this machine and PyPI); nothing when it is empty.
set -eu
if [ -n "${EXTRA_CA_CERTS:-}" ]; then
    printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/flops-extra.crt
    update-ca-certificates >/dev/null 2>&1 || true
fi
