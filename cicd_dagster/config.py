"""The two files users write: cicd.yaml (the control plane) and .cicd.yml (pipeline as code,
read from each commit of a watched repository).

Both are parsed with ruamel's round-trip loader, which remembers where every key and item
came from, and validated by pydantic models that reject unknown keys. Every problem is
raised as a ConfigError naming the file, the 1-based line and the field, so a user can fix
it without reading this module.
"""

import datetime
import difflib
import itertools
import re
import types
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedBase, CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarbool import ScalarBoolean
from semver import Version

from cicd_dagster.release.versioning import check_tag_format

DEFAULT_CONFIG_NAME = "cicd.yaml"
PIPELINE_FILE_NAME = ".cicd.yml"


class ConfigError(Exception):
    """A problem in a config file: where it is (file, line, field) and what is wrong.

    When a file has several problems, the first one by line is described by the attributes
    and the others are kept in `further_errors`; str() lists them all, one per line.
    """

    def __init__(
        self,
        path: str,
        line: int | None,
        field: str,
        message: str,
        further_errors: tuple["ConfigError", ...] = (),
    ) -> None:
        super().__init__(path, line, field, message, further_errors)
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        self.further_errors = further_errors

    def __str__(self) -> str:
        return "\n".join(error._describe_one() for error in (self, *self.further_errors))

    def _describe_one(self) -> str:
        location = self.path if self.line is None else f"{self.path}:{self.line}"
        return ": ".join(part for part in (location, self.field, self.message) if part)


# --- field types ---------------------------------------------------------------------------

_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ENV_VAR_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EMAIL_PATTERN = re.compile(r"[^@\s]{1,64}@[^@\s]{1,190}")


def _check_resource_name(value: str) -> str:
    if not _NAME_PATTERN.fullmatch(value):
        raise PydanticCustomError(
            "invalid_name",
            '"{name}" is not a valid name: use lowercase letters, digits, "-" and "_", '
            "starting with a letter or digit, at most 64 characters",
            {"name": value},
        )
    return value


def _check_env_var_name(value: str) -> str:
    if not _ENV_VAR_NAME_PATTERN.fullmatch(value):
        hint = ' (write the name without "$")' if value.startswith("$") else ""
        raise PydanticCustomError(
            "invalid_env_var_name",
            '"{name}" is not a valid environment variable name: use letters, digits and "_",'
            " not starting with a digit{hint}",
            {"name": value, "hint": hint},
        )
    return value


# Cron fields (minute hour day-of-month month day-of-week): name, range, names from 0 or 1.
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _WEEKDAYS),
)
_CRON_ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_CRON_PART = re.compile(r"(?:\*|(?P<low>\w+)(?:-(?P<high>\w+))?)(?:/(?P<step>\d+))?")


def _check_cron(value: str) -> str:
    """A standard 5-field cron expression (or an @daily-style alias): checked here so that a
    typo is reported at its line in cicd.yaml, not when the schedules load."""
    if value.strip().lower() in _CRON_ALIASES:
        return value.strip().lower()
    fields = value.split()
    if len(fields) != len(_CRON_FIELDS):
        raise ValueError(
            f"cron expression {value!r} needs 5 fields (minute hour day-of-month month "
            f"day-of-week), got {len(fields)}"
        )
    for text, field in zip(fields, _CRON_FIELDS, strict=True):
        name = field[0]
        for part in text.split(","):
            match = _CRON_PART.fullmatch(part)
            if match is None:
                raise ValueError(f"cron {name} {part!r} in {value!r} is not valid")
            if match["low"] is not None:
                low = _cron_number(match["low"], field, value)
                if match["high"] is not None and _cron_number(match["high"], field, value) < low:
                    raise ValueError(f"cron {name} range {part!r} in {value!r} is reversed")
            if match["step"] is not None and int(match["step"]) == 0:
                raise ValueError(f"cron {name} step 0 in {value!r}")
    return value


def _cron_number(token: str, field: tuple[str, int, int, tuple[str, ...]], value: str) -> int:
    name, low, high, names = field
    if token.lower() in names:
        return names.index(token.lower()) + low
    if not token.isdigit() or not low <= int(token) <= high:
        raise ValueError(f"cron {name} {token!r} in {value!r} is not in {low}-{high}")
    return int(token)


