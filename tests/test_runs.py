"""Runs that are never silently damaged, lost or mixed (issue 12): flag ranges, non-finite values, the
run lock, finding the run to continue, resume with changed arguments, extension, full disks."""
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import runs
import train
import watch
from data import ShardWriter
from test_train import ROOT, base_args, load, write_pixels


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_pixels(tmp_path_factory.mktemp("data"))


def cli(argv, capsys):
    """(exit code, train.py's own stderr lines: the log and progress bar, which the line may follow, left out)."""
    code = train.cli([str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    return code, "\n".join(line[line.index("train.py:"):] for line in lines if "train.py:" in line)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


class Interrupt(BaseException):
    """A kill, in-process: not an Exception, so nothing on the way handles it."""


def interrupt_at(monkeypatch, module, name, when, after=False):
    """Make module.name raise Interrupt on the calls where when(call number, args) is true: instead of
    the call, or after it."""
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(a)
        result = real(*a, **k) if after or not when(len(calls), a) else None
        if when(len(calls), a):
            raise Interrupt
        return result
    monkeypatch.setattr(module, name, wrapped)
    return calls


def killed_run(monkeypatch, args, module, name, when, after=False):
    """train.py with args, killed (Interrupt) at the call of module.name where when(call number, args)."""
    interrupt_at(monkeypatch, module, name, when, after)
    with pytest.raises(Interrupt):
        train.main(train.parse_args(args))
    monkeypatch.undo()


def after_checkpoint(n, a):
    return os.path.basename(a[1]) == "0000002.pt"


BAD_NUMBERS = [  # (flags, the flag the one-line error names)
    (["--grad-clip", "-1"], "--grad-clip -1"), (["--grad-clip", "nan"], "--grad-clip nan"),
    (["--warmup-steps", "-5"], "--warmup-steps -5"), (["--decay-steps", "-1"], "--decay-steps -1"),
    (["--depth", "0"], "--depth 0"), (["--depth", "-1"], "--depth -1"),
    (["--hidden-size", "-64", "--num-heads", "2"], "--hidden-size -64"), (["--num-heads", "-2"], "--num-heads -2"),
    (["--lr", "0"], "--lr 0"), (["--lr=-1e-3"], "--lr -0.001"), (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"), (["--seed", str(2 ** 32)], "--seed 4294967296"), (["--seed", "-1"], "--seed -1"),
    (["--num-workers", "-1"], "--num-workers -1"), (["--ema-sigma-rels", "0.05", "0.31"], "--ema-sigma-rels 0.31"),
    (["--ema-sigma-rels", "0"], "--ema-sigma-rels 0"), (["--ema-decay", "1"], "--ema-decay 1"),
    (["--ema-decay", "-0.1"], "--ema-decay -0.1"), (["--sample-steps", "0"], "--sample-steps 0"),
    (["--sample-steps", "2000"], "--sample-steps 2000"), (["--num-steps", "0"], "--num-steps 0"),
]


def test_every_numeric_flag_is_range_checked_at_start_up(pixels, tmp_path, capsys):
    """Item 1: one line naming the flag, exit 2, no run directory; the edges of each range are accepted."""
    res = tmp_path / "res"
    for flags, needle in BAD_NUMBERS:
        code, err = cli(base_args(pixels, res, "--num-steps", "1", "--ckpt-every", "1", *flags), capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (flags, err)
    assert not os.path.exists(res) or os.listdir(res) == []
    edges = ["--ema-sigma-rels", "0.3", "0.001", "--ema-decay", "0", "--sample-steps", "1000", "--seed",
             str(2 ** 32 - 1), "--grad-clip", "0", "--warmup-steps", "0", "--num-workers", "0"]
    args = train.parse_args(base_args(pixels, res, *edges))
    assert args.ema_sigma_rels == [0.3, 0.001] and args.seed == 2 ** 32 - 1


def test_a_diverging_run_writes_no_nan_and_says_what_exists(pixels, tmp_path, capsys):
    """Item 3: at lr 1e30 the weights are NaN from step 2; the snapshot of step 1 is kept, none after it,
    and the stop message does not promise a checkpoint that was never written."""
    code, err = cli(base_args(pixels, tmp_path, "--num-steps", "3", "--lr", "1e30", "--snapshot-every", "1",
                              "--log-every", "100", "--ckpt-every", "100"), capsys)
    assert code == 1 and "non-finite" in err and "no checkpoint was written" in err, err
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    files = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert files == ["ema-snapshot-0000001.pt"], files
    for state in load(os.path.join(run_dir, "checkpoints", files[0]))["ema_power"].values():
        assert all(torch.isfinite(v).all() for v in state.values())


def write_latents(path, bad_shard=None, bad_item=3):
    writer = ShardWriter(path, "latent", (4, 8, 8), 2)
    rng = np.random.default_rng(0)
    for index in range(2):
        mean = rng.normal(size=(16, 4, 8, 8)).astype(np.float16)
        if index == bad_shard:
            mean[bad_item, 1, 2, 3] = np.nan
        writer.write_shard(index, np.arange(16) % 2, mean=mean, std=np.full((16, 4, 8, 8), 0.1, np.float16))
    writer.finish(channel_mean=[0.0] * 4, channel_std=[1.0] * 4)
    return str(path)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_nan_in_a_shard_is_named_on_first_read(tmp_path, capsys, workers):
    """Item 3: a NaN in the data stops the run with one line naming the shard (also from loader workers).
    The latents name no VAE, so the run trains without grids (it would be refused for them)."""
    data = write_latents(tmp_path / "data", bad_shard=1)
    code, err = cli(base_args(data, tmp_path / "res", "--num-steps", "8", "--ckpt-every", "8",
                              "--num-workers", workers, "--sample-every", "0"), capsys)
    assert code == 2 and "shard-00001.mean.npy: item 3 holds NaN or inf" in err, err
    assert len(err.splitlines()) == 1


def test_data_verify_names_the_shard_with_non_finite_values(tmp_path):
    """Item 3: `python data.py verify DIR` exits 1 naming the bad shard and item, 0 for clean data."""
    bad, good = write_latents(tmp_path / "bad", bad_shard=1, bad_item=5), write_latents(tmp_path / "good")
    verify = [sys.executable, os.path.join(ROOT, "data.py"), "verify"]
    result = subprocess.run([*verify, bad], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "shard-00001.mean.npy: 1 item(s)" in result.stdout
    assert "first at index 5" in result.stdout and "shard-00000" not in result.stdout
    result = subprocess.run([*verify, good], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "every value finite" in result.stdout
    result = subprocess.run([*verify, str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


HOLD_LOCK = """
import sys, time
import runs
lock = runs.RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_in_use_is_refused_and_a_stale_lock_does_not_block(pixels, tmp_path, capsys, monkeypatch):
    """Item 4: a second writer of a live run gets one line naming it; once the writer is killed (its
    lock left behind), the same command continues the run."""
    args = base_args(pixels, tmp_path, "--num-steps", "4", "--ckpt-every", "2")
    killed_run(monkeypatch, args, runs, "atomic_save", after_checkpoint, after=True)
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, run_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = cli(args, capsys)
        assert code == 2 and run_dir in err and f"pid {holder.pid}" in err and len(err.splitlines()) == 1, err
        code, err = cli([*args, "--resume", run_dir], capsys)
        assert code == 2 and "in use" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(os.path.join(run_dir, "lock"))  # stale: its owner is dead
    assert train.main(train.parse_args(args)) == run_dir
    assert os.listdir(tmp_path) == [os.path.basename(run_dir)]
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "0000004.pt"))



def test_a_second_writer_names_the_holder_that_has_not_written_its_pid_yet(tmp_path):
    """The holder writes 'pid P on HOST' just after taking the lock; a second writer that comes in
    between (the file still empty) names it all the same instead of 'another process' (a flaky
    refusal message of the test below)."""
    with open(tmp_path / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        late = threading.Timer(0.2, lambda: (held.write("pid 4242 on host\n"), held.flush()))
        late.start()
        with pytest.raises(runs.UsageError, match="in use by pid 4242 on host"):
            runs.RunLock(str(tmp_path))
        late.join()


def test_the_same_command_started_twice_trains_once(pixels, tmp_path):
    """Item 4: two real train.py processes with one command in an empty results dir: whichever comes
    second is refused in one line naming the other's pid, and only one run directory exists."""
    argv = [sys.executable, "train.py", *base_args(pixels, tmp_path / "res", "--num-steps", "100000",
                                                   "--ckpt-every", "100000", "--log-every", "1000")]
    logs = [open(tmp_path / f"err{i}.txt", "w+") for i in range(2)]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for log in logs]
    try:
        waited = 0
        while all(p.poll() is None for p in procs) and waited < 240:  # the refused one ends; the other trains on
            waited += 1
            try:
                procs[0].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        assert any(p.poll() is not None for p in procs), "both still running after 2 minutes"
        (refused, log), (running, _) = sorted(zip(procs, logs), key=lambda pl: pl[0].poll() is None)
        log.seek(0)
        err = [line for line in log.read().splitlines() if "train.py:" in line]
        assert refused.returncode == 2 and running.poll() is None, err
        assert len(err) == 1 and f"in use by pid {running.pid}" in err[0], err
        assert len(os.listdir(tmp_path / "res")) == 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for log in logs:
            log.close()


TRY_LOCK = """
import sys
import runs
try:
    runs.RunLock(sys.argv[1]).release()
    print("free")
except runs.UsageError as e:
    print("refused", e)
"""


def test_a_training_run_holds_its_lock(pixels, tmp_path, monkeypatch):
    """Item 4: while train.py writes a run, another process cannot take the run's lock; afterwards it can."""
    seen = []
    real_save = runs.atomic_save

    def save_and_probe(obj, path):
        real_save(obj, path)
        if os.path.basename(path) != "0000002.pt":  # one probe, at the checkpoint (each costs a python start-up)
            return
        run_dir = os.path.dirname(os.path.dirname(path))
        probe = subprocess.run([sys.executable, "-c", TRY_LOCK, run_dir], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
        seen.append(probe.stdout)
    monkeypatch.setattr(runs, "atomic_save", save_and_probe)
    run_dir = train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2")))
    assert seen and all(s.startswith("refused") and f"pid {os.getpid()}" in s for s in seen), seen
    probe = subprocess.run([sys.executable, "-c", TRY_LOCK, run_dir], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert probe.stdout.strip() == "free"


def test_the_same_command_finds_its_run_among_others(pixels, tmp_path, capsys, monkeypatch):
    """Item 5: a run killed after its first checkpoint is continued though another run came after it,
    with --results-dir spelled with a trailing slash: its directory is named from the arguments that
    shape its result, so --log-every does not change it and --seed does."""
    args = base_args(pixels, tmp_path, "--num-steps", "4", "--ckpt-every", "2")
    killed_run(monkeypatch, args, runs, "atomic_save", after_checkpoint, after=True)
    (first,) = os.listdir(tmp_path)
    other = train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "2", "--seed", "1")))
    assert os.path.basename(other) != first
    resumed = train.main(train.parse_args(base_args(pixels, str(tmp_path) + "/", "--num-steps", "4",
                                                    "--ckpt-every", "2", "--log-every", "1")))
    assert os.path.basename(resumed) == first and len(os.listdir(tmp_path)) == 2
    assert "resumed at step 2" in open(os.path.join(resumed, "log.txt")).read()


def test_a_run_killed_before_its_first_checkpoint_is_continued_in_its_directory(pixels, tmp_path, monkeypatch):
    """Item 5: no checkpoint yet: the rerun starts over in the same directory, not in a new one."""
    args = base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2", "--monitor-every", "1")
    killed_run(monkeypatch, args, train, "block_magnitudes", lambda n, a: n == 1)
    (first,) = os.listdir(tmp_path)
    assert train.main(train.parse_args(args)) == os.path.join(tmp_path, first)
    assert os.listdir(tmp_path) == [first]


def test_a_run_killed_after_its_last_checkpoint_gets_its_plots_without_retraining(pixels, tmp_path, monkeypatch,
                                                                                   capsys):
    """Item 5: the rerun writes the magnitude plot and grid from the final checkpoint; no step runs again.
    Once finished, the same command says so, where, and exits 0 without a second run."""
    args = base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2", "--log-every", "1")
    killed_run(monkeypatch, args, watch, "plot_magnitudes", lambda n, a: n == 1)
    (name,) = os.listdir(tmp_path)
    run_dir = os.path.join(tmp_path, name)
    final = os.path.join(run_dir, "checkpoints", "0000002.pt")
    before = (open(final, "rb").read(), records(run_dir))
    assert not os.path.exists(os.path.join(run_dir, "magnitudes.png"))
    assert train.main(train.parse_args(args)) == run_dir and os.listdir(tmp_path) == [name]
    assert open(final, "rb").read() == before[0] and records(run_dir) == before[1]  # nothing retrained
    assert os.path.isfile(os.path.join(run_dir, "magnitudes.png")) and os.path.isfile(os.path.join(run_dir, "curves.png"))
    assert os.path.isfile(os.path.join(run_dir, "samples", "0000002.png"))
    capsys.readouterr()
    assert train.cli(args) == 0 and os.listdir(tmp_path) == [name]  # finished now: nothing trains again
    assert f"{run_dir}: this command's run has finished its 2 steps" in capsys.readouterr().out
    assert open(final, "rb").read() == before[0] and records(run_dir) == before[1]


class CountingEvaluation:
    """watch.Evaluation's stand-in: counts the calls, returns a fixed metric, or is killed at call kill_at;
    seen holds a fingerprint (the sum of every parameter) of the weights of each call."""
    calls, kill_at, seen = 0, None, []

    @classmethod
    def for_run(cls, *args, **kwargs):
        return cls()

    def __call__(self, weights):
        CountingEvaluation.calls += 1
        CountingEvaluation.seen.append(fingerprint(weights.state_dict()))
        if CountingEvaluation.calls == CountingEvaluation.kill_at:
            raise Interrupt()
        return {"fd_classifier": 1.0}


def fingerprint(state_dict):
    return sum(v.double().sum().item() for v in state_dict.values())


def test_a_run_killed_before_its_final_evaluation_gets_it_on_rerun(pixels, tmp_path, monkeypatch):
    """A kill after the final checkpoint, in the final evaluation: the rerun evaluates once, trains nothing."""
    args = base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2", "--log-every", "1",
                     "--sample-every", "0", "--eval-every", "1", "--eval-samples", "4", "--eval-metrics", "fd_classifier")
    monkeypatch.setattr(watch, "Evaluation", CountingEvaluation)
    monkeypatch.setattr(CountingEvaluation, "kill_at", 2)  # step 1 evaluated, killed evaluating step 2
    with pytest.raises(Interrupt):
        train.main(train.parse_args(args))
    (name,) = os.listdir(tmp_path)
    run_dir = os.path.join(tmp_path, name)
    final = open(os.path.join(run_dir, "checkpoints", "0000002.pt"), "rb").read()
    monkeypatch.setattr(CountingEvaluation, "calls", 0)
    assert train.main(train.parse_args(args)) == run_dir
    assert CountingEvaluation.calls == 1 and open(os.path.join(run_dir, "checkpoints", "0000002.pt"), "rb").read() == final
    assert [r["step"] for r in records(run_dir) if "eval" in r] == [1, 2]
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2]  # nothing retrained


def test_an_evaluation_interrupted_mid_run_is_made_on_resume(pixels, tmp_path, monkeypatch):
    """Issue 21: killed during the step-2 evaluation (after the step-2 checkpoint): the rerun makes the
    step-2 evaluation before it trains on; before the fix only the final step was checked, so the step-2
    point of the curve was lost for good."""
    args = base_args(pixels, tmp_path, "--num-steps", "6", "--ckpt-every", "2", "--log-every", "1",
                     "--sample-every", "0", "--eval-every", "2", "--eval-samples", "4", "--eval-metrics", "fd_classifier")
    monkeypatch.setattr(watch, "Evaluation", CountingEvaluation)
    monkeypatch.setattr(CountingEvaluation, "calls", 0)
    monkeypatch.setattr(CountingEvaluation, "kill_at", 1)
    with pytest.raises(Interrupt):
        train.main(train.parse_args(args))
    (name,) = os.listdir(tmp_path)
    monkeypatch.setattr(CountingEvaluation, "calls", 0)
    monkeypatch.setattr(CountingEvaluation, "kill_at", None)
    assert train.main(train.parse_args(args)) == os.path.join(tmp_path, name)
    assert [r["step"] for r in records(os.path.join(tmp_path, name)) if "eval" in r] == [2, 4, 6]
    assert CountingEvaluation.calls == 3


def test_evaluations_added_on_resume_are_made_from_their_checkpoints(pixels, tmp_path, monkeypatch):
    """A run resumed at step 4 with --eval-every 2 added evaluates step 2 with the sampling weights of
    the step-2 checkpoint (not the step-4 weights it resumes with), step 4 with its own, then step 6."""
    args = base_args(pixels, tmp_path, "--num-steps", "6", "--ckpt-every", "2", "--log-every", "1",
                     "--sample-every", "0", "--eval-metrics", "fd_classifier", "--eval-samples", "4")
    killed_run(monkeypatch, args, watch.RunOutputs, "watch", lambda n, a: a[1].step == 4)  # after the step-4 checkpoint
    (name,) = os.listdir(tmp_path)
    run_dir = os.path.join(tmp_path, name)
    monkeypatch.setattr(watch, "Evaluation", CountingEvaluation)
    monkeypatch.setattr(CountingEvaluation, "seen", [])
    assert train.main(train.parse_args([*args, "--eval-every", "2", "--resume", run_dir])) == run_dir
    assert [r["step"] for r in records(run_dir) if "eval" in r] == [2, 4, 6]
    ckpts = [load(os.path.join(run_dir, "checkpoints", f"000000{k}.pt")) for k in (2, 4)]
    assert CountingEvaluation.seen[:2] == [pytest.approx(fingerprint(c["ema_power"]["0.1"]), abs=1e-9) for c in ckpts]
    assert CountingEvaluation.seen[0] != pytest.approx(CountingEvaluation.seen[1], abs=1e-6)


def test_bare_resume_continues_the_latest_unfinished_run(pixels, tmp_path, capsys, monkeypatch):
    """Item 6: a bare --resume continues the unfinished run, and refuses (one line) when there is none."""
    args = base_args(pixels, tmp_path, "--num-steps", "4", "--ckpt-every", "2")
    code, err = cli([*args, "--resume"], capsys)
    assert code == 2 and "no unfinished run" in err and len(err.splitlines()) == 1
    killed_run(monkeypatch, args, runs, "atomic_save", after_checkpoint, after=True)
    (name,) = os.listdir(tmp_path)
    assert train.main(train.parse_args([*args, "--resume"])) == os.path.join(tmp_path, name)
    assert os.path.isfile(os.path.join(tmp_path, name, "checkpoints", "0000004.pt"))


def test_resume_drops_the_records_logged_after_its_checkpoint(pixels, tmp_path, monkeypatch):
    """Item 7: killed at step 3 (logged, past the checkpoint at 2), the resumed run's metrics.jsonl holds
    each step once, loss and magnitude records alike."""
    args = base_args(pixels, tmp_path, "--num-steps", "4", "--ckpt-every", "2", "--log-every", "1",
                     "--monitor-every", "1")
    killed_run(monkeypatch, args, train, "block_magnitudes", lambda n, a: n == 3)
    (name,) = os.listdir(tmp_path)
    assert [r["step"] for r in records(os.path.join(tmp_path, name)) if "loss" in r] == [1, 2, 3]
    run_dir = train.main(train.parse_args(args))
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records(run_dir) if "act_rms" in r] == [1, 2, 3, 4]


def test_resume_refuses_changes_that_change_the_result_and_records_the_others(pixels, tmp_path, capsys):
    """Items 7, 8: a changed seed, batch or EMA width is refused in one line (no KeyError); a changed
    --log-every is accepted and written to config.json."""
    run_dir = train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2")))
    resume = ["--resume", run_dir]
    for flags, needle in ((["--seed", "1"], "seed=0"), (["--global-batch-size", "4"], "global_batch_size=8"),
                          (["--ema-sigma-rels", "0.05", "0.2"], "ema_sigma_rels=[0.05, 0.1]")):
        code, err = cli(base_args(pixels, tmp_path, "--num-steps", "4", *resume, *flags), capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert config(run_dir)["num_steps"] == 2 and len(runs.checkpoints_in(run_dir)) == 1
    code, err = cli(base_args(pixels, tmp_path, "--num-steps", "4", *resume, "--log-every", "1"), capsys)
    assert code == 0, err
    assert config(run_dir)["log_every"] == 1 and config(run_dir)["num_steps"] == 4
    assert "resumed with --log-every 1 (the run had 2)" in open(os.path.join(run_dir, "log.txt")).read()


def test_an_extended_run_keeps_its_lr_schedule(pixels, tmp_path):
    """Issue 14: --resume RUN --num-steps 20 of a 10-step MaP run keeps warm-up 1 and decay 3 (computed
    from 10 steps; 20 would give 2 and 6): the lr of every step is the closed form of the original
    schedule, and config.json records the new step count."""
    common = ["--mp", "--log-every", "1", "--ckpt-every", "10"]
    run_dir = train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "10", *common)))
    assert (config(run_dir)["warmup_steps"], config(run_dir)["decay_steps"]) == (1, 3)
    train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "20", "--resume", run_dir, *common)))
    saved = config(run_dir)
    assert (saved["num_steps"], saved["warmup_steps"], saved["decay_steps"], saved["snapshot_every"]) == (20, 1, 3, 1)
    lrs = {r["step"]: r["lr"] for r in records(run_dir) if "loss" in r}
    assert sorted(lrs) == list(range(1, 21))
    for step, lr in lrs.items():  # the lr used for optimiser step s (0-based s = step - 1)
        assert lr == pytest.approx(1e-2 / max((step - 1) / 3, 1) ** 0.5, rel=1e-12), step
    assert load(os.path.join(run_dir, "checkpoints", "0000020.pt"))["args"]["num_steps"] == 20


