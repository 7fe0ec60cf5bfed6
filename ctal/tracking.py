"""Experiment tracking: a run's config, metrics and checkpoint references in MLflow or Weights & Biases.

``tracking=mlflow|wandb|none`` and ``tracking_uri=`` (ctal.config) choose where. MLflow's embedded
default is a SQLite store, ``mlflow.db`` in the run's directory (MLflow 3 refuses its old file store);
``tracking_uri`` names a server (``http(s)://``), a database URI (``sqlite:///…``, ``postgresql://…``)
or a directory (its ``mlflow.db``). W&B runs offline by default (no network), its files in
``<run dir>/wandb/``; ``tracking_uri=http(s)://…`` sends them to that W&B server instead, a
directory keeps them there. Everything here runs without Ray: pretraining's rank 0 (``open_run``),
evaluation and ablations (``log_results``) use it; sweeps use Ray Tune's own integrations
(ctal.distributed.tracking), set up from the same resolution (``mlflow_store``, ``wandb_target``).

Credentials: a server's ``user:password@`` never reaches MLflow in the URI; ``mlflow_store`` moves
it into MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the process that logs (the pre-check
sends it as basic auth). A database URI keeps its password (SQLAlchemy needs it there). Everything
written or printed from here (params, tags, warnings, errors) goes through ``ctal.redact``.

Failure policy: what can be checked before a run starts is (``check_tracking``: the tracker is
installed, the URI is usable, a server answers), so a typo or a dead server fails in seconds, not
after days with nothing tracked. A tracker that fails once the run is under way prints one warning
line and is dropped; the run itself (checkpoints, metrics.jsonl) never depends on it.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from . import storage
from .config import ConfigError
from .redact import MARK, redact, split_userinfo

STORE_FILE = "mlflow.db"  # the embedded MLflow store in a run directory
ARTIFACTS_DIR = "mlartifacts"  # beside it: MLflow records an artifact root per experiment (we log none)
SERVER_SCHEMES = ("http://", "https://")
DATABASE_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql", "databricks")
PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}
SERVER_TIMEOUT_S = 5.0  # the reachability check before a run
# A server that dies mid-run must cost seconds before the one warning, not MLflow's default of seven
# retries with back-off (minutes per call; a sweep's driver blocked 246 s): pretraining and sweeps alike.
MLFLOW_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys → string values, as MLflow stores params (``model.hidden_size``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = redact(str(value))  # a tracking_uri's password is no param
    return out


# --------------------------------------------------------------------------------------------------
# where a run goes, checked before it starts


def mlflow_store(tracking_uri: Optional[str], home: str | Path) -> str:
    """The MLflow tracking URI: a server's without its credentials (set up for this process:
    ``mlflow_http``), a database's as given, a directory's ``mlflow.db``, or (None) the run
    directory ``home``'s."""
    if tracking_uri and tracking_uri.startswith(SERVER_SCHEMES):
        return mlflow_http(tracking_uri)
    if tracking_uri and tracking_uri.startswith(DATABASE_SCHEMES):
        return tracking_uri
    return f"sqlite:///{Path(storage.normalize(tracking_uri or home)) / STORE_FILE}"


_GIVEN: dict[str, str] = {}  # redacted URI → the URI as given: in this process's memory only


def keep_secret(uri: str) -> str:
    """``uri`` redacted, for an object that is pickled to disk (a sweep's callbacks in tuner.pkl);
    ``given`` returns the URI itself in this process (a resumed sweep: its driver's given again)."""
    _GIVEN[redact(uri)] = uri
    return redact(uri)


def given(uri: str) -> str:
    return _GIVEN.get(uri, uri)


def mlflow_http(url: str) -> str:
    """``url`` without its ``user:password@``, which goes where MLflow reads it, this process's
    MLFLOW_TRACKING_USERNAME / _PASSWORD (a redacted password leaves those as they are); and
    MLflow's HTTP retries bounded (``MLFLOW_HTTP_LIMITS``) unless the environment sets them."""
    bare, user, password = split_userinfo(url)
    if user and password != MARK:
        os.environ.update(zip(CREDENTIAL_ENV, (user, password or "")))
    for key, value in MLFLOW_HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    return bare