def _check_relative_glob(value: str) -> str:
    # These globs are expanded inside a checkout or a reports folder of an untrusted commit;
    # an absolute path or a ".." would let it read or publish files of the host.
    if not value:
        raise PydanticCustomError("empty_glob", "must not be empty")
    path = PurePosixPath(value)
    if path.is_absolute() or value.startswith("~"):
        raise PydanticCustomError(
            "absolute_glob", '"{glob}" must be a relative path (it is absolute)', {"glob": value}
        )
    if ".." in path.parts:
        raise PydanticCustomError(
            "escaping_glob",
            '"{glob}" must stay inside its folder: ".." is not allowed',
            {"glob": value},
        )
    return value


def _check_command(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_command", "a command must not be empty")
    if "\0" in value:
        raise PydanticCustomError("nul_in_command", "a command must not contain a NUL character")
    return value


def _string_to_list(value: object) -> object:
    """`install: pip install .` is shorthand for a list of one command."""
    return [value] if isinstance(value, str) else value


def _scalar_to_text(value: object) -> object:
    """Turns what YAML read as a boolean or whole number back into the text the user meant.

    Numbers with a decimal point and empty values are refused instead: YAML has already
    turned 3.10 into 3.1, and null has no text a user would expect.
    """
    if value is None:
        raise PydanticCustomError("missing_text", 'has no value: write "" for an empty string')
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise PydanticCustomError(
            "number_not_text",
            "YAML reads this as the number {number} (3.10 would become 3.1): "
            "put the value in quotes to keep it as written",
            {"number": value},
        )
    return value


def _check_env_var_value(value: str) -> str:
    if "\0" in value:
        raise PydanticCustomError(
            "nul_in_env_var", "an environment variable must not contain a NUL character"
        )
    return value


def _check_email(value: str) -> str:
    if not _EMAIL_PATTERN.fullmatch(value):
        raise PydanticCustomError(
            "invalid_email", '"{email}" is not an email address (name@domain)', {"email": value}
        )
    return value


ResourceName = Annotated[str, AfterValidator(_check_resource_name)]
EnvVarName = Annotated[str, AfterValidator(_check_env_var_name)]
EnvVarValue = Annotated[str, BeforeValidator(_scalar_to_text), AfterValidator(_check_env_var_value)]
RelativeGlob = Annotated[str, AfterValidator(_check_relative_glob)]
Command = Annotated[str, AfterValidator(_check_command)]
CommandList = Annotated[list[Command], BeforeValidator(_string_to_list)]
Timeout = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Email = Annotated[str, AfterValidator(_check_email)]


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- cicd.yaml -----------------------------------------------------------------------------

# A git URL with a scheme (https://, ssh://, file://) or in scp form (user@host:path);
# like git, a colon before any slash means a remote.
_REMOTE_URL_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|[^/]*:")
# sqlite:///relative.db, sqlite+pysqlite:///relative.db?mode=ro (four slashes = absolute)
_SQLITE_URL_PATTERN = re.compile(r"(?P<prefix>sqlite(?:\+\w+)?:///)(?P<path>[^?]*)(?P<query>.*)")


def _config_path(info: ValidationInfo) -> Path:
    """The cicd.yaml being validated, given by the loader; ./cicd.yaml for models built in code."""
    context = info.context or {}
    config_path: Path = context.get("config_path", Path.cwd() / DEFAULT_CONFIG_NAME)
    return config_path


def _resolve_path(path: Path, base_dir: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


class _NamedModel(_StrictModel):
    name: ResourceName
    """Unique among its siblings; used in asset keys."""

    @property
    def identifier(self) -> str:
        """The name as Dagster's group, job and partition names allow it (no '-')."""
        return self.name.replace("-", "_")


NamedModelT = TypeVar("NamedModelT", bound=_NamedModel)


def _check_final_semver(value: str) -> str:
    if not Version.is_valid(value) or Version.parse(value).finalize_version() != value:
        raise ValueError(f"{value!r} is not a final SemVer 2.0 version such as 0.1.0")
    return value


class ReleaseConfig(_StrictModel):
    """How `cicd release` names versions of a repository (README: Releases)."""

    tag_format: Annotated[str, AfterValidator(check_tag_format)] = "v{version}"
    """The release tag: {version} once, e.g. "v{version}" or "shop-api/{version}"."""
    initial_version: Annotated[str, AfterValidator(_check_final_semver)] = "0.1.0"
    """The first release of a repository without release tags."""


class RepositoryConfig(_NamedModel):
    """A watched git repository."""

    url: str = Field(min_length=1)
    branches: list[str] | None = None
    """fnmatch patterns of the branches to build; None = the default branch only."""
    tags: list[str] = []
    default_branch: str | None = None
    """None = detect from the remote HEAD."""
    secrets: list[EnvVarName] = []
    """Environment variables of the cicd process passed to steps and masked in logs."""
    poll_interval_s: int = Field(default=30, ge=5, le=86400)
    keep_workspaces: int = Field(default=20, ge=1)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)

    @field_validator("url")
    @classmethod
    def _resolve_local_url(cls, url: str, info: ValidationInfo) -> str:
        # A relative local path means "next to cicd.yaml", not "wherever cicd was started".
        if _REMOTE_URL_PATTERN.match(url) or Path(url).is_absolute():
            return url
        base_dir = _config_path(info).parent
        if url.startswith(("./", "../")) or (base_dir / url).exists():
            return str((base_dir / url).resolve())
        return url


class TargetConfig(_StrictModel):
    """Where an environment's service runs, and within which limits."""

    type: Literal["local", "docker"] = "local"
    base_image: str = "cicd-python:3.11"
    """docker: the image the generated Dockerfile builds FROM when the repository has none."""
    dockerfile: str | None = None
    """docker: the repository's Dockerfile (relative to its root); None = "Dockerfile" if
    the commit has one, else a generated one on base_image."""
    memory_mb: int | None = Field(default=None, ge=16)
    """Memory limit per replica: the container's memory, or RLIMIT_AS of a local process."""
    cpus: float | None = Field(default=None, gt=0)
    """docker only: CPUs per replica."""
    max_open_files: int | None = Field(default=None, ge=16)
    """RLIMIT_NOFILE per replica (both targets)."""

    @model_validator(mode="after")
    def _docker_only_fields(self) -> Self:
        if self.type == "local" and self.cpus is not None:
            raise PydanticCustomError(
                "docker_only", "cpus needs a docker target (a local process has no CPU quota)"
            )
        if self.type == "local" and self.dockerfile is not None:
            raise PydanticCustomError("docker_only", "dockerfile needs a docker target")
        return self


class StrategyConfig(_StrictModel):
    type: Literal["recreate", "rolling", "blue_green", "canary"] = "recreate"
    replicas: int = Field(default=1, ge=1)
    steps: list[Annotated[int, Field(ge=1, le=100)]] = []
    """Percentages of traffic, increasing; a canary without steps uses 10, 50, 100."""
    analysis: dict[str, float] = {}

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, steps: list[int]) -> list[int]:
        for earlier, later in itertools.pairwise(steps):
            if later <= earlier:
                raise PydanticCustomError(
                    "steps_not_increasing",
                    "steps must increase, but {earlier} is followed by {later}",
                    {"earlier": earlier, "later": later},
                )
        return steps

    @model_validator(mode="after")
    def _default_canary_steps(self) -> Self:
        if self.type == "canary" and not self.steps:
            self.steps = [10, 50, 100]
        return self


