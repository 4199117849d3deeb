#!/bin/sh
# The official mongo image's first-start root user, in short: start without authentication on
# loopback, create the root user, then serve with authentication on every interface.
set -eu
serve() {
    exec secantusd-py --host 0.0.0.0 --port 27017 --storage-path /data/db --standalone "$@"
}
if [ -z "${MONGO_INITDB_ROOT_USERNAME:-}" ]; then
    serve
fi
if [ ! -e /data/db/.flops-root-user ]; then
    secantusd-py --host 127.0.0.1 --port 27017 --storage-path /data/db --standalone &
    pid=$!
    /opt/secantus/bin/python - <<'PY'
import os, time
import pymongo
client = pymongo.MongoClient("mongodb://127.0.0.1:27017", serverSelectionTimeoutMS=1000)
deadline = time.monotonic() + 60
while True:
    try:
        client.admin.command("ping")
        break
    except pymongo.errors.ConnectionFailure:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
client.admin.command(
    "createUser",
    os.environ["MONGO_INITDB_ROOT_USERNAME"],
    pwd=os.environ["MONGO_INITDB_ROOT_PASSWORD"],
    roles=[{"role": "root", "db": "admin"}],
)
PY
    kill "$pid"
    wait "$pid" || true
    touch /data/db/.flops-root-user
fi
serve --auth
