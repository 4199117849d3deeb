"""Stragglers and dropped learners in the Flower server (issue: survive faults), in process
with real Flower over loopback: three named clients in threads, one of which stops answering
in round 2; the server reports it while the round runs, drops it at ``round_timeout_s`` and
trains on with the other two (the SLA's minimum)."""

import contextlib
import itertools
import threading
from typing import Any

import numpy as np
from waiting import wait_until

from aggregator.flower_server import (
    FlowerServer,
    LearnerEvent,
    LearnersDropped,
    Straggler,
    TrainingResult,
    TrainingSettings,
)
from aggregator.learner_events import describe_event
from aggregator.run_record import Participation, round_metrics
from flops_utils.contract.messages import StatusMessage
from flops_utils.contract.training import CLIENT_NAME_PROPERTY
from flops_utils.net import find_free_port
from flops_utils.types import Component, ComponentStatus

ROUND_TIMEOUT_S = 4.0
NOTICE_S = 1.0
NAMES = ("node-a", "node-b", "node-c")


class _NamedClient:
    """A Flower client named ``name`` whose fit returns ones; with ``stall_round`` its fit of
    that round blocks until :attr:`release` is set (a stalled learner)."""

    def __init__(self, name: str, stall_round: int = 0) -> None:
        self.name, self.stall_round = name, stall_round
        self.release = threading.Event()
        self.fits = 0

    def client(self) -> Any:
        from flwr.client import Client
        from flwr.common import (
            Code,
            EvaluateRes,
            FitRes,
            GetPropertiesRes,
            Status,
            ndarrays_to_parameters,
        )

        outer = self
        ok = Status(code=Code.OK, message="")

        class _Client(Client):
            def get_properties(self, ins: Any) -> Any:
                return GetPropertiesRes(status=ok, properties={CLIENT_NAME_PROPERTY: outer.name})

            def fit(self, ins: Any) -> Any:
                outer.fits += 1
                if outer.fits == outer.stall_round:
                    outer.release.wait(ROUND_TIMEOUT_S * 5)
                parameters = ndarrays_to_parameters([np.ones(2)])
                return FitRes(status=ok, parameters=parameters, num_examples=1, metrics={})

            def evaluate(self, ins: Any) -> Any:
                return EvaluateRes(status=ok, loss=0.5, num_examples=1, metrics={})

        return _Client()


def _train(clients: list[_NamedClient], events: list[LearnerEvent]) -> TrainingResult:
    from flwr.client import start_client

    settings = TrainingSettings(
        address=f"127.0.0.1:{find_free_port()}",
        num_rounds=3,
        min_available_clients=2,
        min_fit_clients=2,
        min_evaluate_clients=2,
        round_timeout_s=ROUND_TIMEOUT_S,
        connect_timeout_s=30,
        straggler_notice_s=NOTICE_S,
    )
    flower_clients = [c.client() for c in clients]  # built here: see test_strategies
    with FlowerServer(settings, on_learners=events.append) as flower:

        def learn(flower_client: Any) -> None:
            with contextlib.suppress(Exception):  # the stalled one finds its stream aborted
                start_client(server_address=settings.address, client=flower_client)

        threads = [threading.Thread(target=learn, args=(c,), daemon=True) for c in flower_clients]
        for thread in threads:
            thread.start()
        wait_until(lambda: flower.connected() == len(clients), 30, "clients connecting")
        try:
            result = flower.train([np.zeros(2)])
            flower.disconnect()
        finally:
            for client in clients:
                client.release.set()
    for thread in threads:
        thread.join(30)
    return result


def test_a_stalled_learner_is_reported_then_dropped_and_training_goes_on() -> None:
    # Prepare: node-c stops answering in its second fit (round 2).
    clients = [_NamedClient("node-a"), _NamedClient("node-b"), _NamedClient("node-c", 2)]
    events: list[LearnerEvent] = []

    # Execute
    result = _train(clients, events)

    # Assert: three rounds, the last two over the two others.
    assert [(r.round, r.learners) for r in result.rounds] == [(1, 3), (2, 2), (3, 2)]
    stragglers = [e for e in events if isinstance(e, Straggler)]
    assert {(e.learner, e.round, e.phase) for e in stragglers} == {("node-c", 2, "training")}
    waits = [e.waited_s for e in stragglers]
    assert 2 <= len(waits) <= ROUND_TIMEOUT_S / NOTICE_S, waits
    assert waits[0] >= NOTICE_S
    assert all(b - a >= NOTICE_S * 0.9 for a, b in itertools.pairwise(waits)), waits
    dropped = [e for e in events if isinstance(e, LearnersDropped)]
    assert dropped == [LearnersDropped(2, "training", ["node-c"], True, 2, 2, True)]

    # ... the rounds name each client's results and the dropped one, which the MLflow run
    # records as lost in rounds 2 and 3.
    assert [[c.name for c in r.clients] for r in result.rounds] == [
        list(NAMES),
        *[list(NAMES[:2])] * 2,
    ]
    assert [r.dropped for r in result.rounds] == [(), ("node-c",), ()]
    assert all(c.fit_examples == 1 and c.loss == 0.5 for r in result.rounds for c in r.clients)
    participation = Participation(frozenset(NAMES))
    lost = [participation.record(r) for r in result.rounds]
    assert lost == [[], ["node-c"], ["node-c"]]
    assert round_metrics(result.rounds[1], "learner", lost[1])["lost_learners"] == 1.0

    # ... and the events make valid progress messages with the documented texts.
    text, data = describe_event(stragglers[0], "learner", "round_timeout_s", ROUND_TIMEOUT_S)
    assert text == f"learner node-c has not answered round 2 for {waits[0]:.0f} s"
    message = StatusMessage.build(
        "p", Component.AGGREGATOR, ComponentStatus.PROGRESS, message=text, data=data
    )
    assert message.data["learner"] == "node-c" and message.data["stage"] == "straggler"
    text, data = describe_event(dropped[0], "learner", "round_timeout_s", ROUND_TIMEOUT_S)
    assert text == (
        "round 2 training: dropped learner(s) node-c (no answer within round_timeout_s 4s); "
        "going on with 2 (the SLA needs 2)"
    )
    StatusMessage.build(
        "p", Component.CLUSTER_AGGREGATOR, ComponentStatus.PROGRESS, message=text, data=data
    )


def test_nobody_is_reported_when_every_learner_answers() -> None:
    events: list[LearnerEvent] = []

    result = _train([_NamedClient(name) for name in NAMES], events)

    assert [r.learners for r in result.rounds] == [3, 3, 3]
    assert events == []
