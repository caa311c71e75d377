"""Types of the compiled record loop (``_tlsread.c``); absent where it was not built."""

FULL: int
NEEDS_INPUT: int

def configure(ssl_read_address: int, ssl_get_error_address: int, want_read_code: int, /) -> None: ...
def read_records(ssl_address: int, buffer_address: int, size: int, /) -> tuple[int, int]: ...