class ApprovalConfig(_StrictModel):
    required: int = Field(default=1, ge=1)
    """Distinct users who must approve a commit before it deploys here."""
    roles: list[ResourceName] = []
    """Roles allowed to approve; empty = any user."""
    allow_self_approval: bool = False
    """Whether the author of a commit (by email or name) may approve it."""


class SecretSource(_StrictModel):
    """Where a secret's value is read at deploy time; only this reference is stored."""

    env: EnvVarName | None = None
    """An environment variable of the cicd process."""
    file: Path | None = None
    """A file (relative to cicd.yaml) whose content, without the final newline, is the value."""

    @field_validator("file")
    @classmethod
    def _resolve_file(cls, file: Path | None, info: ValidationInfo) -> Path | None:
        if file is None or file.is_absolute():
            return file
        return (_config_path(info).parent / file).resolve()

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.env is None) == (self.file is None):
            raise PydanticCustomError(
                "secret_source", 'a secret takes exactly one of "env" or "file"'
            )
        return self

    @property
    def reference(self) -> str:
        """ "env:NAME" or "file:/path", as deployments record it."""
        return f"env:{self.env}" if self.env is not None else f"file:{self.file}"


class VerifyConfig(_StrictModel):
    """How a new version is verified before it counts, and how long rollback stays instant."""

    timeout_s: float = Field(default=2.0, gt=0)
    """Per probe."""
    interval_s: float = Field(default=0.5, ge=0)
    max_attempts: int = Field(default=60, ge=1)
    success_threshold: int = Field(default=3, ge=1)
    """Consecutive 2xx answers needed."""
    smoke: Command | None = None
    """Run (bash, in the release's folder, with URL set to the new version's address) after
    the health probes pass; a non-zero exit fails the deployment."""
    smoke_timeout_s: float = Field(default=60, gt=0)
    rollback_window_s: float = Field(default=3600, ge=0)
    """blue_green: how long the previous slot keeps running (without traffic) so that a
    rollback is a switch of weights; 0 stops it as soon as the new one is verified."""

    @model_validator(mode="after")
    def _threshold_within_attempts(self) -> Self:
        if self.success_threshold > self.max_attempts:
            raise PydanticCustomError("threshold", "success_threshold must not exceed max_attempts")
        return self


