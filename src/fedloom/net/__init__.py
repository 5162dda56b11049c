"""The deployment runtime: a gRPC server and client processes driving the same algorithms as ``sim``.

Needs the ``net`` extra (``pip install 'fedloom[net]'``). Modules::

    wire         chunked parameter transfer and the update encoding (no grpc)
    state        SQLite tables for the client registry, pending updates (blobs in files) and the audit log
    timing       per-phase timings of a round (logged with round_committed)
    coordinator  round bookkeeping and update validation (no grpc)
    secure       secure aggregation: the server relays the four SecAgg stages (no grpc)
    auth         per-client tokens and their revocation
    pki          the CA, server and client certificates; site-made keys (CSR request and sign)
    transport    when plaintext is allowed (loopback, or insecure=True) and why a connection failed
    trust        what a client accepts from the server's config (it selects code, never names it)
    server       the gRPC service and the server's round loop
    client       the client process: pull, train, push, reconnect
    datasources  how a client process loads its own data
    logs         structured (JSON lines) logging
"""
