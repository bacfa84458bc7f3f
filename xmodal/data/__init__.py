"""Data: the particle schema, readers, the synthetic generator, ingest, transforms, Ray Data pipeline."""
