"""Study storage for real: two worker processes on one study, resume after a killed worker, PostgreSQL.

Workers are separate Python processes running :func:`cxrkit.tuning.study.run_study` on the synthetic data of
``test_training.py``; the PostgreSQL test starts its own server on loopback (``initdb``/``pg_ctl`` from the
``postgresql`` package, run as an unprivileged user when the tests run as root) and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from cxrkit.tuning.space import parse_space
from cxrkit.tuning.study import open_storage, run_study

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_tuning import synthetic_base, synthetic_runner  # noqa: E402

LR_SPACE = {"train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}

WORKER = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from lightning.pytorch import Callback
from test_training import SyntheticDataModule, TinyNet, tiny_config
from cxrkit.training import run
from cxrkit.tuning.space import parse_space
from cxrkit.tuning.study import run_study

args = json.loads(sys.argv[1])
tmp = Path(args["tmp"])


class PauseInTrial(Callback):
    '''After the first validation of trial ``pause_trial``, write a marker file and hang (to be killed).'''

    def on_validation_end(self, trainer, pl_module):
        paused_trial = trainer.default_root_dir.endswith(f"trial_{{args['pause_trial']:04d}}")
        if paused_trial and not trainer.sanity_checking:
            (tmp / "paused").write_text("")
            time.sleep(600)


def runner(config, callbacks, tags):  # as test_tuning.synthetic_runner, which needs the whole CLI imported
    extra = [PauseInTrial()] if args.get("pause_trial") is not None else []
    return run.fit(config, SyntheticDataModule(seed=int(config.seed)), TinyNet, config.output_dir,
                   callbacks=[*callbacks, *extra], mlflow_tags=tags)


(tmp / f"ready-{{args['worker']}}").write_text("")
while len(list(tmp.glob("ready-*"))) < args["workers"]:  # start the study together, like a job array
    time.sleep(0.05)
space = parse_space(args["space"])
base = tiny_config(tmp / "base", "train.max_epochs=2", "train.scheduler.name=none")  # as synthetic_base
run_study(base, space, args["trials"], study_name="shared", storage=args["storage"], study_dir=tmp / "study",
          runner=runner, write_report=False)
"""


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def start_worker(tmp_path: Path, worker: int, **args) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    payload = json.dumps({"tmp": str(tmp_path), "worker": worker, **args})
    log = open(tmp_path / f"worker-{worker}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, str(script), payload],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def worker_log(tmp_path: Path, worker: int) -> str:
    return (tmp_path / f"worker-{worker}.log").read_text()[-4000:]


@pytest.mark.slow
def test_two_worker_processes_share_one_journal_study(tmp_path):
    storage = f"journal://{tmp_path / 'shared' / 'study.log'}"
    space = {"study": {"seed": 5, "n_startup_trials": 2, "pruner": "none"}, "params": LR_SPACE}
    workers = [
        start_worker(tmp_path, index, workers=2, space=space, trials=4, storage=storage) for index in range(2)
    ]
    for index, process in enumerate(workers):
        assert process.wait(timeout=600) == 0, worker_log(tmp_path, index)

    settings = parse_space({"params": LR_SPACE}).settings
    study = optuna.load_study(study_name="shared", storage=open_storage(storage, settings))
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(counted) <= 5, "the study's target is shared (one extra trial if both finish together)"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2, "both processes ran trials"
    assert len({t.params["train.optimizer.lr"] for t in study.trials}) == len(study.trials), (
        "workers must not draw the same parameters"
    )
    assert len({t.user_attrs["run_dir"] for t in study.trials}) == len(study.trials)
    assert (tmp_path / "study" / "best_config.yaml").is_file()


@pytest.mark.slow
def test_interrupted_study_resumes_and_fails_the_killed_trial(tmp_path):
    space = {
        "study": {
            "sampler": "random",
            "seed": 1,
            "pruner": "none",
            "heartbeat_interval": 1,
            "grace_period": 3,
        },
        "params": LR_SPACE,
    }
    storage = f"sqlite:///{tmp_path / 'study' / 'study.db'}"
    worker = start_worker(tmp_path, 0, workers=1, space=space, trials=3, storage=storage, pause_trial=1)
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "paused").exists():
            assert worker.poll() is None, worker_log(tmp_path, 0)
            assert time.monotonic() < deadline, "the worker never reached trial 1"
            time.sleep(0.1)
        study = optuna.load_study(study_name="shared", storage=storage)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=60)
    time.sleep(3.5)  # the killed trial's heartbeat is now older than the grace period

    result = run_study(
        synthetic_base(tmp_path / "base"),
        parse_space(space),
        3,
        study_name="shared",
        storage=storage,
        study_dir=tmp_path / "study",
        runner=synthetic_runner,
        write_report=False,
    )
    trials = result.study.trials
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], (
        "the killed trial is failed and does not count towards the 3 trials"
    )
    killed = trials[1]
    assert len(killed.intermediate_values) == 1 and "epochs" not in killed.user_attrs  # killed in epoch 2
    assert result.best_config is not None


# ---- PostgreSQL --------------------------------------------------------------------------------------------
def postgres_binaries() -> Path | None:
    """The bin folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on loopback with an empty database; yields its SQLAlchemy URL."""
    pytest.importorskip("psycopg2", reason="psycopg2 (psycopg2-binary) is needed for PostgreSQL storage")
    import psycopg2

    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="cxrkit-pg-"))  # not under pytest's tmp (0700, unreadable to others)
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        user = "postgres" if _user_exists("postgres") else "nobody"
        shutil.chown(root, user=user)
        as_user = ["runuser", "-u", user, "--"]
    data, port = root / "data", free_port()
    subprocess.run(
        [
            *as_user,
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-U",
            "cxr",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_user,
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "120",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="cxr", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE optuna")
        connection.close()
        yield f"postgresql+psycopg2://cxr@127.0.0.1:{port}/optuna"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(
                [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                check=True,
                capture_output=True,
            )
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.slow
def test_study_in_postgresql(tmp_path, postgres_url):
    import psycopg2

    space = parse_space({"study": {"seed": 3, "pruner": "median"}, "params": LR_SPACE})
    result = run_study(
        synthetic_base(tmp_path),
        space,
        2,
        study_name="pg",
        storage=postgres_url,
        study_dir=tmp_path / "study",
        runner=synthetic_runner,
        write_report=False,
    )
    assert [t.state for t in result.study.trials] == [TrialState.COMPLETE] * 2
    reloaded = optuna.load_study(study_name="pg", storage=postgres_url)
    assert reloaded.best_value == pytest.approx(result.study.best_value)
    connection = psycopg2.connect(postgres_url.replace("postgresql+psycopg2", "postgresql"))
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
        assert cursor.fetchone()[0] == 2
        cursor.execute("SELECT count(*) FROM trial_heartbeats")
        assert cursor.fetchone()[0] == 2, "each trial recorded heartbeats"
    connection.close()
    assert (tmp_path / "study" / "best_config.yaml").is_file()


def test_journal_storage_fails_trials_whose_heartbeat_stopped(tmp_path):
    settings = parse_space(
        {"params": LR_SPACE, "study": {"heartbeat_interval": 1, "grace_period": 2}}
    ).settings
    storage = open_storage(f"journal://{tmp_path / 'study.log'}", settings)
    study = optuna.create_study(storage=storage, study_name="beats")
    dead, alive = study.ask(), study.ask()
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.3)
    storage.record_heartbeat(alive._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING]
