"""Secrets never leave the process, and what a run writes can be shared (ctal.redact, issue 30.4).

As the attack: a run given credentials (a token in the MLflow store's URI, a database password on
its command line, a tracking server's ``user:password@``) and every file it wrote, MLflow's store
included, grepped for them with the console it printed. Authenticated servers pass the pre-check and
get the credentials the way MLflow sends them (a fake one in the default tier; a real ``mlflow
server`` behind a basic-auth proxy, slow: its own process, ~10 s to start); a sweep's tracker against a server that died after the
pre-check costs seconds; a resumed sweep never opens a second MLflow run for a trial; stores that
cannot be written are refused before the run; ``share=true`` checkpoints name no host or local path.
"""
from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ctal import manifest
from ctal.config import ConfigError, FinetuneConfig, PretrainConfig, load_config
from ctal.redact import redact, split_userinfo
from ctal.tracking import CREDENTIAL_ENV, MLFLOW_HTTP_LIMITS, check_tracking, open_run

ROOT = Path(__file__).resolve().parents[1]
NARROW = ["model.hidden_size=32", "model.num_attention_heads=4", "model.intermediate_size=64",
          "model.num_text_layers=1", "model.num_audio_layers=1", "model.max_audio_positions=200",
          "model.max_position_embeddings=66"]
SECRET = "hunter2-s3cr3t"


def pretrain_cfg(data, storage, *extra) -> PretrainConfig:
    return load_config(PretrainConfig, [ROOT / "configs/pretrain.yaml"],
                       [*NARROW, f"data={data}", f"storage_path={storage}", "run_name=run", "max_frames=100",
                        "max_steps=2", "checkpoint_every=2", "batch_size=4", "bucket_pool_rows=16", "num_workers=1",
                        *extra])


def files_holding(root, text: str) -> list[str]:
    """Every file under ``root`` whose bytes hold ``text`` (SQLite stores and their journals too)."""
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and text.encode() in p.read_bytes())


class Trial:
    """What Ray's MLflow callback reads of a Tune trial (hashable: the callback keys its runs by it)."""

    def __init__(self, trial_id: str, config: dict, local_path: str):
        self.trial_id, self.config, self.local_path = trial_id, config, local_path

    def __str__(self):
        return f"trial_{self.trial_id}"


