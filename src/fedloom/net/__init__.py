"""The deployment runtime: a gRPC server and client processes driving the same algorithms as ``sim``.

Needs the ``net`` extra (``pip install 'fedloom[net]'``). Modules::

    server       run_server: opens the state directory and runs the round engine with the deployment driver
    driver       the deployment's side of a round (cohort, broadcast, collect, guarded server step)
    service      the gRPC service: the RPC handlers and who may call them
    serving      the server's lifecycle on one grpc.aio event loop
    coordinator  round bookkeeping between the driver and the RPC handlers (no grpc)
    attempt      what a round attempt holds and hands back when it closes (no grpc)
    validation   what an update must pass before it counts (no grpc)
    guard        the guarded server step: updates that break the model are left out
    wire         the codec: chunked parameter transfer and the update encoding (no grpc)
    state        SQLite tables for the client registry, pending updates (blobs in files) and the audit log
    timing       per-phase timings of a round (logged with round_committed)
    secure       secure aggregation: the server relays the four SecAgg stages (no grpc)
    auth         per-client tokens and their revocation
    pki          the CA, server and client certificates; site-made keys (CSR request and sign)
    transport    when plaintext is allowed (loopback, or insecure=True) and why a connection failed
    trust        what a client accepts from the server's config (it selects code, never names it)
    client       the client process: pull, train, push, reconnect
    datasources  how a client process loads its own data
    logs         structured (JSON lines) logging

The round loop itself, with resume, metrics, evaluation, stopping rules and the commit, is
the runtime-neutral round engine in :mod:`fedloom.engine`.
"""