class EnvironmentConfig(_NamedModel):
    """A stage of the promotion chain."""

    target: TargetConfig = Field(default_factory=TargetConfig)
    auto_deploy: bool = False
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    approvals: ApprovalConfig | None = None
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    env: dict[EnvVarName, EnvVarValue] = {}
    """Settings of this environment, added to the service's environment."""
    secrets: dict[EnvVarName, SecretSource] = {}
    """Secrets of this environment: read at deploy time, masked, never stored in clear."""
    health_interval_s: int = Field(default=30, ge=5, le=86400)
    """How often the deployment-health sensor probes the live environment."""
    qa: bool = False
    """After a verified deploy here the repository's QA suite (.cicd.yml qa) runs against
    this environment, and the next environment takes only commits whose QA passed."""


class UserConfig(_StrictModel):
    """Roles given in cicd.yaml; `cicd users add` gives tokens (and more roles) in the DB."""

    roles: list[ResourceName] = []
    email: Email | None = None
    """Matched against commit authors to refuse self-approval."""


# Every kind of event the history DB records (store.models.EVENT_KINDS is made from it).
NotificationEvent = Literal[
    "failed",
    "deployed",
    "rolled_back",
    "approval_requested",
    "released",
    "security_finding",
    "incident_opened",
    "incident_closed",
    "service_error",
    "drift",
]
# What a channel that names no events gets; incidents, service errors and drift are opt-in.
DEFAULT_NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = (
    "failed",
    "deployed",
    "rolled_back",
    "approval_requested",
    "released",
    "security_finding",
)
_NOTIFICATION_URL_SCHEMES = {"webhook": ("http", "https"), "smtp": ("smtp", "smtps")}