def clean_env(monkeypatch, *names):
    """``names`` unset now and whatever the code under test sets for them undone afterwards."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.parametrize("given, shown", [
    ("postgresql://alice:hunter2@db:5432/runs", "postgresql://alice:***@db:5432/runs"),
    ("python x.py tracking_uri=mysql://bob:p@ss@h/db lr=1", "python x.py tracking_uri=mysql://bob:***@h/db lr=1"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&x=2",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=2"),
    ("https://acct.blob.core.windows.net/c?sv=2021&sig=abc%3D", "https://acct.blob.core.windows.net/c?sv=2021&sig=***"),
    ("http://h/?access_token=t1&token=t2&password=p&client_secret=s&api_key=k",
     "http://h/?access_token=***&token=***&password=***&client_secret=***&api_key=***"),
    ("sqlite:////runs/mlflow.db", "sqlite:////runs/mlflow.db"),  # nothing secret: unchanged
    ("lr=0.1 key=3 http://user@host/x", "lr=0.1 key=3 http://user@host/x"),
])
def test_redaction_hides_passwords_and_query_tokens_and_keeps_the_rest(given, shown):
    assert redact(given) == shown
    assert redact({"cfg": [given], "n": 1}) == {"cfg": [shown], "n": 1}


def test_a_servers_credentials_come_out_of_its_uri_percent_decoded():
    assert split_userinfo("http://al%40ice:p%3Ass@127.0.0.1:5000/x") == ("http://127.0.0.1:5000/x", "al@ice", "p:ss")
    assert split_userinfo("https://mlflow.example/x") == ("https://mlflow.example/x", None, None)


# -- the attack: grep what a run wrote -----------------------------------------------------------------


def test_no_file_a_tracked_pretraining_run_writes_and_no_console_line_holds_its_credentials(
        tiny_data, tmp_path, monkeypatch, capsys):
    from ctal.pretrain import pretrain_loop, prepare

    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path}/store/mlflow.db?token={SECRET}"  # MLflow takes a query on a SQLite URI
    monkeypatch.setenv(manifest.COMMAND_ENV, shlex.join(
        ["python", "pipelines/pretrain.py", "tracking=mlflow", f"tracking_uri={uri}",
         f"--note=postgresql://alice:{SECRET}@db/x"]))
    cfg = pretrain_cfg(tiny_data, tmp_path, "tracking=mlflow", f"tracking_uri={uri}")
    run_dir = tmp_path / "run"
    with manifest.recorded_run(run_dir, "pretraining", cfg):
        out = pretrain_loop(prepare(cfg), run_dir=run_dir, log=print)
    console = capsys.readouterr()
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert {"manifest.json", "checkpoint.json", "README.md", "mlflow.db"} <= set(written), written
    assert files_holding(tmp_path, SECRET) == [] and SECRET not in console.out + console.err
    # redacted, not dropped: the manifests and the tracker still say where the runs went
    assert manifest.read(run_dir)["config"]["tracking_uri"] == uri.replace(SECRET, "***")
    assert "postgresql://alice:***@db/x" in (Path(out["checkpoint"]) / "README.md").read_text()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ctal-pretrain").experiment_id])
    assert run.data.params["tracking_uri"] == uri.replace(SECRET, "***")


@pytest.mark.slow
def test_no_file_the_pretraining_and_sweep_recipes_write_holds_their_credentials(tiny_data, tmp_path, ray_local,
                                                                                 capsys):
    from pipelines import pretrain, tune_finetune

    (tmp_path / "store").mkdir()
    (tmp_path / "space.yaml").write_text("fusion: {choice: [ctal, text_only]}\n")
    uri = f"sqlite:///{tmp_path}/store/mlflow.db?token={SECRET}"
    tracked = ["tracking=mlflow", f"tracking_uri={uri}"]
    # Ray Train's rank 0 logs to MLflow, the driver and the workers write manifests and checkpoints
    assert pretrain.main(["--data", str(tiny_data), "--storage", str(tmp_path / "pretrain"), "--size", "narrow",
                          "--num-workers", "1", "max_steps=2", "checkpoint_every=2", "batch_size=4",
                          "bucket_pool_rows=16", "cpus_per_worker=0.5", *tracked]) == 0
    code = tune_finetune.main(["--task", "sentiment", "--data", str(tiny_data), "--config",
                               str(ROOT / "configs/narrow.yaml"), "--storage", str(tmp_path / "sweeps"),
                               "--name", "s", "--search", "grid", "--scheduler", "fifo",
                               "--space", str(tmp_path / "space.yaml"), "epochs=1", "max_frames=80", *tracked])
    assert code == 0, capsys.readouterr().err[-2000:]
    # a resume unpickles the tracker callbacks (redacted in tuner.pkl) and is given the URI again
    code = tune_finetune.main(["--resume", "--storage", str(tmp_path / "sweeps"), "--name", "s", f"tracking_uri={uri}"])
    console = capsys.readouterr()
    assert code == 0, console.err[-2000:]
    assert files_holding(tmp_path, SECRET) == [] and SECRET not in console.out + console.err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert len(runs) == 2 and {r.data.params["tracking_uri"] for r in runs} == {uri.replace(SECRET, "***")}


# -- authenticated tracking servers --------------------------------------------------------------------


class AuthServer(http.server.BaseHTTPRequestHandler):
    """A tracking server behind basic auth: 401 without alice's credentials; with them, 200 to the
    pre-check's GET / (as MLflow's UI answers) and 503 to the API (what it received is recorded)."""

    seen: list = []

    def _answer(self):
        auth = self.headers.get("Authorization")
        type(self).seen.append((self.path, auth))
        if auth != "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        else:
            self.send_response(200 if self.path == "/" else 503)
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    AuthServer.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_authenticated_server_passes_the_check_and_mlflow_gets_the_credentials_not_the_uri(
        auth_server, tmp_path, monkeypatch):
    clean_env(monkeypatch, *CREDENTIAL_ENV, *MLFLOW_HTTP_LIMITS)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://alice:{SECRET}@{auth_server}"
    check_tracking("mlflow", url)  # was: "no tracking server answers there (nonnumeric port ...)"
    with pytest.raises(ConfigError, match=r"refused these credentials \(HTTP 401\)") as refused:
        check_tracking("mlflow", f"http://alice:wrong-{SECRET}@{auth_server}")
    assert SECRET not in str(refused.value) and "alice:***@" in str(refused.value)

    lines = []
    run = open_run("mlflow", url, home=tmp_path, experiment="x", run_name="r", config={"tracking_uri": url},
                   log=lines.append)
    assert run is None and len(lines) == 1 and SECRET not in lines[0]  # the API answers 503: one warning
    api = [auth for path, auth in AuthServer.seen if path.startswith("/api/")]
    assert api and set(api) == {"Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()}


class AuthProxy(http.server.BaseHTTPRequestHandler):
    """Basic auth in front of a real MLflow server (``upstream``), as a reverse proxy puts it: 401
    without alice's credentials, else the request forwarded without them."""

    upstream, refused = "", []

    def _forward(self):
        if self.headers.get("Authorization") != "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode():
            type(self).refused.append(self.path)
            self.send_response(401)
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")}
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_pretraining_run_tracks_into_a_real_mlflow_server_behind_basic_auth(tiny_data, tmp_path, monkeypatch,
                                                                              capsys):
    from ctal.pretrain import pretrain_loop, prepare

    clean_env(monkeypatch, *CREDENTIAL_ENV)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    AuthProxy.upstream, AuthProxy.refused = f"127.0.0.1:{port}", []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while True:  # the server is up once it answers
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.2)
        url = f"http://alice:{SECRET}@127.0.0.1:{proxy.server_address[1]}"
        cfg = pretrain_cfg(tiny_data, tmp_path, "tracking=mlflow", f"tracking_uri={url}")
        with manifest.recorded_run(tmp_path / "run", "pretraining", cfg):
            pretrain_loop(prepare(cfg), run_dir=tmp_path / "run", log=print)
        client = MlflowClient(f"http://127.0.0.1:{port}")  # the server itself, behind the proxy
        (run,) = client.search_runs([client.get_experiment_by_name("ctal-pretrain").experiment_id])
        losses = client.get_metric_history(run.info.run_id, "loss")
    finally:
        proxy.shutdown()
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, by its group
        server.wait(timeout=60)
    console = capsys.readouterr()
    assert run.info.status == "FINISHED" and [m.step for m in losses][-1] == 2
    assert run.data.params["tracking_uri"] == url.replace(SECRET, "***") and AuthProxy.refused == []
    assert "warning" not in console.out + console.err
    assert files_holding(tmp_path, SECRET) == [] and SECRET not in console.out + console.err


