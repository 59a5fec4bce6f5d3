# systemd.journal: sending to the journal (sd_journal_send(3), sd_journal_stream_fd(3)).
# The Reader API is not used by alive-switch and is left out.
import logging
from collections.abc import Callable
from typing import Final, TextIO
from uuid import UUID

LOG_EMERG: Final[int]
LOG_ALERT: Final[int]
LOG_CRIT: Final[int]
LOG_ERR: Final[int]
LOG_WARNING: Final[int]
LOG_NOTICE: Final[int]
LOG_INFO: Final[int]
LOG_DEBUG: Final[int]

# The upper-case names are the library's own (keyword arguments are journal fields).
# Extra fields: str is sent as UTF-8, bytes as-is, anything else as str(value).
def send(
    MESSAGE: str,  # noqa: N803
    MESSAGE_ID: str | UUID | None = None,  # noqa: N803
    CODE_FILE: str | None = None,  # noqa: N803
    CODE_LINE: int | None = None,  # noqa: N803
    CODE_FUNC: str | None = None,  # noqa: N803
    **kwargs: object,
) -> None: ...
def sendv(*args: str | bytes) -> None: ...
def stream(
    identifier: str | None = None, priority: int = ..., level_prefix: bool = False
) -> TextIO: ...
def stream_fd(identifier: str, priority: int, level_prefix: bool) -> int: ...

class JournalHandler(logging.Handler):
    def __init__(
        self,
        level: int = ...,
        sender_function: Callable[..., None] = ...,
        **kwargs: object,
    ) -> None: ...
    @classmethod
    def with_args(cls, config: dict[str, object] | None = None) -> JournalHandler: ...
    def emit(self, record: logging.LogRecord) -> None: ...
    def map_priority(self, levelno: int) -> int: ...
