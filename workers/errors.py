"""What a failed attempt's error means: whose fault it is, and what of it a tenant may read.

An infrastructure fault (the object store or a Ray node, worker or object lost; Ray's storage in the
bucket unreachable; a co-trained member's end stalled on them) is not the job's doing: the dispatcher
hands the job back to resume from its checkpoint (`is_infrastructure_fault`).

A tenant sees an error's class and a short first line with paths and URLs removed; Ray's
worker-group errors embed worker tracebacks, and model or tokenizer errors name the server's files.
The full text is for operators only: the log and the job's `last_failure` field.

Ray wraps the errors of its workers (`__cause__`, RayTaskError's `cause`, Ray Train's
`worker_failures` and `controller_failure`), so every question here walks the whole chain.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator

__all__ = ["error_chain", "full_text", "is_infrastructure_fault", "scrub_paths", "tenant_summary"]

TENANT_MESSAGE_MAX_CHARS = 300
# An absolute path (POSIX, home-relative, or Windows), not the path part of a URL or of "org/name".
_PATH = re.compile(r"""(?<![\w.:/~\\-])(?:[A-Za-z]:\\|~?/)[^\s'"`,;:()\[\]{}<>]+""")
# A URL: an S3 endpoint or other internal address of the operator's.
_URL = re.compile(r"""\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"`<>]+""")
# Files whose OSErrors are the object store's (a local store on a full or failing disk), not the job's.
_OBJECT_STORE_FILES = ("fleet/objectstore.py",)
# pyarrow's S3 filesystem (Ray Train's storage in the bucket, workers.ray_storage) raises a bare OSError
# whose message names the AWS error; it reaches the dispatcher without a traceback, so the message is all
# there is. Unreachable, 5xx and throttling errors are the machinery's; access or config errors are not.
_S3_STORAGE_OUTAGE = re.compile(
    r"AWS Error (?:NETWORK_CONNECTION|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|SLOW_DOWN|THROTTLING|REQUEST_TIMEOUT)\b"
    r"|AWS Error \w+ \(HTTP status 5\d\d\)")


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every error it wraps, each once, outermost first."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "cause", None),
                   getattr(current, "controller_failure", None),
                   getattr(current, "health_check_failure", None),  # a rank Ray Train found unreachable
                   *(getattr(current, "worker_failures", None) or {}).values()]
        pending.extend(e for e in wrapped if isinstance(e, BaseException))


def scrub_paths(text: str) -> str:
    """`text` with every URL replaced by `<url>` and every absolute filesystem path by `<path>`."""
    return _PATH.sub("<path>", _URL.sub("<url>", text))


def _first_line(error: BaseException) -> str:
    """The line that says what went wrong: a pydantic ValidationError's first error, else the first line."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"{error.title}: {where + ': ' if where else ''}{first.get('msg', '')}"
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


def tenant_summary(error: BaseException, limit: int = TENANT_MESSAGE_MAX_CHARS) -> str:
    """What a tenant may read of `error`: its class and first line, and those of its root cause,
    without filesystem paths or URLs, at most `limit` characters."""
    chain = list(error_chain(error))
    root = chain[-1]
    text = f"{type(error).__name__}: {_first_line(error)}"
    if root is not error:
        text += f" (caused by {type(root).__name__}: {_first_line(root)})"
    text = scrub_paths(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def full_text(error: BaseException) -> str:
    """Everything about `error` for operators: each error of its chain with its message."""
    return " <- ".join(f"{type(e).__name__}: {e}" for e in error_chain(error))
def _raised_in_object_store(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    return any(frame.filename.replace("\\", "/").endswith(_OBJECT_STORE_FILES) for frame in frames)


def _infrastructure_types() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rx
    from botocore import exceptions as bx

    from workers.member_ends import MemberEndTimedOut

    return (
        MemberEndTimedOut,  # a co-trained member's end stalled on the object store or Redis
        bx.ConnectionError, bx.HTTPClientError,  # EndpointConnectionError, ConnectionClosedError, timeouts
        rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError, rx.RayActorError,
        rx.ActorUnavailableError, rx.ObjectLostError, rx.ObjectFetchTimedOutError, rx.RaySystemError,
    )


def is_infrastructure_fault(error: BaseException) -> bool:
    """Whether `error` comes from the machinery rather than the job: the object store or Ray's storage in
    the bucket unreachable or failing (connection errors, S3 5xx, an OSError inside the local store), or
    a Ray node, worker or object lost. Such a job is handed back to resume from its checkpoint."""
    from botocore.exceptions import ClientError

    kinds = _infrastructure_types()
    for e in error_chain(error):
        if isinstance(e, kinds):
            return True
        if isinstance(e, ClientError) and int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500:
            return True
        if isinstance(e, OSError) and (_raised_in_object_store(e) or _S3_STORAGE_OUTAGE.search(str(e))):
            return True
    return False
