"""``python -m data_server``: the same as ``flops-data-server`` (see :mod:`data_server.main`)."""

from data_server.main import main

raise SystemExit(main())
