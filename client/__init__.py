"""twostage client: generated stubs (`twostage.v1`), a thin typed client, and the `twostage` CLI."""