def wandb_target(tracking_uri: Optional[str], home: str | Path) -> dict:
    """``wandb.init`` settings: offline into ``home`` (or the directory ``tracking_uri``), unless
    ``tracking_uri`` is a W&B server; WANDB_MODE set in the environment still wins for offline runs."""
    if tracking_uri and tracking_uri.startswith(SERVER_SCHEMES):
        # W&B still stages its files locally: in the run directory, or a temporary one for a URI run
        local = tempfile.gettempdir() if storage.is_uri(home) else storage.normalize(home)
        # W&B authenticates with an API key (WANDB_API_KEY), never with a password in the URL
        return {"mode": "online", "dir": str(local), "base_url": split_userinfo(tracking_uri)[0]}
    return {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(storage.normalize(tracking_uri or home))}


def wandb_settings(target: dict) -> dict:
    """wandb.Settings for a ``wandb_target``: no console capture (the run's own console stays as it
    is), no W&B banners, the server's address when there is one."""
    return {"console": "off", "silent": True, **({"base_url": target["base_url"]} if "base_url" in target else {})}


def check_tracking(tracking: str, tracking_uri: Optional[str], home: Optional[str | Path] = None) -> None:
    """ConfigError naming ``tracking`` / ``tracking_uri`` (redacted) unless runs can be tracked
    there: the package installed, the URI a server that answers (and takes its credentials), a
    database (a SQLite file in a writable directory) or a writable local directory, and, for the
    embedded default, a local run directory ``home`` (None: not known yet, checked later)."""
    try:
        _check_tracking(tracking, tracking_uri, home)
    except ConfigError as e:
        raise ConfigError(redact(str(e))) from None


def _check_tracking(tracking: str, tracking_uri: Optional[str], home: Optional[str | Path]) -> None:
    if tracking == "none":
        if tracking_uri:
            raise ConfigError(f"tracking_uri={tracking_uri!r} is set but tracking=none: "
                              "add tracking=mlflow or tracking=wandb, or drop tracking_uri")
        return
    if importlib.util.find_spec(PACKAGES[tracking]) is None:
        raise ConfigError(f"tracking={tracking}: the {PACKAGES[tracking]} package is not installed "
                          "(pip install -e '.[track]')")
    if tracking_uri and tracking_uri.startswith(SERVER_SCHEMES):
        _check_server(tracking_uri)
    elif tracking_uri and tracking_uri.startswith(DATABASE_SCHEMES):
        if split_userinfo(tracking_uri)[2] == MARK:
            raise ConfigError(f"tracking_uri={tracking_uri}: the password was redacted where it was recorded; "
                              "give tracking_uri= again with it")
        if tracking == "wandb":
            raise ConfigError(f"tracking_uri={tracking_uri!r}: W&B takes a server (http(s)://) or a directory")
        if tracking_uri.startswith("sqlite:///"):  # else SQLAlchemy fails after the run started
            _check_writable(Path(tracking_uri.removeprefix("sqlite:///")).parent, f"tracking_uri={tracking_uri}",
                            create=False)
    elif tracking_uri and (storage.is_uri(tracking_uri) or "://" in tracking_uri):
        raise ConfigError(f"tracking_uri={tracking_uri!r}: give a server (http(s)://), a database "
                          "(sqlite:///file.db, MLflow only) or a local directory")
    elif tracking_uri is None and home is not None and storage.is_uri(home):
        raise ConfigError(f"tracking={tracking}: the run lives at {home}, where a local tracker store cannot; "
                          "give tracking_uri= (a tracking server, or a local directory)")
    elif tracking_uri or home is not None:  # a local store: a read-only one fails now, not in 100 s of retries
        where = tracking_uri or home
        _check_writable(Path(storage.normalize(where)), f"tracking_uri={where}" if tracking_uri else
                        f"tracking={tracking} (its store goes in {where})", create=True)


def _check_writable(directory: Path, what: str, create: bool) -> None:
    """ConfigError naming ``what`` unless files can be written in ``directory`` (``create``: or
    in its nearest existing ancestor, where it will be created). Tried, not judged by the mode
    bits: a read-only mount refuses root too."""
    probe = directory
    while create and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}: {probe} is not a directory" if probe.exists() else
                          f"{what}: the directory {directory} does not exist")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise ConfigError(f"{what}: {probe} is not writable ({e.strerror})") from None


