"""The teachers package's exception types; every message is one line naming the file or key and the fix."""


class TeacherError(Exception):
    """Base error of the teachers package: a teacher that cannot be loaded or used as asked."""


class DataError(TeacherError):
    """A corpus source or prepared token directory that cannot be used (missing, empty, not UTF-8, ...)."""


class CacheError(TeacherError):
    """A teacher-logit cache that is corrupt, incomplete or built for other inputs."""
