"""The gRPC transport: a thin servicer over the engine, the status table, the token check."""
