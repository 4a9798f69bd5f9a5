"""Built-in ops. Each module declares one op and registers it through the public register_op."""
from . import wkv4, wkv6, wkv7  # noqa: F401
