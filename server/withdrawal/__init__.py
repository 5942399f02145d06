"""Client-initiated withdrawal: the gRPC/TLS service, the consent registry, and the sources the round loop reads."""
