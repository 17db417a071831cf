"""Progress bars that read well in a terminal and in a log file.

    for batch in progress(batches, desc="features", enabled=rank == 0): ...

On a terminal: tqdm's bar. With the output redirected (a SLURM log, `> log.txt`): one plain line
every LINE_INTERVAL seconds and one at the end, no carriage returns. Off with enabled=False
(`--no-progress`, other ranks) or the environment variable TQDM_DISABLE set to anything but
"", "0", "false" or "no".
"""
import os
import sys

from tqdm import tqdm

LINE_INTERVAL = 30.0  # seconds between plain lines in a log file


def disabled_by_env():
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def is_terminal(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LineProgress(tqdm):
    """tqdm that prints each refresh as its own line (for files): no carriage return, no clearing."""

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clears the bar with an empty message: nothing to clear in a file
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        pass

    def close(self):
        if not self.disable and hasattr(self, "last_print_t") and self.last_print_n != self.n:
            self.display()  # the final count, unless the last line already showed it
        self.leave = False  # tqdm's own closing would add a blank line
        super().close()


def progress(iterable=None, *, enabled=True, file=None, **kwargs):
    """A tqdm bar (terminal), a LineProgress (file) or a disabled tqdm (enabled False or
    TQDM_DISABLE set); kwargs go to tqdm (total, initial, desc, unit, ...)."""
    file = file or sys.stderr
    if not enabled or disabled_by_env():
        return tqdm(iterable, disable=True, file=file, **kwargs)
    if is_terminal(file):
        return tqdm(iterable, file=file, dynamic_ncols=True, **kwargs)
    return LineProgress(iterable, file=file, mininterval=LINE_INTERVAL, **kwargs)
