"""Peer implementations for the benchmarks: ``peers.<op>.<impl>(inputs, state, requires_grad) -> fn``, where
``fn()`` returns ``(y, final_state)``.  Conversions to the peer's conventions happen once, outside ``fn``."""
