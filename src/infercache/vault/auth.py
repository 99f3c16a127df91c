"""Registry credentials and the auth challenge flow (Basic and Bearer token).

Credentials are looked up the way skopeo/podman and docker do, first match wins:
``--creds USER:PASS``; then ``--authfile FILE`` (alone, when given); else
``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``.

Hand-written rather than oras-py's ``oras.auth``: oras merges config files
through a ``set`` (the precedence above is lost) and its ``TokenAuth`` keeps
re-sending the first token it got even when a push needs a wider scope than the
pull that obtained it. We still use its ``WWW-Authenticate`` parser.

Secrets never reach a log record, an exception message or a ``repr``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from infercache.errors import BadInputError, InfercacheError
from infercache.net import is_loopback
from infercache.vault.reference import DOCKER_HUB_ALIASES, RegistryOptions

if TYPE_CHECKING:  # pragma: no cover
    import requests

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Credentials:
    """A user name and secret, and where they came from (for error messages)."""

    username: str
    password: str = field(repr=False)
    source: str = "--creds"

    def basic_token(self) -> str:
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


class AuthenticationError(InfercacheError):
    """The registry refused our credentials, or wants some and we have none (exit 1)."""


def parse_creds(text: str) -> Credentials:
    """`USER:PASS` (the password may contain ':'); an empty user is bad input."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise BadInputError("--creds must be USER:PASSWORD")
    return Credentials(user, password, "--creds")


def registry_options(
    tls_verify: bool = True, authfile: str | os.PathLike[str] | None = None, creds: str | None = None
) -> RegistryOptions:
    """Options from user input, checked before any transfer starts: `--creds` must be USER:PASS and
    `--authfile` an existing file (both bad input, exit 2). `vault` and `mcv` both build theirs here."""
    if creds is not None:
        parse_creds(creds)
    path = auth_file_candidates(Path(authfile))[0] if authfile is not None else None
    return RegistryOptions(tls_verify=tls_verify, authfile=path, creds=creds)


def auth_file_candidates(authfile: Path | None = None) -> list[Path]:
    """The auth files to read, in precedence order (an explicit --authfile is the only one)."""
    if authfile is not None:
        path = Path(authfile).expanduser()
        if not path.is_file():
            raise BadInputError(f"auth file {path} does not exist")
        return [path]
    candidates: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        candidates.append(Path(os.environ["REGISTRY_AUTH_FILE"]).expanduser())
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    docker_dir = Path(os.environ["DOCKER_CONFIG"]).expanduser() if os.environ.get("DOCKER_CONFIG") else None
    candidates.append((docker_dir or Path.home() / ".docker") / "config.json")
    return candidates