class NotificationConfig(_StrictModel):
    type: Literal["webhook", "smtp"]
    url: str | None = None
    """The webhook to POST to (http:// or https://), or the SMTP server: smtp://host:port,
    smtps://host:port for TLS from the start. Never shown in clear: webhooks hold tokens."""
    to: list[Email] = []
    """The recipients of mail (smtp)."""
    sender: Email = "cicd@localhost"
    """The From address of mail (smtp)."""
    username: str | None = None
    """SMTP login, with `password`."""
    password: SecretSource | None = None
    events: list[NotificationEvent] = Field(
        default_factory=lambda: list(DEFAULT_NOTIFICATION_EVENTS)
    )
    timeout_s: float = Field(default=5.0, gt=0, le=300)
    """Per connection and per read: what a channel that is down costs a delivery run."""
    retries: int = Field(default=5, ge=0, le=20)
    """Attempts after a failed one before the delivery is recorded failed."""
    backoff_s: float = Field(default=30.0, gt=0, le=86400)
    """The wait before the first retry, doubled before each next one."""

    @field_validator("url")
    @classmethod
    def _url_fits_the_type(cls, url: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("type")
        if url is None or kind not in _NOTIFICATION_URL_SCHEMES:
            return url
        schemes = _NOTIFICATION_URL_SCHEMES[kind]
        # The value is never repeated in the message: a webhook URL holds a token.
        expected = {"schemes": " or ".join(f"{scheme}://" for scheme in schemes)}
        try:
            parts = urllib.parse.urlsplit(url)
            valid = parts.scheme.lower() in schemes and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a port that is not a number
            valid = False
        if not valid:
            raise PydanticCustomError(
                "invalid_url", "expected a URL starting with {schemes}, with a host", expected
            )
        return url

    @model_validator(mode="after")
    def _has_destination(self) -> Self:
        if self.url is None:
            raise PydanticCustomError(
                "missing_url", "a {type} notification needs a url", {"type": self.type}
            )
        if self.type == "smtp" and not self.to:
            raise PydanticCustomError(
                "missing_recipients", 'an smtp notification needs at least one address in "to"'
            )
        if self.type == "webhook" and (self.to or self.username or self.password):
            raise PydanticCustomError(
                "smtp_only", '"to", "username" and "password" are for smtp notifications'
            )
        if (self.username is None) != (self.password is None):
            raise PydanticCustomError(
                "smtp_login", 'an smtp login needs both "username" and "password"'
            )
        return self

    @property
    def destination(self) -> tuple[str, str, tuple[str, ...]]:
        """What makes two channels the same: where they deliver to."""
        return (self.type, self.url or "", tuple(sorted(self.to)))


class LicensesConfig(_StrictModel):
    allow: list[str] = []
    deny: list[str] = []


class SecurityConfig(_StrictModel):
    advisory_db: Path | None = None
    """An OSV advisory folder (e.g. a checkout of pypa/advisory-database); None: no
    dependency scanning."""
    fail_on: Literal["low", "medium", "high", "critical"] = "high"
    licenses: LicensesConfig = Field(default_factory=LicensesConfig)
    signing_key: Path | None = None
    """The ed25519 key that signs provenance; None: home/keys/signing.pem (created once)."""
    rescan_schedule: Annotated[str, AfterValidator(_check_cron)] = "0 3 * * *"
    """Cron schedule (UTC) of the rescan of what is in service."""

    @field_validator("advisory_db", "signing_key")
    @classmethod
    def _resolve_paths(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve_path(path, _config_path(info).parent)


class ArtifactsConfig(_StrictModel):
    """Retention of the artifact store (`cicd artifacts prune`). Commits live or standby in
    an environment are kept whatever these say."""

    retention_days: int | None = Field(default=90, ge=1)
    """Artifacts unused for longer are deleted; None: kept forever."""
    keep_last: int = Field(default=10, ge=0)
    """The newest commits stored per repository always kept, for a rollback --to them."""


Cron = Annotated[str, AfterValidator(_check_cron)]


class HousekeepingConfig(_StrictModel):
    """Schedules (cron, UTC) of the housekeeping jobs; null turns one off. Defaults: at
    night, after the nightly rescan (03:00) has read what is in service."""

    workspace_cleanup: Cron | None = "30 3 * * *"
    """Checkouts beyond repositories[].keep_workspaces, dependency envs unused for
    cache_retention_days."""
    artifact_retention: Cron | None = "0 4 * * *"
    """`cicd artifacts prune` with cicd.yaml's artifacts retention."""
    db_vacuum: Cron | None = "30 4 * * 0"
    """VACUUM and ANALYZE of the history DB (weekly)."""
    cache_retention_days: int = Field(default=14, ge=1)
    """A build's dependency env (home/envs) unused by any build for longer is deleted."""


class ControlConfig(_StrictModel):
    """cicd.yaml. Relative paths in it are relative to the folder that holds it."""

    home: Path = Field(default=Path(".cicd"), validate_default=True)
    history_db: str | None = None
    """Any SQLAlchemy URL; None = SQLite in home. See history_db_url."""
    repositories: list[RepositoryConfig] = Field(min_length=1)
    environments: list[EnvironmentConfig] = []
    """The promotion chain, in order."""
    users: dict[ResourceName, UserConfig] = {}
    notifications: list[NotificationConfig] = []
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    housekeeping: HousekeepingConfig = Field(default_factory=HousekeepingConfig)

    _config_path: Path = PrivateAttr()

    @field_validator("home")
    @classmethod
    def _resolve_home(cls, home: Path, info: ValidationInfo) -> Path:
        return _resolve_path(home, _config_path(info).parent)

    @field_validator("repositories", "environments")
    @classmethod
    def _names_are_unique(cls, items: list[NamedModelT], info: ValidationInfo) -> list[NamedModelT]:
        # Names that differ only in '-' vs '_' would share their Dagster names.
        first_index_by_identifier: dict[str, int] = {}
        duplicates: list[InitErrorDetails] = []
        for index, item in enumerate(items):
            first_index = first_index_by_identifier.setdefault(item.identifier, index)
            if first_index == index:
                continue
            first_name = items[first_index].name
            message = (
                'duplicate name "{name}" (first used by {field}[{first_index}])'
                if first_name == item.name
                else 'name "{name}" clashes with "{first_name}" ({field}[{first_index}]): '
                "Dagster names turn '-' into '_'"
            )
            duplicates.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "duplicate_name",
                        message,
                        {
                            "name": item.name,
                            "first_name": first_name,
                            "field": info.field_name,
                            "first_index": first_index,
                        },
                    ),
                    loc=(index, "name"),
                    input=item.name,
                )
            )
        if duplicates:
            # Raised as a ValidationError so that each error points at the duplicate's own
            # "name" line rather than at the whole list.
            raise ValidationError.from_exception_data(cls.__name__, duplicates)
        return items

    @field_validator("environments")
    @classmethod
    def _one_qa_environment(cls, environments: list[EnvironmentConfig]) -> list[EnvironmentConfig]:
        # The history DB keeps one QA result per commit (its "qa" stage).
        qa = [index for index, environment in enumerate(environments) if environment.qa]
        if len(qa) < 2:
            return environments
        first = environments[qa[0]].name
        raise ValidationError.from_exception_data(
            cls.__name__,
            [
                InitErrorDetails(
                    type=PydanticCustomError(
                        "one_qa_environment",
                        "only one environment may run QA; {first} already does",
                        {"first": first},
                    ),
                    loc=(index, "qa"),
                    input=True,
                )
                for index in qa[1:]
            ],
        )

    @field_validator("notifications")
    @classmethod
    def _destinations_are_unique(
        cls, channels: list[NotificationConfig]
    ) -> list[NotificationConfig]:
        # A destination is one channel in the deliveries table: each event reaches it once.
        first_index: dict[tuple[str, str, tuple[str, ...]], int] = {}
        duplicates = [
            InitErrorDetails(
                type=PydanticCustomError(
                    "duplicate_channel",
                    "the same destination as notifications[{first_index}]: list all its "
                    "events there",
                    {"first_index": first_index[channel.destination]},
                ),
                loc=(index, "url"),
                input="",
            )
            for index, channel in enumerate(channels)
            if first_index.setdefault(channel.destination, index) != index
        ]
        if duplicates:
            raise ValidationError.from_exception_data(cls.__name__, duplicates)
        return channels

    @model_validator(mode="after")
    def _remember_config_path(self, info: ValidationInfo) -> Self:
        self._config_path = _config_path(info)
        return self

    @property
    def config_path(self) -> Path:
        return self._config_path

    @property
    def base_dir(self) -> Path:
        """The folder relative paths of the config are resolved against."""
        return self._config_path.parent

    def repository(self, name: str) -> RepositoryConfig:
        for repository in self.repositories:
            if repository.name == name:
                return repository
        known = ", ".join(r.name for r in self.repositories)
        raise KeyError(f"unknown repository {name!r}; {self.config_path.name} has: {known}")

    def environment(self, name: str) -> EnvironmentConfig:
        for environment in self.environments:
            if environment.name == name:
                return environment
        known = ", ".join(e.name for e in self.environments) or "none"
        raise KeyError(f"unknown environment {name!r}; {self.config_path.name} has: {known}")

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def git_dir(self) -> Path:
        return self.home / "git"

    @property
    def workspaces_dir(self) -> Path:
        return self.home / "workspaces"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def envs_dir(self) -> Path:
        return self.home / "envs"

    @property
    def history_db_url(self) -> str:
        """The SQLAlchemy URL of the history DB, a relative SQLite path made absolute."""
        if self.history_db is None:
            return f"sqlite:///{self.home / 'history.db'}"
        sqlite_url = _SQLITE_URL_PATTERN.fullmatch(self.history_db)
        if sqlite_url is None:
            return self.history_db
        path = sqlite_url["path"]
        if path in ("", ":memory:") or path.startswith(("/", "file:")):
            return self.history_db
        absolute_path = _resolve_path(Path(path), self.base_dir)
        return f"{sqlite_url['prefix']}{absolute_path}{sqlite_url['query']}"