# -- bounded trackers in sweeps ------------------------------------------------------------------------


class GoneAfterCheck(http.server.BaseHTTPRequestHandler):
    """Answers the pre-check; its process then hangs up on every request (a server gone bad)."""

    def do_GET(self):
        if self.path == "/":
            self.send_response(200)
            self.end_headers()
        else:
            self.close_connection = True  # no answer at all

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_sweep_tracker_whose_server_dies_after_the_check_costs_seconds_and_one_line(tmp_path, monkeypatch,
                                                                                   capsys):
    from ctal.distributed.tracking import sweep_callbacks

    clean_env(monkeypatch, *MLFLOW_HTTP_LIMITS)  # the sweep path must set its own bounds
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GoneAfterCheck)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = FinetuneConfig(tracking="mlflow", tracking_uri=f"http://127.0.0.1:{server.server_address[1]}")
        (callback,) = sweep_callbacks(cfg, tmp_path, "sweep")  # the pre-check passes
    finally:
        server.shutdown()
        server.server_close()
    trial = Trial(trial_id="t1", config={}, local_path=str(tmp_path))
    start = time.monotonic()
    callback.setup()
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {"dev_mae": 1.0, "training_iteration": 1})
    callback.log_trial_end(trial)
    took = time.monotonic() - start
    err = capsys.readouterr().err.splitlines()
    assert took < 30, took  # MLflow's default retries: minutes (246 s measured)
    assert len([line for line in err if line.startswith("warning: mlflow tracking failed")]) == 1, err


