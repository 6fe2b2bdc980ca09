"""The bus layer: everything that talks to the NATS server.

Connection, resources, typed publishing, reading streams and buckets, routing and the
clients that use them (submit, history, outputs, the server's store). Imports the core only.
"""
