"""data_server."""