# -- a resumed tracked sweep ---------------------------------------------------------------------------


def test_a_resumed_sweep_continues_a_trials_mlflow_run_and_opens_no_second(tmp_path, capsys):
    from ctal.distributed.tracking import sweep_callbacks

    cfg = FinetuneConfig(tracking="mlflow")
    trial = Trial(trial_id="t1", config={"lr": 0.1}, local_path=str(tmp_path))
    for epoch in (1, 2):  # the first driver, then the resumed one (a new callback, the same store)
        (callback,) = sweep_callbacks(cfg, tmp_path, "sweep")
        callback.setup()
        callback.log_trial_start(trial)
        callback.log_trial_result(epoch, trial, {"dev_mae": 1.0 / epoch, "training_iteration": epoch})
        callback.log_trial_end(trial)
    assert "warning" not in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dev_mae")] == [1, 2]
    assert run.info.status == "FINISHED"


# -- stores that cannot be written, checked before the run ---------------------------------------------


def test_a_sqlite_store_in_a_missing_directory_stops_the_recipe_with_exit_2(tiny_data, tmp_path, run_recipe):
    code, err = run_recipe("pretrain", "--data", tiny_data, "--storage", tmp_path, "--size", "narrow",
                           "tracking=mlflow", f"tracking_uri=sqlite:///{tmp_path}/missing_dir/x.db")
    assert code == 2 and f"the directory {tmp_path}/missing_dir does not exist" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("tracking", ["mlflow", "wandb"])
def test_a_read_only_store_is_refused_in_one_line_before_the_run(tracking, tmp_path):
    # /sys takes no new files, root's included (a chmod would not stop root)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"tracking_uri=/sys/ctal-store: /sys is not writable"):
        check_tracking(tracking, "/sys/ctal-store")
    with pytest.raises(ConfigError, match=r"its store goes in /sys/ctal-run\): /sys is not writable"):
        check_tracking(tracking, None, "/sys/ctal-run")
    assert time.monotonic() - start < 5


# -- sharing a checkpoint ------------------------------------------------------------------------------


def test_share_writes_checkpoints_without_host_name_or_absolute_paths(tiny_data, tmp_path, monkeypatch):
    from ctal import checkpoint
    from ctal.pretrain import pretrain_loop

    monkeypatch.setenv(manifest.COMMAND_ENV, f"python {ROOT}/pipelines/pretrain.py --data {tiny_data} share=true")
    host = platform.node()
    written = {}
    for share in ("false", "true"):
        cfg = pretrain_cfg(tiny_data, tmp_path / share, f"share={share}")
        out = pretrain_loop(cfg, run_dir=tmp_path / share / "run", log=lambda _: None)
        written[share] = Path(out["checkpoint"])
        checkpoint.verify(written[share])  # hashes still cover every file
    texts = {share: {f: (ckpt / f).read_text() for f in ("manifest.json", "checkpoint.json", "README.md")}
             for share, ckpt in written.items()}
    assert host in texts["false"]["manifest.json"] and str(tiny_data) in texts["false"]["README.md"]  # the control
    for name, text in texts["true"].items():
        assert host not in text and str(tmp_path) not in text and str(ROOT) not in text, name
        assert str(tiny_data.parent) not in text, name
    assert json.loads(texts["true"]["checkpoint.json"])["config"]["data"] == tiny_data.name
    assert f"python pretrain.py --data {tiny_data.name} share=true" in texts["true"]["README.md"]
