"""twostage serving runtime: config -> model runtime -> batcher -> index -> gRPC service -> app."""