def test_an_unusable_results_dir_is_one_line(pixels, tmp_path, capsys):
    """Item 8: --results-dir that is a file, or below a file (cannot be created)."""
    (tmp_path / "file").write_text("x")
    for res in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, err = cli(base_args(pixels, res, "--num-steps", "2"), capsys)
        assert code == 2 and str(res) in err and len(err.splitlines()) == 1, err
    code, err = cli(["--results-dir", tmp_path / "file" / "sub", "--num-steps", "1"], capsys)  # the demo data
    assert code == 2 and "cannot" in err and len(err.splitlines()) == 1, err


def limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(pixels, tmp_path):
    """Item 8: a checkpoint that cannot be written (in a real process whose files may not grow past half
    a checkpoint) ends with one line, exit 2; the previous checkpoint is untouched, no partial file left."""
    args = base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2", "--snapshot-every", "100")
    run_dir = train.main(train.parse_args(args))
    ckpt = os.path.join(run_dir, "checkpoints", "0000002.pt")
    before = open(ckpt, "rb").read()
    more = base_args(pixels, tmp_path, "--num-steps", "4", "--ckpt-every", "2", "--snapshot-every", "100")
    result = subprocess.run([sys.executable, "train.py", *more, "--resume", run_dir], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, preexec_fn=limit_file_size(len(before) // 2))
    err = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(err) == 1 and "0000004.pt: cannot write" in err[0] and "intact" in err[0], err
    assert open(ckpt, "rb").read() == before
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0000002.pt"]
