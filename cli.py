"""What every script's command line shares: the one error of bad input (exit code 2), an argparse
that raises it, the one-line report of it, and the process group under torchrun.

    def main(argv=None):
        args = cli.ArgumentParser(description=__doc__).parse_args(argv)
        ...                                    # raise UsageError("what is wrong and what to do")

    if __name__ == "__main__":
        sys.exit(cli.run_command("train.py", main))   # 0; 2 bad input; 1 a diverged run; 130 interrupted
"""
import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist


def at_least(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(text):
        if not text.lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text}: must be an integer at least {minimum}")
        return int(text)
    return parse


class UsageError(Exception):
    """Bad arguments, data, weights, checkpoint or run state: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are UsageErrors, so that they are reported like every other."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def one_line(error):
    """An error's first line (torch's and PIL's go on for a screen); for an error re-raised from a
    DataLoader worker (whose message is the worker's traceback), the original message."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


def run_command(prog, main, argv=None):
    """main(argv) as a command: its exit code (an int it returns, else 0); bad input (UsageError, or OSError: a
    missing or unwritable file, a full disk) one line and 2; a diverged run (FloatingPointError)
    one line and 1; Ctrl-C 130, with finished work kept for the rerun."""
    try:
        code = main(argv)
        return code if isinstance(code, int) else 0
    except (UsageError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"{prog}: stopped: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def setup_distributed(timeout=None):
    """(rank, world_size, device). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; the local rank picks the
    GPU, so multi-node runs work. NCCL on GPUs, gloo on CPU; timeout: a datetime.timedelta for
    collectives that wait long (ranks with little left to do), default torch's."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                **({"timeout": timeout} if timeout else {}))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


LONG_WAIT = datetime.timedelta(days=2)  # for process groups whose ranks wait on slower ones (download, fid)


def rank_world():
    """(rank, world size) of torch.distributed, (0, 1) when it is not initialised."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def my_chunks(count):
    """The chunks k of 0 .. count - 1 this process makes: k % world == rank, the rule every chunked job
    (sample.py --fid, feature extraction, encoding, evaluation) deals its work by."""
    rank, world = rank_world()
    return range(rank, count, world)


def gather_chunks(chunks):
    """{k: value} of the chunks of every process, on every process (all_gather_object), from this
    process's {k: value}; the dict itself without torchrun."""
    world = rank_world()[1]
    if world == 1:
        return chunks
    parts = [None] * world
    dist.all_gather_object(parts, chunks)
    return {k: v for part in parts for k, v in part.items()}


def barrier():
    """dist.barrier() under torchrun; nothing in a single process."""
    if dist.is_initialized():
        dist.barrier()


def from_rank_0(obj):
    """obj as rank 0 has it, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