def _normalise_key(key: str) -> str:
    """'https://host:5000/v2/' → 'host:5000'; 'host/ns/repo' stays (podman's namespaced keys)."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    key = key.rstrip("/")
    for suffix in ("/v1", "/v2"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key


def _host_names(registry: str) -> list[str]:
    """Names an auth file may use for this registry."""
    names = [registry]
    if registry in DOCKER_HUB_ALIASES:
        names += [alias for alias in DOCKER_HUB_ALIASES if alias != registry]
    if registry.startswith("localhost"):
        names.append(registry.replace("localhost", "127.0.0.1", 1))
    elif registry.startswith("127.0.0.1"):
        names.append(registry.replace("127.0.0.1", "localhost", 1))
    return names


def _from_entry(entry: Any, source: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=False).decode()
        except (ValueError, UnicodeDecodeError):
            raise BadInputError(f"auth file {source}: an 'auth' entry is not base64 of USER:PASSWORD") from None
        user, sep, password = decoded.partition(":")
        if sep and user:
            return Credentials(user, password, source)
        raise BadInputError(f"auth file {source}: an 'auth' entry is not base64 of USER:PASSWORD")
    if entry.get("username") and "password" in entry:
        return Credentials(str(entry["username"]), str(entry["password"]), source)
    if entry.get("identitytoken"):
        log.warning("auth file %s: identity tokens are not supported; entry ignored", source)
    return None


def _from_helper(helper: str, host: str, source: str) -> Credentials | None:
    """Ask `docker-credential-<helper> get` (the docker credential-helper protocol)."""
    binary = f"docker-credential-{helper}"
    try:
        proc = subprocess.run([binary, "get"], input=host.encode(), capture_output=True, timeout=30, check=True)
        payload = json.loads(proc.stdout)
    except FileNotFoundError:
        log.warning("credential helper %s named in %s is not installed", binary, source)
        return None
    except (subprocess.SubprocessError, ValueError):
        log.debug("credential helper %s has no credentials for %s", binary, host)
        return None
    user, secret = payload.get("Username"), payload.get("Secret")
    return Credentials(str(user), str(secret), f"{source} ({binary})") if user and secret is not None else None


def _read_auth_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read auth file {path}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"auth file {path} is not a JSON object")
    return data


def lookup_credentials(
    registry: str, repository: str | None = None, creds: str | None = None, authfile: Path | None = None
) -> Credentials | None:
    """Credentials for `registry` (and `repository`, for namespaced auth.json keys), or None."""
    if creds:
        return parse_creds(creds)
    for path in auth_file_candidates(authfile):
        data = _read_auth_file(path)
        if data is None:
            continue
        auths = data.get("auths") or {}
        by_key = {_normalise_key(key): value for key, value in auths.items()} if isinstance(auths, dict) else {}
        for host in _host_names(registry):
            # Most specific first: host/ns/repo, host/ns, host.
            keys = []
            if repository:
                parts = repository.split("/")
                keys = [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
            for key in [*keys, host]:
                if key in by_key:
                    found = _from_entry(by_key[key], str(path))
                    if found:
                        log.debug("using credentials for %s from %s", registry, path)
                        return found
            helpers = data.get("credHelpers") or {}
            if isinstance(helpers, dict) and helpers.get(host):
                found = _from_helper(str(helpers[host]), host, str(path))
                if found:
                    return found
        if data.get("credsStore"):
            found = _from_helper(str(data["credsStore"]), registry, str(path))
            if found:
                return found
    return None


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str  # "basic" | "bearer"
    realm: str | None = None
    service: str | None = None
    scope: str | None = None

    @classmethod
    def parse(cls, header: str) -> "Challenge":
        from oras.auth.utils import parse_auth_header

        scheme = header.strip().split(" ", 1)[0].lower()
        params = parse_auth_header(header)
        return cls(scheme, params.realm, params.service, params.scope)


class RegistryAuth:
    """Answers a registry's 401 challenges and remembers the resulting header per scope.

    One instance per registry host; tokens are cached by scope so a pull token is
    never reused for a push.
    """

    def __init__(
        self, session: "requests.Session", registry: str, repository: str | None, creds: str | None,
        authfile: Path | None, verify: bool | str = True,
    ) -> None:
        self._session = session
        self._registry = registry
        self._repository = repository
        self._creds = creds
        self._authfile = authfile
        self._verify = verify
        self._credentials: Credentials | None = None
        self._looked_up = False
        self._headers: dict[str, str] = {}  # scope → Authorization value
        self._unproven: set[str] = set()  # scopes whose token has not yet been accepted

    def __repr__(self) -> str:
        return f"RegistryAuth({self._registry!r})"

    @property
    def credentials(self) -> Credentials | None:
        if not self._looked_up:
            self._credentials = lookup_credentials(self._registry, self._repository, self._creds, self._authfile)
            self._looked_up = True
        return self._credentials

    def header(self, scope: str) -> dict[str, str]:
        """The Authorization header already earned for `scope` (empty before any challenge)."""
        value = self._headers.get(scope) or self._headers.get("*")
        return {"Authorization": value} if value else {}

    def accepted(self, scope: str) -> None:
        """The registry took our header for `scope`: a later 401 means expiry, not refusal."""
        self._unproven.discard(scope)

    def answer(self, response: "requests.Response", scope: str) -> dict[str, str]:
        """Turn a 401 into the header to retry with; raise when we cannot or were refused."""
        raw = response.headers.get("WWW-Authenticate", "")
        if not raw:
            raise AuthenticationError(f"{self._registry} answered 401 without an authentication challenge")
        challenge = Challenge.parse(raw)
        creds = self.credentials
        if challenge.scheme == "basic":
            if creds is None:
                raise AuthenticationError(self._no_credentials_message())
            if self._headers.get("*"):
                raise AuthenticationError(self._refused_message(response))
            self._headers["*"] = f"Basic {creds.basic_token()}"
            return self.header(scope)
        if challenge.scheme == "bearer":
            # Ask for what we will need (push includes pull) and what the challenge names.
            # `scope` may hold several, space-separated (a cross-repository mount needs two).
            scopes = scope.split()
            scopes += [challenge.scope] if challenge.scope and challenge.scope not in scopes else []
            if scope in self._unproven:  # a token fetched just now was refused
                raise AuthenticationError(self._refused_message(response))
            # No token yet, or one that worked before and has expired: fetch (again).
            self._headers[scope] = f"Bearer {self._fetch_token(challenge, scopes)}"
            self._unproven.add(scope)
            return self.header(scope)
        raise AuthenticationError(f"{self._registry} asks for unsupported authentication scheme {challenge.scheme!r}")

    def _fetch_token(self, challenge: Challenge, scopes: list[str]) -> str:
        if not challenge.realm:
            raise AuthenticationError(f"{self._registry}: bearer challenge without a realm")
        params = [("service", challenge.service)] if challenge.service else []
        params += [("scope", s) for s in scopes]
        headers = {"Accept": "application/json"}
        creds = self.credentials
        if creds is not None:
            realm = urlsplit(challenge.realm)
            if realm.scheme != "https" and self._verify and not is_loopback(realm.netloc):
                # The registry may be reached over TLS, yet name a plain-HTTP token service: the
                # password would cross the network in clear. Same rule as the registry itself.
                raise AuthenticationError(
                    f"{self._registry}: its token service {realm.scheme}://{realm.netloc} is not HTTPS; refusing "
                    "to send credentials there (--no-tls-verify allows it)"
                )
            headers["Authorization"] = f"Basic {creds.basic_token()}"
        log.debug("requesting a bearer token from %s for %s", challenge.realm, " ".join(scopes))
        import requests

        try:
            reply = self._session.get(
                challenge.realm, params=params, headers=headers, verify=self._verify, timeout=(15, 60),
                auth=NO_NETRC,
            )
        except requests.RequestException as exc:
            raise AuthenticationError(f"cannot reach token service of {self._registry}: {type(exc).__name__}") from None
        if reply.status_code in (401, 403):
            raise AuthenticationError(self._refused_message(reply))
        if reply.status_code != 200:
            raise AuthenticationError(f"token service of {self._registry} answered HTTP {reply.status_code}")
        try:
            data = reply.json()
            token = data.get("token") or data.get("access_token")
        except ValueError:
            token = None
        if not token:
            raise AuthenticationError(f"token service of {self._registry} returned no token")
        return str(token)

    def _no_credentials_message(self) -> str:
        return (
            f"{self._registry} requires authentication and no credentials were found "
            "(give --creds USER:PASS or --authfile FILE, or log in with skopeo/podman/docker login)"
        )

    def _refused_message(self, response: "requests.Response") -> str:
        creds = self.credentials
        who = f"as user {creds.username!r} (credentials from {creds.source})" if creds else "anonymously"
        return f"authentication to {self._registry} failed {who}: HTTP {response.status_code}"


def _no_netrc(request: Any) -> Any:
    """An explicit no-op auth so requests never injects ~/.netrc credentials over ours."""
    return request


NO_NETRC = _no_netrc
