"""Small apps the multiprocess tests run inside real workers (``--app tests.apps.echo:app``)."""
