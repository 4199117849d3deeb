"""find_free_port chooses outside the kernel's ephemeral range (the cause of "Address already in
use" at MLflow's start when an outgoing connection took the chosen port first)."""

import socket

from flops_utils.net import ephemeral_range, find_free_port, is_bindable


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
