"""``python -m aggregator``: run the aggregator process (see :mod:`aggregator.main`)."""

from aggregator.main import main

main()
