"""Demo sections, one module per domain, each exposing run(device, quick) -> list[dict]."""
