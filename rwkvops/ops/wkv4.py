"""RWKV-4 WKV (being written)."""
