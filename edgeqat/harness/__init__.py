"""On-device validation: a standalone runner and the transports that carry it."""