# --- .cicd.yml -----------------------------------------------------------------------------


class BuildConfig(_StrictModel):
    install: CommandList = []
    """Commands that install dependencies into the build's isolated env."""
    cache: list[RelativeGlob] = []
    """Files whose content hash keys the dependency env."""
    steps: CommandList = []
    artifacts: list[RelativeGlob] = []
    """Globs relative to the checkout."""
    timeout_s: Timeout = 1800.0
    python: Annotated[str, BeforeValidator(_scalar_to_text)] | None = None
    """The interpreter of the env, e.g. "3.11"."""


class TestStageConfig(_StrictModel):
    __test__: ClassVar[bool] = False  # a model, not a pytest test class

    run: CommandList = Field(min_length=1)
    reports: RelativeGlob = "**/*.xml"
    """JUnit XML files, relative to $CICD_REPORTS_DIR."""
    coverage: RelativeGlob | None = None
    """A Cobertura XML file relative to $CICD_REPORTS_DIR."""
    benchmarks: RelativeGlob | None = None
    """pytest-benchmark JSON files relative to $CICD_REPORTS_DIR."""
    timeout_s: Timeout = 1800.0


class TestsConfig(_StrictModel):
    __test__: ClassVar[bool] = False  # a model, not a pytest test class

    unit: TestStageConfig | None = None
    integration: TestStageConfig | None = None
    e2e: TestStageConfig | None = None
    performance: TestStageConfig | None = None
    quarantine: list[Annotated[str, Field(min_length=1)]] = []
    """Test ids ("classname::name", fnmatch patterns) whose failures are reported but fail no
    gate: known-flaky tests while someone fixes them."""

    @model_validator(mode="after")
    def _default_performance_benchmarks(self) -> Self:
        if self.performance is not None and self.performance.benchmarks is None:
            self.performance.benchmarks = "**/*.json"
        return self

    def stages(self) -> dict[str, TestStageConfig | None]:
        """Every stage by name, in the order they run; None where not configured."""
        return {
            "unit": self.unit,
            "integration": self.integration,
            "e2e": self.e2e,
            "performance": self.performance,
        }


