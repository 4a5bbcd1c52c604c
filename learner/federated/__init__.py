"""Federated learning: customer sites train on data that never leaves them.

`client_app` (the ClientApp a site's SuperNode runs), `server_app` (the ServerApp the
SuperLink starts per run) and `server.FederatedRun` (rounds, client-level ε in the
ledger, gate, registry, promotion); `worker` and `supernode` cut Flower's per-round
latency; `processes` starts it all. See docs/federated.md.
"""
