"""Summaries of py-spy ``--format raw`` (collapsed stacks) profiles: the top functions.

``python -m bench profile FILE`` prints them. Self time is where the sample
was taken (the innermost frame); inclusive time counts a function once per
sample in which it is anywhere on the stack. Functions are keyed by name and
file (line numbers dropped). With ``--subprocesses`` each process's samples
are also summarized separately (the broker vs its workers).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m.group('name')} ({file})"


def top_functions(path: Path, n: int = 15) -> dict[str, Any]:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    by_proc: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    proc_total: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        proc = "process"
        while frames and frames[0].startswith("process "):  # parent;child;... with --subprocesses
            proc, _, cmd = frames[0].partition(":")
            proc += " worker" if "zrpc-worker" in cmd or "worker_cmd" in cmd else (" broker" if "zrpc-broker" in cmd else "")
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        keys = [_key(f) for f in frames]
        self_t[keys[-1]] += count
        by_proc[proc][keys[-1]] += count
        proc_total[proc] += count
        for k in set(keys):
            incl[k] += count

    def pct(counter: collections.Counter[str], of: int, k: int) -> list[list[Any]]:
        return [[name, round(100 * c / of, 1)] for name, c in counter.most_common(k)] if of else []

    return {
        "samples": total,
        "self_top": pct(self_t, total, n),
        "inclusive_top": pct(incl, total, n),
        "processes": {p: {"samples": c, "share_pct": round(100 * c / total, 1) if total else 0,
                          "self_top": pct(by_proc[p], c, 10)} for p, c in proc_total.most_common()},
    }


def print_summary(path: Path) -> None:
    s = top_functions(path)
    print(f"{path}: {s['samples']} samples")
    print("  self:")
    for name, p in s["self_top"]:
        print(f"    {p:5.1f}%  {name}")
    print("  inclusive:")
    for name, p in s["inclusive_top"]:
        print(f"    {p:5.1f}%  {name}")
    if len(s["processes"]) > 1:
        for proc, info in s["processes"].items():
            print(f"  {proc}: {info['share_pct']}% of samples")
            for name, p in info["self_top"][:6]:
                print(f"    {p:5.1f}%  {name}")
