"""Getting work in: a Python client, bulk listings, upload events and the CLI. No torch here."""
