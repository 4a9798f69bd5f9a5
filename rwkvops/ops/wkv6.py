"""RWKV-6 WKV (being written)."""
