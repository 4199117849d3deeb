"""Write the manager's admin credential into Mosquitto's dynamic-security state.

docker-compose.yml runs this (service ``mqtt-init``, from the manager image, before Mosquitto
starts) with the broker's data volume at ``/mosquitto/data``: the admin client and role of
``FLOPS_MQTT_ADMIN_USERNAME`` / ``FLOPS_MQTT_ADMIN_PASSWORD`` are (re)written exactly as the
embedded broker writes them (``flops_manager.broker.write_dynsec_state``); the per-project
credentials the manager issued stay. The file is handed to Mosquitto's user
(``MOSQUITTO_UID``, 1883 in the eclipse-mosquitto image), who keeps it up to date.
"""

import os
import sys
from pathlib import Path

from flops_manager.broker import DYNSEC_FILE, write_dynsec_state
from flops_manager.mqtt_access import MqttCredential

DATA_DIR = Path("/mosquitto/data")


def main() -> None:
    """Write ``/mosquitto/data/dynamic-security.json``; exit 2 when a setting is missing."""
    username = os.environ.get("FLOPS_MQTT_ADMIN_USERNAME", "")
    password = os.environ.get("FLOPS_MQTT_ADMIN_PASSWORD", "")
    if not username or not password:
        sys.exit("FLOPS_MQTT_ADMIN_USERNAME and FLOPS_MQTT_ADMIN_PASSWORD must be set in .env")
    uid = int(os.environ.get("MOSQUITTO_UID", "1883"))
    state = DATA_DIR / DYNSEC_FILE
    write_dynsec_state(state, MqttCredential(username, password), anonymous=False)
    os.chown(DATA_DIR, uid, uid)
    os.chown(state, uid, uid)
    print(f"dynamic-security state written for the admin {username!r}", flush=True)


if __name__ == "__main__":
    main()