class QaConfig(_StrictModel):
    """The QA suite: run against a deployed environment (CICD_TARGET_URL, CICD_ENVIRONMENT)
    from the commit's release folder, with the build's env."""

    run: CommandList = Field(min_length=1)
    reports: RelativeGlob = "**/*.xml"
    """JUnit XML files, relative to $CICD_REPORTS_DIR."""
    timeout_s: Timeout = 600.0


class GatesConfig(_StrictModel):
    min_pass_rate: float = Field(default=1.0, ge=0, le=1)
    max_perf_regression: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """A fraction: 0.10 fails a commit that is more than 10 % slower than its baseline."""
    min_coverage: float | None = Field(default=None, ge=0, le=1)


class ServiceConfig(_StrictModel):
    run: Command
    health: str = Field(default="/healthz", pattern=r"^/")
    port_env: EnvVarName = "PORT"


class SuppressionConfig(_StrictModel):
    """A finding accepted for a while: it is still reported, but no longer fails a gate."""

    rule: str = Field(min_length=1)
    """The rule, advisory id (or an alias such as a CVE) or licence it silences."""
    path: str | None = None
    """fnmatch pattern of the files it applies to (SAST and secrets); None: all."""
    package: str | None = None
    """The dependency it applies to (advisories and licences); None: all."""
    reason: str = Field(min_length=1)
    expires: datetime.date
    """After this day the suppression no longer applies."""


class PipelineSecurityConfig(_StrictModel):
    sast: list[Literal["bandit", "ruff", "semgrep"]] = ["bandit"]
    suppressions: list[SuppressionConfig] = []


class PipelineConfig(_StrictModel):
    """.cicd.yml at the root of a watched repository."""

    build: BuildConfig = Field(default_factory=BuildConfig)
    tests: TestsConfig = Field(default_factory=TestsConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    service: ServiceConfig | None = None
    qa: QaConfig | None = None
    env: dict[EnvVarName, EnvVarValue] = {}
    """Environment variables of every step."""
    security: PipelineSecurityConfig = Field(default_factory=PipelineSecurityConfig)


# --- loading -------------------------------------------------------------------------------

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_control_config(path: Path) -> ControlConfig:
    """Reads cicd.yaml; relative paths in it are resolved against its folder."""
    document = _parse_yaml(_read_text(path), str(path))
    return _validate(ControlConfig, document, str(path), {"config_path": path.resolve()})


def parse_pipeline_config(text: str, source: str) -> PipelineConfig:
    """Parses .cicd.yml text read from a commit; `source` names it in errors,
    e.g. "shop-api@1a2b3c4:.cicd.yml"."""
    return _validate(PipelineConfig, _parse_yaml(text, source), source)


def load_pipeline_config(path: Path) -> PipelineConfig:
    return parse_pipeline_config(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), None, "", "does not exist") from None
    except OSError as exc:
        raise ConfigError(str(path), None, "", exc.strerror or str(exc)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(path), line, "", "is not valid UTF-8 text") from None


def _parse_yaml(text: str, source: str) -> CommentedMap:
    try:
        document = YAML(typ="rt").load(text)  # duplicate keys raise DuplicateKeyError
    except MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(source, line, "", _describe_yaml_error(exc)) from None
    except ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        message = f"unacceptable character #x{code:04x}: {exc.reason}"
        raise ConfigError(source, line, "", message) from None
    if document is None:
        raise ConfigError(source, None, "", "is empty")
    if not isinstance(document, CommentedMap):
        kind = "a list" if isinstance(document, CommentedSeq) else f"the value {document!r}"
        raise ConfigError(
            source, _node_line(document), "", f"must be a mapping of settings, not {kind}"
        )
    return document


