#!/bin/sh
# Installs Python requirements into a virtual environment during an image build (FLOps oci and
# model image builders).
#
# Usage: install.sh PYTHON REQUIREMENTS CONSTRAINTS EXCLUDES [VENV [CHECK]]
#   PYTHON        the base image's interpreter (name on PATH or absolute path)
#   REQUIREMENTS  a pip requirements file; an empty file installs nothing (but makes VENV)
#   CONSTRAINTS   a pip constraints file (the manager's versions)
#   EXCLUDES      distribution names, one a line, left out of the resolution (`uv pip install
#                 --excludes`): what Flower pulls in that no FLOps role imports; may be empty
#                 or "" (none)
#   VENV          the environment, made if missing; default /opt/flops/venv (the FLOps runtime
#                 of the learner and aggregator images, the model images' only one);
#                 /opt/flops/user-venv is the ML repository's own
#   CHECK         Python code run with VENV's interpreter after the install (e.g. imports that
#                 must work); its failure fails the step with "##flops-check-failed" and exit 43
#
# uv (and the host's CA bundle, if it has one set) comes from /flops-tools (a RUN --mount of the
# build context) and its cache is the host's uv cache mounted at /mnt as an overlay: none of
# them is kept in the image. Proxy variables are passed in by buildah. Attempts, in order: offline
# with the constraints (uv's cache only), online with them, online without them. The stderr of
# every failed attempt is printed between "##flops-uv-attempt MODE" and "##flops-uv-end"; when
# all fail the script exits with 42, from which the builder reports the resolver's message.
# After an install, slim_site_packages.py (next to this script) removes the test suites of big
# packages, in the same step, so they never reach a layer.
set -u
python=$1
requirements=$2
constraints=$3
excludes=$4
venv=${5:-/opt/flops/venv}
check=${6:-}
uv=/flops-tools/uv
slim="$(dirname "$0")/slim_site_packages.py"
# SOURCE_DATE_EPOCH makes the bytecode hash-checked (PEP 552) instead of timestamp-checked:
# still valid when a layer tool rounds file times (a COPY does, to the nearest second).
export UV_CACHE_DIR=/mnt UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 UV_NO_PROGRESS=1 NO_COLOR=1 \
    UV_PYTHON_DOWNLOADS=never UV_PYTHON_PREFERENCE=only-system SOURCE_DATE_EPOCH=315532800
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
if [ -n "$excludes" ] && [ -s "$excludes" ]; then
    set -- --excludes "$excludes"
else
    set --
fi

errors=$(mktemp)
attempt() {
    mode=$1
    shift
    if "$uv" pip install --python "$venv/bin/python" -r "$requirements" "$@" 2>"$errors"; then
        cat "$errors"
        rm -f "$errors"
        "$venv/bin/python" -I -B "$slim" "$venv" || exit 1
        if [ -n "$check" ] && ! "$venv/bin/python" -I -B -c "$check"; then
            echo "##flops-check-failed $venv"
            exit 43
        fi
        exit 0
    fi
    echo "##flops-uv-attempt $mode"
    cat "$errors"
    echo "##flops-uv-end"
}
attempt offline "$@" --offline -c "$constraints"
attempt online "$@" -c "$constraints"
attempt online "$@"
rm -f "$errors"
exit 42
