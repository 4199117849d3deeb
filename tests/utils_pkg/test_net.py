"""find_free_port chooses outside the kernel's ephemeral range (the cause of "Address already in
use" at MLflow's start when an outgoing connection took the chosen port first)."""

import socket

from flops_utils.net import (
    address_in_use,
    ephemeral_range,
    find_free_port,
    is_bindable,
    port_answers,
)


def test_free_ports_are_outside_the_ephemeral_range_distinct_and_bindable() -> None:
    low, high = ephemeral_range()
    ports = [find_free_port() for _ in range(50)]
    assert len(set(ports)) == 50, "a port was handed out twice before anyone bound it"
    for port in ports:
        assert not low <= port <= high
        assert is_bindable(port)


def test_a_port_in_use_is_not_handed_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        port = find_free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert not is_bindable(port)
        assert all(find_free_port() != port for _ in range(200))


def test_port_answers_only_while_something_listens() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", find_free_port()))
        server.listen()
        port = server.getsockname()[1]
        assert port_answers("127.0.0.1", port, 1.0)
    assert not port_answers("127.0.0.1", port, 1.0)


def test_address_in_use_is_recognised_in_each_server_s_words() -> None:
    assert address_in_use("1796290518: Error: Address already in use")  # Mosquitto
    assert address_in_use(
        "ERROR: [Errno 98] error while attempting to bind on address ('127.0.0.1', 5000): "
        "address already in use"  # uvicorn (MLflow)
    )
    assert not address_in_use("Error: Unable to open log file")
