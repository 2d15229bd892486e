"""A TEST DOUBLE of Modal's control-plane API: a grpclib server implementing the RPCs of the
`ModalClient` service that the project's deploy path reaches, with honest in-memory state, so
the real modal SDK can be pointed at it on loopback (MODAL_SERVER_URL)."""
