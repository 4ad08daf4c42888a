"""Shared parts of poolfleet: protocol, codec, errors, config, logging, sockets."""
