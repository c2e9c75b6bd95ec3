"""Tandem's server: the engine, the gRPC transport over it, and replication. No torch here.

    app (composition root) -> api (gRPC) -> admission, metrics -> replication -> engine
    -> settings; the engine uses the models and artifacts (tandem.encoders, tandem.artifact)

``.importlinter`` holds these layers, and ``make test`` checks that no import goes upward.
"""
