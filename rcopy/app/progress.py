"""Progress of a running sync, for a terminal (tqdm bars) or a log/pipe (plain lines).

``update(volume, done, total)``: ``done`` is what the backup acknowledged (NBD write and write-zeroes
replies), never what was read; ``total`` the bytes the volume's send writes, an estimate until its change
scan ends (rcopy.engine.driver)."""
from __future__ import annotations

import sys
import time


class LineProgress:
    """Plain lines for logs and pipes: one at start, every ``every`` seconds, one at the end of each volume."""

    def __init__(self, out=None, every: float = 5.0):
        self.out, self.every, self.last, self.total = out or sys.stdout, every, {}, {}

    def start(self, volume, total):
        self.total[volume], self.last[volume] = total, time.monotonic()
        print(f"{volume}: syncing ({total} bytes of volume)", file=self.out, flush=True)

    def update(self, volume, done, total):
        now = time.monotonic()
        if now - self.last.get(volume, 0) >= self.every:
            self.last[volume] = now
            print(f"{volume}: {100 * done // (total or 1)}% ({done} of {total} bytes acknowledged by the backup)",
                  file=self.out, flush=True)

    def finish(self, volume, sent, reason):
        how = f"full sync: {reason}" if reason else "delta"
        print(f"{volume}: done, {sent} bytes sent ({how})", file=self.out, flush=True)


class BarProgress:
    """A tqdm bar per volume on a terminal."""

    def __init__(self):
        self.bars = {}

    def start(self, volume, total):
        from tqdm import tqdm
        self.bars[volume] = tqdm(total=total, desc=volume, unit="B", unit_scale=True, leave=True,
                                 position=len(self.bars))

    def update(self, volume, done, total):
        bar = self.bars.get(volume)
        if bar is not None:
            if total != bar.total:
                bar.total = total
            bar.update(max(0, done - bar.n))

    def finish(self, volume, sent, reason):
        bar = self.bars.pop(volume, None)
        if bar is not None:
            bar.update(max(0, bar.total - bar.n))
            bar.close()


def for_terminal():
    return BarProgress() if sys.stdout.isatty() else LineProgress()
