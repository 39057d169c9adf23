"""The error hierarchy of bootback.

Every error a user can cause or meet has a class here, a message naming the offending value, and a
distinct exit code so scripts can tell failures apart (borg's convention). Code below the CLI raises
these; only ``cli.main`` turns them into exit codes and stderr lines.
"""

from __future__ import annotations


class BootbackError(Exception):
    """Base of all expected errors; ``exit_code`` is the CLI's exit status for it."""

    exit_code = 2


class UsageError(BootbackError):
    """The command line or an API request is malformed."""

    exit_code = 2


class ConfigError(BootbackError):
    """A configuration file or setting is invalid."""

    exit_code = 3


class RepositoryError(BootbackError):
    """Base of repository errors."""

    exit_code = 10


class NotARepositoryError(RepositoryError):
    exit_code = 11


class UnsupportedFormatError(RepositoryError):
    """The repository or an object in it was written by a newer bootback (or is not ours)."""

    exit_code = 12


class RepositoryLockedError(RepositoryError):
    """Another process holds the repository's write lock."""

    exit_code = 13


class RestorePointNotFoundError(RepositoryError):
    exit_code = 14


class IntegrityError(RepositoryError):
    """Stored data does not match its hash, or an object is missing or damaged."""

    exit_code = 15


class StorageUnavailableError(RepositoryError):
    """The repository's storage cannot be reached or refuses us (an S3 endpoint down, wrong credentials, no
    such bucket); nothing was misread, and what a failed write left is invisible (never referenced)."""

    exit_code = 16


class RepositoryKeyError(RepositoryError):
    """An encrypted repository cannot be opened: no key or passphrase was given, or it is the wrong one."""

    exit_code = 17


class SourceError(BootbackError):
    """A source disk or VM folder cannot be read: unknown format, truncated, missing."""

    exit_code = 20


class NoSpaceError(BootbackError):
    """A disk filled up (repository, cache or output)."""

    exit_code = 30


class SessionError(BootbackError):
    exit_code = 40


class SessionNotFoundError(SessionError):
    exit_code = 41


class DaemonNotRunningError(BootbackError):
    exit_code = 50


class FileRecoveryError(BootbackError):
    """A path, partition or filesystem inside a backed-up disk that cannot be browsed as asked."""

    exit_code = 60


class FileNotFoundInBackupError(FileRecoveryError):
    """The path or volume does not exist inside the backed-up disk."""


class ItemRecoveryError(BootbackError):
    """An application inside a backed-up disk (database, directory, mail store) that cannot be found, started
    or read as asked: missing, an unsupported version, damaged files, or server binaries not installed."""

    exit_code = 62


class VerificationFailedError(BootbackError):
    """A restore point did not boot to the expected state (``bootback verify-boot``)."""

    exit_code = 70


class PathNotAllowedError(UsageError):
    """A path the daemon would write for a caller (migration output, write cache) lies outside the directories
    the operator allowed, or reaches through a symbolic link."""


class OutputExistsError(UsageError):
    """A migration output already exists and the caller did not ask to overwrite it."""


class LimitExceededError(SessionError):
    """A configured bound (sessions, concurrent verifications, disk size) would be exceeded."""

    exit_code = 42


class DiskTooLargeError(BootbackError):
    """A write or size change would grow a published disk beyond its bound (the NFS client gets NFS3ERR_FBIG)."""

    exit_code = 43
