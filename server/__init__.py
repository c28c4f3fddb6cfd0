"""twostage server: config -> roles (model layer + batcher) -> index -> engine -> gRPC service -> app."""
