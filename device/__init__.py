"""Device side of fieldpack: install bundles (A/B slots) and answer offline. Never imports torch, transformers
or builder; a test keeps it so."""
