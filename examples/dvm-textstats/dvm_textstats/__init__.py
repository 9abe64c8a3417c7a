"""Text statistics as a NIP-90 job: the smallest useful dvm-worker plugin.

Input: `i` tags of type `text`, or of type `url` pointing at a UTF-8 text file (a Blossom URL
or one ending in `#sha256=<hex>`; the worker downloads and verifies it). Params: `top` (how many
frequent words, default 5), `work_seconds` (pretend to work that long, reporting progress: handy
for trying out progress feedback, cancellation and restarts) and `counts_file` (`yes` to get
every word's count as a CSV file, delivered through the provider's blob server). Result: JSON
with counts and the top words.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from dataclasses import dataclass

from dvm_core import Artifact, JobInputError, JobKind, JobResult, hookimpl

KIND = 5790
MAX_WORK_SECONDS = 600


MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class TextStatsJob:
    text: str
    urls: tuple[str, ...]
    top: int
    work_seconds: float
    counts_file: bool


def parse(request) -> TextStatsJob:
    texts = [i.data for i in request.inputs if i.type == "text"]
    urls = tuple(i.data for i in request.inputs if i.type == "url")
    if not texts and not urls:
        raise JobInputError("send the text to analyse as an input of type 'text' "
                            "([\"i\", \"…\", \"text\"]) or 'url' (a text file)")
    if len(texts) + len(urls) != len(request.inputs):
        raise JobInputError("this job takes only inputs of type 'text' or 'url'")
    try:
        top = int(request.param("top", "5"))
        work = float(request.param("work_seconds", "0"))
    except ValueError:
        raise JobInputError("params top and work_seconds must be numbers") from None
    if not 1 <= top <= 100:
        raise JobInputError("param top must be between 1 and 100")
    if not 0 <= work <= MAX_WORK_SECONDS:
        raise JobInputError(f"param work_seconds must be between 0 and {MAX_WORK_SECONDS}")
    counts_file = request.param("counts_file", "no")
    if counts_file not in ("yes", "no"):
        raise JobInputError("param counts_file must be yes or no")
    return TextStatsJob(text="\n".join(texts), urls=urls, top=top, work_seconds=work,
                        counts_file=counts_file == "yes")


def run(ctx, job: TextStatsJob) -> JobResult:
    texts = [job.text] if job.text else []
    for url in job.urls:
        path = ctx.fetch(url)
        if path.stat().st_size > MAX_FILE_BYTES:
            raise JobInputError(f"a text file may be at most {MAX_FILE_BYTES} bytes")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise JobInputError("the file is not UTF-8 text") from None
    text = "\n".join(texts)
    steps = 20
    for step in range(steps if job.work_seconds else 0):
        ctx.check_cancelled()
        time.sleep(job.work_seconds / steps)
        ctx.progress(100 * (step + 1) / steps, f"step {step + 1}/{steps}")
    words = re.findall(r"\w+", text.lower())
    counts = Counter(words)
    stats = {
        "characters": len(text),
        "words": len(words),
        "lines": text.count("\n") + 1,
        "unique_words": len(counts),
        "top_words": counts.most_common(job.top),
    }
    artifacts = []
    if job.counts_file:
        path = ctx.workdir / "word_counts.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["word", "count"])
            writer.writerows(counts.most_common())
        artifacts.append(Artifact(path, "text/csv"))
    return JobResult(stats, metrics={"words": len(words)}, artifacts=artifacts)


@hookimpl
def register_job_kinds(register):
    register(JobKind(
        kind=KIND, name="text-stats",
        description="Counts characters, words, lines and the most frequent words of a text.",
        run=run, parse=parse,
        params={"top": "how many frequent words to list (1-100, default 5)",
                "work_seconds": f"simulate work for this long, with progress (0-{MAX_WORK_SECONDS})",
                "counts_file": "yes: also return every word's count as a CSV file (default no)"},
    ))
