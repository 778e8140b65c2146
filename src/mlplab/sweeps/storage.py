"""Where a search's Optuna study is kept (``hydra.sweeper.storage``): a journal file (by default in the sweep
folder) or a database Optuna's RDB storage accepts; one line for a storage that cannot be used.

Optuna is imported only when a storage is opened: a grid's summary asks ``StudyAddress.of_sweep`` too."""

from __future__ import annotations

import itertools
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from mlplab.errors import MlplabError

if TYPE_CHECKING:
    import optuna

STUDY_FILE = "optuna.journal"  # the default storage: a journal file in the sweep folder
POSTGRES_HINT = "install the PostgreSQL driver: pip install 'mlplab[postgres]'"


class SearchError(MlplabError):
    """A search that cannot run as configured."""


@dataclass(frozen=True)
class StudyAddress:
    """Where a search's study is: ``storage`` None (the journal file in the sweep folder), a journal file's path,
    or a database URL that Optuna's RDB storage accepts (``sqlite:///...``, ``postgresql+psycopg://...``)."""

    storage: str | None
    name: str
    sweep_dir: Path

    @classmethod
    def of(cls, storage: str | None, study_name: str | None, sweep_dir: Path) -> StudyAddress:
        return cls(str(storage) if storage else None, study_name or sweep_dir.name, sweep_dir)

    @classmethod
    def of_sweep(cls, sweep_dir: Path) -> StudyAddress | None:
        """The study of a finished or running search, from its ``multirun.yaml``; None when the sweep is a grid."""
        saved = sweep_dir / "multirun.yaml"
        sweeper = OmegaConf.load(saved).hydra.get("sweeper", {}) if saved.is_file() else {}
        if sweeper.get("n_trials") is None and not (sweep_dir / STUDY_FILE).is_file():
            return None
        return cls.of(sweeper.get("storage"), sweeper.get("study_name"), sweep_dir)

    @property
    def is_database(self) -> bool:
        return self.storage is not None and "://" in self.storage

    @property
    def location(self) -> str:
        """What optuna-dashboard opens: the journal file or the database URL."""
        return self.storage if self.is_database else str(Path(self.storage or self.sweep_dir / STUDY_FILE))

    @property
    def shown(self) -> str:
        """The location without a password, for logs, summaries and errors."""
        return without_password(self.location) if self.is_database else self.location

    def open(self) -> optuna.storages.BaseStorage:
        """The storage, or one line on why it cannot be used (unreachable, missing driver, not a URL)."""
        import optuna

        if not self.is_database:
            path = Path(self.location)
            if not path.parent.is_dir():
                raise SearchError(
                    f"hydra.sweeper.storage={self.storage}: folder {path.parent} does not exist; give a "
                    "journal file in an existing folder, or a database URL such as sqlite:///study.db"
                )
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        return _database(self.storage, self.shown)

    def dashboard_command(self) -> str:
        """The command that shows the study live (a database password shown as ***)."""
        import shlex

        return f"optuna-dashboard {shlex.quote(self.shown)}"


def _database(url: str, shown: str) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    password = PASSWORD.search(url)
    if password and "@" in password.group(2):  # SQLAlchemy would take what follows its first "@" for the host
        raise SearchError(
            f"hydra.sweeper.storage={shown}: the password holds '@', which a URL must write as %40; better, leave "
            "it out of the command line, which the sweep folder records (PostgreSQL reads PGPASSWORD or ~/.pgpass)"
        )
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds, not minutes
    try:
        return _created_once(url, engine)
    except ImportError as error:  # Optuna's, raised from the driver's ModuleNotFoundError
        name = getattr(error.__cause__, "name", None) or getattr(error, "name", None) or "for this URL"
        hint = POSTGRES_HINT if url.startswith("postgresql") else f"install the Python package {name}"
        raise SearchError(
            f"hydra.sweeper.storage={shown}: the database driver {name} is not installed; {hint}"
        ) from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise SearchError(
            f"hydra.sweeper.storage={shown}: unknown kind of database {url.split(':')[0]!r}; use "
            "sqlite:///FILE, postgresql+psycopg://USER@HOST:PORT/DB, mysql+pymysql://..., or a journal "
            "file's path"
        ) from None
    except (sqlalchemy.exc.ArgumentError, ValueError) as error:  # ValueError: a port that is not a number
        raise SearchError(
            f"hydra.sweeper.storage={shown}: not a database URL ({without_password(str(error))})"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        raise SearchError(
            f"hydra.sweeper.storage={shown}: cannot use the database: "
            f"{without_password(reason[0] if reason else str(error))}"
        ) from None


# The password of a URL (scheme://user:password@host): all up to the last "@", since a password typed as it is may
# hold "@", "/" or a space, which SQLAlchemy then refuses or reads as part of the host; it is hidden all the same.
PASSWORD = re.compile(r"(://[^:/@]*:)(.*)@")


def without_password(text: str) -> str:
    """``text`` with the password of any URL in it shown as ***, whether or not the URL is one SQLAlchemy parses:
    a storage string appears in logs, summaries and errors, and is written to files."""
    return PASSWORD.sub(r"\1***@", text)


def _created_once(url: str, engine: dict[str, Any]) -> optuna.storages.RDBStorage:
    """The RDB storage; processes starting together on a new database race to create Optuna's tables, and all but
    one see the others' half-made schema: they try again."""
    import optuna
    import sqlalchemy.exc

    for attempt in itertools.count():
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
