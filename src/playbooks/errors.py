"""The exceptions of playbooks, split at one boundary.

* :class:`LLMCodeError` and its subclasses are errors *in the code the LLM wrote*: a syntax error, an
  exception raised by a statement. The caller shows them to the LLM (they carry the statement, its line
  and column in the whole response, and the executed prefix) and may ask for a fix.
* :class:`InterpreterError` and its subclasses are errors *of the interpreter or its storage*: a corrupt
  or unwritable checkpoint, a replay that diverged from the journal, a run locked by another process.
  They are bugs or outages; showing them to the LLM would not help.
"""

from __future__ import annotations

from typing import Any


class PlaybooksError(Exception):
    """Base class of every exception raised by playbooks.

    Subclasses keep their details as attributes set from keyword-only arguments, which are not in
    ``self.args``; :meth:`__reduce__` rebuilds from the attributes so every error survives pickling
    (journals and final snapshots store them; so do multiprocessing and test runners).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(cls: type[PlaybooksError], args: tuple[Any, ...], state: dict[str, Any]) -> PlaybooksError:
    error = cls.__new__(cls, *args)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class LLMCodeError(PlaybooksError):
    """Raised when the LLM's code fails; carries where it failed and what had already run.

    ``statement`` is the failing statement's source, ``lineno``/``col_offset`` its position in the whole
    LLM response (1-based line, 0-based column, in characters), and ``executed_code`` the prefix of the
    code that ran successfully before it.
    """

    def __init__(
        self,
        message: str,
        *,
        statement: str = "",
        lineno: int | None = None,
        col_offset: int | None = None,
        executed_code: str = "",
        traceback_text: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.statement = statement
        self.lineno = lineno
        self.col_offset = col_offset
        self.executed_code = executed_code
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        where = f"line {self.lineno}" if self.lineno is not None else "unknown line"
        if self.col_offset is not None:
            where += f", column {self.col_offset}"
        return f"{self.message} ({where} of the LLM response)"


class CodeSyntaxError(LLMCodeError):
    """Raised as soon as a complete statement of the LLM's code does not compile."""


class CodeExecutionError(LLMCodeError):
    """Raised when a statement of the LLM's code raises; ``__cause__`` is the original exception."""


class InterpreterError(PlaybooksError):
    """Base class of errors of the interpreter or its storage, not of the LLM's code."""


class ExecutorStateError(InterpreterError):
    """Raised when the executor is used out of order (for example ``add_chunk`` after ``finalize``)."""


class CheckpointError(InterpreterError):
    """Base class of checkpoint failures; an earlier checkpoint is always left intact."""


class CheckpointWriteError(CheckpointError):
    """Raised when a checkpoint cannot be written (disk full, permission denied, ...)."""


class SecretStoredError(CheckpointWriteError):
    """Raised instead of storing a secret's value (an API key) in a checkpoint, a cassette or a value
    sent to an isolated worker; ``name`` is the environment variable that holds it. Nothing was
    written: the earlier checkpoints are intact."""

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class LeaseLostError(CheckpointWriteError):
    """Raised at a write when this process's lease on the execution expired and another worker took
    the run over (fencing): the write is refused, the process must stop, and the new owner goes on."""


class CheckpointCorruptError(CheckpointError):
    """Raised when a stored checkpoint fails its format or checksum check; it is never unpickled."""


class CheckpointTamperedError(CheckpointCorruptError):
    """Raised when a checkpoint's HMAC does not match the configured key; it is never unpickled."""


class CheckpointTooLargeError(CheckpointError):
    """Raised when a checkpoint would exceed ``max_checkpoint_size_mb``; names the largest variables."""


class UnpicklableValueError(CheckpointError):
    """Raised under the ``strict`` policy when a variable cannot be pickled; names it and its type."""


class ExecutionLockedError(InterpreterError):
    """Raised when another live process already runs (holds the lock of) the same execution id."""


class NonDeterminismError(InterpreterError):
    """Raised when a replayed durable call differs (name or arguments) from the one in the journal."""


class UnrestoredValueError(PlaybooksError, NameError):
    """Raised when LLM code uses a variable that was left out of a checkpoint and so was not restored."""


class CheckpointWarning(UserWarning):
    """Warns about something a checkpoint left out or skipped: an unpicklable variable, a corrupt record
    that loading fell back from, a call that may have run twice."""


class CheckpointFormatError(CheckpointCorruptError):
    """Raised when a stored record has a format version this playbooks does not read (a newer or a
    retired one); the message names both versions. The record is never unpickled."""


class CheckpointKeyError(CheckpointTamperedError):
    """Raised when records were signed with another key than the configured one (or the key cannot be
    read or created); the message says where the configured key comes from. Never unpickled."""


class CheckpointForeignError(CheckpointTamperedError):
    """Raised when a record's signature verifies but it belongs to another execution, another counter or
    another store history (copied, moved or rolled back from elsewhere). It is never unpickled."""


class StoreReplacedError(CheckpointWriteError):
    """Raised at a write when the execution's checkpoint folder (or file) was deleted or replaced while
    this process held it: writing on would lose records, and another process may now own the run."""


class CheckpointConfigError(CheckpointError):
    """Base class of storage settings that cannot work (a bad storage path, an unknown provider, an
    execution id that cannot name a run); raised before anything is written."""


class StoragePathError(CheckpointConfigError):
    """Raised when ``storage_path`` cannot hold checkpoints: it contains a NUL byte, or it cannot be
    created, or it is not a writable folder."""


class UnknownProviderError(CheckpointConfigError, LookupError):
    """Raised when ``durability.provider`` names no built-in or registered checkpoint provider; the
    message lists the available names."""


class InvalidExecutionIdError(CheckpointConfigError, ValueError):
    """Raised when an execution (run) id cannot name a run in a store: empty, starting with a dot, or
    containing a path separator, a NUL byte or other control characters."""


class HostIOError(InterpreterError):
    """Raised when the host fails under a call of the LLM's code (standard output closed, a full disk):
    it ends the run and is never reported to the LLM or journaled as an error of its code, so a resumed
    run makes the call again."""


class SandboxLimitError(CodeExecutionError):
    """Raised when LLM code running in an isolated worker exceeds one of its limits
    (:class:`~playbooks.execution.sandbox.SandboxLimits`); the message names the limit and the
    statement, so the LLM can change its code. The run goes on."""


class TimeLimitError(SandboxLimitError):
    """A statement (or a whole response) of LLM code ran longer than its wall-time limit."""


class MemoryLimitError(SandboxLimitError):
    """LLM code asked for more memory than the worker's limit."""


class CPULimitError(SandboxLimitError):
    """LLM code used up the worker's CPU-time limit."""


class OutputLimitError(SandboxLimitError):
    """LLM code printed more than the output limit of one response."""


class ImportBlockedError(SandboxLimitError):
    """LLM code imported a module the sandbox's import policy refuses."""


class WorkerDiedError(CodeExecutionError):
    """LLM code ended the worker process that ran it (``sys.exit``, ``os._exit``, a crash, a signal);
    the host restored the state before that statement in a fresh worker and the run goes on."""


class SandboxError(InterpreterError):
    """The isolated executor itself failed (its worker cannot start, broke the channel's protocol, or
    died more often than allowed); an error of the host, never reported to the LLM."""


class IsolatedRunError(CheckpointError):
    """Raised when a process that is not an isolated worker would unpickle values of an execution
    written by one: those bytes came from untrusted code, and are only ever unpickled in a worker."""