def _check_server(url: str) -> None:
    """Any HTTP answer counts (an MLflow or W&B server, a proxy's 401): only no answer is an error,
    or a 401 to the credentials the URI gives (sent as basic auth, as MLflow sends them)."""
    bare, user, password = split_userinfo(url)
    request = urllib.request.Request(bare)
    if user and password != MARK:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=SERVER_TIMEOUT_S).close()
    except urllib.error.HTTPError as e:
        if e.code == 401 and "Authorization" in request.headers:
            raise ConfigError(f"tracking_uri={url}: the server refused these credentials (HTTP 401)") from None
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"tracking_uri={url}: no tracking server answers there ({reason}); start it "
                          "(e.g. mlflow server --port 5000) or drop tracking_uri for the local store") from None


# --------------------------------------------------------------------------------------------------
# one tracked run


def first_line(error: Exception) -> str:
    """A tracker's exception as the one line a warning quotes."""
    return redact((str(error).strip().splitlines() or [type(error).__name__])[0][:200])


class TrackedRun:
    """A run in a tracker. Every call is guarded: the first failure prints one warning line through
    ``log`` and turns the rest into no-ops, so tracking never stops the run it tracks."""

    def __init__(self, tracking: str, where: str, log: Callable[[str], None]):
        self.tracking, self.where, self._log, self.broken = tracking, redact(where), log, False

    def _guard(self, fn, *args) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any tracker failure is the tracker's, not the run's
            self.broken = True
            self._log(f"warning: {self.tracking} tracking at {self.where} failed ({first_line(e)}); "
                      "the run goes on without it")

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Numeric ``metrics`` at ``step`` (other values are not metrics and are left out)."""
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self._guard(self._log_metrics, numbers, step)

    def log_checkpoint(self, step: int, uri: str) -> None:
        """A reference to the checkpoint at ``uri`` (a path or URI; nothing is copied)."""
        self._guard(self._log_checkpoint, step, redact(str(uri)))

    def finish(self, failed: bool = False) -> None:
        self._guard(self._finish, failed)


class _MLflowRun(TrackedRun):
    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                 resume_key: Optional[str], log):
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        super().__init__("mlflow", uri, log)
        self.client = client = MlflowClient(uri)
        exp_id = ensure_experiment(client, uri, experiment)
        run = None
        if resume_key:  # a resumed run (same run directory) continues its tracker run
            runs = client.search_runs([exp_id], filter_string=f"tags.ctal_run = '{resume_key}'", max_results=1)
            run = runs[0] if runs else None
        resumed = run is not None
        if not resumed:
            run = client.create_run(exp_id, run_name=run_name,
                                    tags={**tags, **({"ctal_run": resume_key} if resume_key else {})})
        else:
            client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        known = run.data.params
        # MLflow params are write-once: a resume with a changed value keeps the first one, and says so.
        changed = sorted(k for k, v in params.items() if k in known and known[k] != v)
        if changed:
            log(f"note: {self.tracking} run {self.run_id} keeps the params it started with for "
                f"{', '.join(changed)}")
        new = [Param(k, v) for k, v in params.items() if k not in known]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=new[i:i + 100])
        if resumed:  # this start's tags replace the earlier ones
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def _log_checkpoint(self, step: int, uri: str) -> None:
        self.client.set_tag(self.run_id, f"checkpoint.step-{step:08d}", uri)
        self.client.set_tag(self.run_id, "checkpoint.latest", uri)

    def _finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def ensure_experiment(client, uri: str, name: str) -> str:
    """The id of MLflow experiment ``name``, created if new; an embedded store keeps its (unused)
    artifact root beside it, not in the working directory (MLflow's default)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


class _WandbRun(TrackedRun):
    def __init__(self, target: dict, experiment: str, run_name: str, config: dict, tags: dict[str, str],
                 resume_key: Optional[str], log):
        import wandb

        super().__init__("wandb", target.get("base_url") or f"{target['dir']} ({target['mode']})", log)
        Path(target["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=experiment, name=run_name, id=resume_key, resume="allow" if resume_key else None,
                              dir=target["dir"], mode=target["mode"], config=config, tags=wandb_tags(tags),
                              settings=wandb_settings(target), reinit="create_new")
        self.run.summary.update(tags)  # W&B tags are short labels: the full values (URIs) stay here too

    def _log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def _log_checkpoint(self, step: int, uri: str) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self.run.name}-checkpoints", type="model")
        # A reference artifact: W&B records where the files are, it does not upload them.
        ref = uri if "://" in uri else Path(uri).resolve().as_uri()
        artifact.add_reference(ref, name=f"step-{step:08d}", checksum=False)
        self.run.log_artifact(artifact, aliases=[f"step-{step:08d}", "latest"])
        self.run.summary["checkpoint.latest"] = uri

    def _finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def wandb_tags(tags: dict[str, str]) -> list[str]:
    """``key:value`` labels for W&B (at most 64 characters each; longer values are left out)."""
    return [f"{k}:{v}" for k, v in tags.items() if len(f"{k}:{v}") <= 64]


def open_run(tracking: str, tracking_uri: Optional[str], *, home: str | Path, experiment: str, run_name: str,
             config: dict, tags: Optional[dict] = None, resume_key: Optional[str] = None,
             log: Callable[[str], None] = print) -> Optional[TrackedRun]:
    """Start (or, with the ``resume_key`` of an earlier one, continue) a tracked run; None for
    tracking=none or when the tracker cannot start (one warning line through ``log``).

    ``home``: the run directory (the embedded store's place); ``config``: the resolved config
    (nested), logged as params with dotted keys; ``tags``: short facts to filter runs by.
    """
    if tracking == "none":
        return None
    tags, config = {k: redact(str(v)) for k, v in (tags or {}).items()}, redact(config)
    # a stable id from the key (a path or URI): a safe MLflow filter value and a valid W&B run id
    resume_key = hashlib.sha1(resume_key.encode()).hexdigest()[:16] if resume_key else None
    try:
        if tracking == "mlflow":
            return _MLflowRun(mlflow_store(tracking_uri, home), experiment, run_name, flat_params(config), tags,
                              resume_key, log)
        return _WandbRun(wandb_target(tracking_uri, home), experiment, run_name, config, tags, resume_key, log)
    except Exception as e:  # noqa: BLE001 - as TrackedRun._guard: the run goes on untracked
        log(f"warning: {tracking} tracking could not start ({first_line(e)}); the run goes on without it")
        return None


def log_results(tracking: str, tracking_uri: Optional[str], *, home: str | Path, experiment: str, run_name: str,
                config: dict, metrics: dict, tags: Optional[dict] = None, step: int = 0,
                log: Callable[[str], None] = print) -> Optional[TrackedRun]:
    """One finished run in one call: ``config`` as params, ``metrics`` at ``step``, ``tags``
    (evaluation's test metrics, an ablation's row). Returns the finished run (None if untracked)."""
    run = open_run(tracking, tracking_uri, home=home, experiment=experiment, run_name=run_name, config=config,
                   tags=tags, log=log)
    if run is not None:
        run.log_metrics(metrics, step)
        run.finish()
    return run


EVALUATE_EXPERIMENT = "ctal-evaluate"


def log_evaluation(tracking: str, tracking_uri: Optional[str], checkpoint: str, state: dict, metrics: dict,
                   split: str, log: Callable[[str], None] = print) -> Optional[TrackedRun]:
    """The ``split`` metrics of an evaluated fine-tuning checkpoint (``state``: its checkpoint.json):
    ``<split>_<metric>`` (the mean over folds, and per fold ``<split>_<metric>_<fold>`` as the task
    aggregates them) at the checkpoint's epoch, tagged with task, fusion, seed and the checkpoint's
    URI. The embedded store is the one beside the checkpoint: for a sweep's ``best_checkpoint``, the
    sweep's own."""
    config = state["config"]
    values = {f"{split}_{k}": v for k, v in metrics.items()}
    home = storage.parent(storage.normalize(checkpoint))
    tags = {"task": state["task"], "fusion": config["model"]["fusion"], "seed": config["seed"],
            "split": split, "checkpoint": storage.normalize(checkpoint)}
    return log_results(tracking, tracking_uri, home=home, experiment=EVALUATE_EXPERIMENT,
                       run_name=f"{state['task']}-{Path(str(checkpoint).rstrip('/')).name}", config=config,
                       metrics=values, tags=tags, step=int(state.get("epoch", 0)), log=log)
