"""Generated gRPC stubs of ``store.proto`` (tools/gen_store_stubs.py writes them; do not edit by hand)."""
