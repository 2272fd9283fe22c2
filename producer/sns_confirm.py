"""Confirming an SNS subscription: a GET of its SubscribeURL, and only of a URL that is https on
SNS's own hosts (`sns.<region>.amazonaws.com`, `.amazonaws.com.cn`) or on a host the settings
allow (`sns_confirm_hosts`), so that a forged confirmation cannot make the consumer fetch an
arbitrary URL. Redirects are not followed.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from schemas.errors import ErrorCode, SourceError, TransientError

SNS_HOSTS = ("sns.*.amazonaws.com", "sns.*.amazonaws.com.cn")
CONFIRM_TIMEOUT_S = 10


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http_get(url: str) -> int:
    """GET `url` (no redirects); its HTTP status."""
    opener = urllib.request.build_opener(_NoRedirect)
    with opener.open(url, timeout=CONFIRM_TIMEOUT_S) as response:
        response.read(64 * 1024)
        return int(response.status)


@dataclass(frozen=True)
class SubscriptionConfirmer:
    extra_hosts: Sequence[str] = ()
    fetch: Callable[[str], int] = http_get

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        host = parts.hostname or ""
        return (parts.scheme == "https" and parts.username is None
                and any(fnmatchcase(host, pattern) for pattern in (*SNS_HOSTS,
                                                                     *self.extra_hosts)))

    def confirm(self, url: str) -> None:
        """Raises SourceError for a URL that may not be fetched or a refusal (permanent), and
        TransientError for a network fault or a server error (the message is redelivered)."""
        if not self.allowed(url):
            raise SourceError(f"SubscribeURL is not an allowed https SNS URL: {url[:200]!r}",
                              code=ErrorCode.SOURCE_NOT_ALLOWED)
        try:
            status = self.fetch(url)
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            raise TransientError(f"confirming the subscription failed: {exc}") from exc
        if 400 <= status < 500:
            raise SourceError(f"SNS refused the confirmation (HTTP {status})",
                              code=ErrorCode.ACCESS_DENIED)
        if status != 200:
            raise TransientError(f"confirming the subscription failed: HTTP {status}")
