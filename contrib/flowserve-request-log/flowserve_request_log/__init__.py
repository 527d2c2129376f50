"""flowserve-request-log: one JSON line per finished request (see ``plugin``)."""