def _describe_yaml_error(exc: MarkedYAMLError) -> str:
    message = exc.problem or exc.context or "invalid YAML"
    if "'\\t'" in message:  # ruamel quotes the tab it found as '\t'
        message += " (indent with spaces: YAML does not allow tabs)"
    # An unclosed bracket is reported where the parser gave up; say where it was opened.
    context_mark, problem_mark = exc.context_mark, exc.problem_mark
    if (
        exc.context
        and context_mark
        and problem_mark
        and context_mark.line != problem_mark.line
        and not isinstance(exc, DuplicateKeyError)
    ):
        message += f" ({exc.context} started at line {context_mark.line + 1})"
    return message


def _validate(
    model: type[ModelT],
    document: CommentedMap,
    source: str,
    context: dict[str, Any] | None = None,
) -> ModelT:
    try:
        return model.model_validate(_to_plain(document), context=context)
    except ValidationError as exc:
        errors = sorted(
            (
                ConfigError(
                    source,
                    _line_of(document, detail["loc"]),
                    _field_path(detail["loc"]),
                    _describe_validation_error(detail, model),
                )
                for detail in exc.errors()
            ),
            key=lambda error: (error.line is None, error.line or 0),
        )
        first = errors[0]
        raise ConfigError(
            first.path, first.line, first.field, first.message, tuple(errors[1:])
        ) from None


def _to_plain(node: object, converted: dict[int, object] | None = None) -> object:
    """Copies ruamel's round-trip types into plain dicts, lists and scalars.

    A node that YAML aliases share is copied once and shared again, so a file of nested
    aliases (a "billion laughs") stays as small as its text.
    """
    converted = {} if converted is None else converted
    if id(node) in converted:
        return converted[id(node)]
    if isinstance(node, dict):
        plain_mapping: dict[object, object] = {}
        converted[id(node)] = plain_mapping
        for key, value in node.items():
            plain_mapping[_to_plain(key, converted)] = _to_plain(value, converted)
        return plain_mapping
    if isinstance(node, list):
        plain_list: list[object] = []
        converted[id(node)] = plain_list
        plain_list.extend(_to_plain(item, converted) for item in node)
        return plain_list
    if isinstance(node, ScalarBoolean):
        return bool(node)
    for plain_type in (bool, str, int, float):
        if isinstance(node, plain_type):
            return plain_type(node)
    return node


def _node_line(node: object) -> int | None:
    """The 1-based line where a YAML mapping or list starts; None for scalars."""
    return node.lc.line + 1 if isinstance(node, CommentedBase) else None


def _line_of(document: CommentedMap, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the deepest node of `loc` (a pydantic error location) that the
    YAML document has: the key of a mapping entry or the start of a list item. Missing
    keys map to their parent; a value reached through a merge key (<<) maps to its mapping."""
    node: object = document
    line = _node_line(document)
    for part in loc:
        if isinstance(node, CommentedMap) and part in (node.lc.data or {}):
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        else:
            break
    return line


def _field_path(loc: tuple[int | str, ...]) -> str:
    """("repositories", 0, "branches") -> "repositories[0].branches"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":  # pydantic's marker for "the key of this dict entry"
            path += f".{part}" if path else part
    return path


def _describe_validation_error(detail: Any, root_model: type[BaseModel]) -> str:
    if detail["type"] != "extra_forbidden":
        return str(detail["msg"])
    unknown = str(detail["loc"][-1])
    model = _model_at(root_model, detail["loc"][:-1])
    if model is None:
        return f'unknown field "{unknown}"'
    known = list(model.model_fields) + [
        field.alias for field in model.model_fields.values() if field.alias
    ]
    close = difflib.get_close_matches(unknown, known, n=1)
    if close:
        return f'unknown field "{unknown}" (did you mean "{close[0]}"?)'
    return f'unknown field "{unknown}" (allowed: {", ".join(known)})'


def _model_at(root_model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that validates the value at `loc`, found by walking the annotations."""
    annotation: Any = root_model
    for part in loc:
        annotation = _without_none(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]  # list[X] -> X, dict[K, X] -> X
        else:
            return None
    annotation = _without_none(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _without_none(annotation: Any) -> Any:
    """X | None -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation
