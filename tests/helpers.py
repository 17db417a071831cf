"""Test helpers shared by several test files."""
import glob
import os
import subprocess
import sys
import tempfile


def torchrun(script_args, nproc, cwd, env=None, timeout=300):
    """`python -m torch.distributed.run` with nproc processes on this machine: script_args is the script
    and its arguments. --standalone puts the rendezvous on a free port picked at run time (a fixed
    --master-port collides with any other launch on the machine), and each rank's stdout and stderr go
    to files of their own. Returns a CompletedProcess whose stdout and stderr are lists, one text per
    rank; a failure or a launch past timeout seconds (stopped with its ranks) raises AssertionError
    with each rank's stderr (its own error) and torchrun's."""
    with tempfile.TemporaryDirectory() as log_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={log_dir}", "--redirects=3", *map(str, script_args)]
        with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as launch:
            try:
                _, launch_stderr = launch.communicate(timeout=timeout)
                failure = f"exited with {launch.returncode}" if launch.returncode else None
            except subprocess.TimeoutExpired:
                launch.terminate()  # torchrun stops its ranks on SIGTERM (a SIGKILL would leave them running)
                _, launch_stderr = launch.communicate()
                failure = f"ran past {timeout} s"
        stdout, stderr = ([read_rank_log(log_dir, rank, name) for rank in range(nproc)]
                          for name in ("stdout", "stderr"))
    if failure:
        ranks = "".join(f"\n--- rank {rank} stderr ---\n{text[-4000:]}" for rank, text in enumerate(stderr))
        raise AssertionError(f"torchrun {' '.join(map(str, script_args))} {failure}{ranks}\n"
                             f"--- torchrun stderr ---\n{launch_stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, 0, stdout, stderr)


def read_rank_log(log_dir, rank, name):
    """A rank's stdout or stderr as torchrun --log-dir --redirects wrote it (LOG_DIR/JOB/attempt_0/RANK/),
    or "" where the rank never started."""
    paths = glob.glob(os.path.join(log_dir, "*", "attempt_0", str(rank), f"{name}.log"))
    if not paths:
        return ""
    with open(paths[0], errors="replace") as f:
        return f.read()
