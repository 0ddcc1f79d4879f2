"""Demo sections, one module per domain: run(device, quick) -> list of table rows."""
