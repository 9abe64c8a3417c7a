"""Text statistics as a NIP-90 job: the smallest useful dvm-worker plugin.

Input: one or more `i` tags of type `text`. Params: `top` (how many frequent words, default 5)
and `work_seconds` (pretend to work that long, reporting progress: handy for trying out
progress feedback, cancellation and restarts). Result: JSON with counts and the top words.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

from dvm_core import JobInputError, JobKind, JobResult, hookimpl

KIND = 5790
MAX_WORK_SECONDS = 600


@dataclass(frozen=True)
class TextStatsJob:
    text: str
    top: int
    work_seconds: float


def parse(request) -> TextStatsJob:
    texts = [i.data for i in request.inputs if i.type == "text"]
    if not texts:
        raise JobInputError("send the text to analyse as an input of type 'text': [\"i\", \"…\", \"text\"]")
    if len(texts) != len(request.inputs):
        raise JobInputError("this job takes only inputs of type 'text'")
    try:
        top = int(request.param("top", "5"))
        work = float(request.param("work_seconds", "0"))
    except ValueError:
        raise JobInputError("params top and work_seconds must be numbers") from None
    if not 1 <= top <= 100:
        raise JobInputError("param top must be between 1 and 100")
    if not 0 <= work <= MAX_WORK_SECONDS:
        raise JobInputError(f"param work_seconds must be between 0 and {MAX_WORK_SECONDS}")
    return TextStatsJob(text="\n".join(texts), top=top, work_seconds=work)


def run(ctx, job: TextStatsJob) -> JobResult:
    steps = 20
    for step in range(steps if job.work_seconds else 0):
        ctx.check_cancelled()
        time.sleep(job.work_seconds / steps)
        ctx.progress(100 * (step + 1) / steps, f"step {step + 1}/{steps}")
    words = re.findall(r"\w+", job.text.lower())
    stats = {
        "characters": len(job.text),
        "words": len(words),
        "lines": job.text.count("\n") + 1,
        "unique_words": len(set(words)),
        "top_words": Counter(words).most_common(job.top),
    }
    return JobResult(stats, metrics={"words": len(words)})


@hookimpl
def register_job_kinds(register):
    register(JobKind(
        kind=KIND, name="text-stats",
        description="Counts characters, words, lines and the most frequent words of a text.",
        run=run, parse=parse,
        params={"top": "how many frequent words to list (1-100, default 5)",
                "work_seconds": f"simulate work for this long, with progress (0-{MAX_WORK_SECONDS})"},
    ))
