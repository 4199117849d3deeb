#!/bin/sh
# Installs Python requirements into /opt/flops/venv during an image build (FLOps oci builder).
#
# Usage: install.sh PYTHON REQUIREMENTS CONSTRAINTS
#   PYTHON        the base image's interpreter (name on PATH or absolute path)
#   REQUIREMENTS  a pip requirements file; an empty file installs nothing
#   CONSTRAINTS   a pip constraints file (the manager's versions)
#
# uv (and the host's CA bundle, if it has one set) comes from /flops-tools (a RUN --mount of the
# build context) and its cache is the host's uv cache mounted at /mnt as an overlay: none of
# them is kept in the image. Proxy variables are passed in by buildah. Attempts, in order: offline
# with the constraints (uv's cache only), online with them, online without them. The stderr of
# every failed attempt is printed between "##flops-uv-attempt MODE" and "##flops-uv-end"; when
# all fail the script exits with 42, from which the builder reports the resolver's message.
set -u
python=$1
requirements=$2
constraints=$3
uv=/flops-tools/uv
venv=/opt/flops/venv
export UV_CACHE_DIR=/mnt UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 UV_NO_PROGRESS=1 NO_COLOR=1 \
    UV_PYTHON_DOWNLOADS=never UV_PYTHON_PREFERENCE=only-system
if [ -f /flops-tools/ca-certificates.crt ]; then
    # the CA bundle uv trusts on the build host (SSL_CERT_FILE there), for a TLS-inspecting proxy
    export SSL_CERT_FILE=/flops-tools/ca-certificates.crt
fi

if [ ! -x "$venv/bin/python" ]; then
    "$uv" venv --no-project --python "$python" "$venv" || exit 1
fi
if [ ! -s "$requirements" ]; then
    exit 0
fi

errors=$(mktemp)
attempt() {
    mode=$1
    shift
    if "$uv" pip install --python "$venv/bin/python" -r "$requirements" "$@" 2>"$errors"; then
        cat "$errors"
        rm -f "$errors"
        exit 0
    fi
    echo "##flops-uv-attempt $mode"
    cat "$errors"
    echo "##flops-uv-end"
}
attempt offline --offline -c "$constraints"
attempt online -c "$constraints"
attempt online
rm -f "$errors"
exit 42
