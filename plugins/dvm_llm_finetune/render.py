"""Rendering a customer's conversations with the model's chat template, in a process of its own.

A chat template is a program the customer sends (inside the model archive): Jinja's sandbox keeps
it from the files and the network but bounds no CPU, and a thread cannot be stopped. So the
worker never renders one itself: `render_chats` saves the tokenizer, starts ``python -m
dvm_llm_finetune.render <folder>`` and kills it (its whole process group) when the time allowed
runs out or the job is cancelled; the child writes every render `data._chat_tokens` needs. The
conversations go to it, and the renders come back, one a line through files, read one at a time
(`Renders`): a dataset's conversations are never all in memory.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from dvm_core import JobInputError
from dvm_core.childproc import run_process_group
from dvm_core.launch import environment

RENDER_SECONDS = 120.0   # for a dataset's conversations, at most (less when the job has less left)


class _OutOfTime(Exception):
    pass


def render_chats(tokenizer, conversations: Iterable[list[dict]], *, seconds: float = RENDER_SECONDS,
                 check_cancelled: Callable[[], None] = lambda: None, folder: Path | None = None) -> "Renders":
    """For each conversation, what `conversation_renders` returns, rendered in a child process
    stopped after `seconds`; JobInputError when the template is too slow or fails. The
    conversations go to the child and the renders come back one a line through files (in a
    temporary folder in `folder`, or the system's): neither is ever held whole in memory, and
    the `Renders` returned read them back one by one (close it, or let it go, to remove them)."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="dvm-chat-", dir=folder)
    try:
        return _render(Path(tmp.name), tmp, tokenizer, conversations, seconds, check_cancelled)
    except BaseException:
        tmp.cleanup()
        raise


def _render(folder: Path, tmp, tokenizer, conversations, seconds: float, check_cancelled) -> "Renders":
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    count = 0
    with open(folder / "conversations.jsonl", "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps(messages) + "\n")
            count += 1
    deadline = time.monotonic() + seconds

    def check() -> None:
        check_cancelled()
        if time.monotonic() > deadline:
            raise _OutOfTime()

    try:
        code = run_process_group([sys.executable, "-m", "dvm_llm_finetune.render", str(folder)], cwd=folder,
                                 env=environment("dvm_llm_finetune"), stderr_path=folder / "render.log",
                                 check_cancelled=check)
    except _OutOfTime:
        raise JobInputError(f"the model's chat template took longer than {seconds:g} s to render the "
                            f"{count} conversations (stopped): send a model whose template "
                            "renders in reasonable time") from None
    out = folder / "renders.jsonl"
    if code != 0 or not out.is_file():
        tail = (folder / "render.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise JobInputError(f"the model's chat template could not render the conversations: {tail[0][:300]}")
    renders = Renders(out, count, tmp)
    number = 0
    for number, item in enumerate(renders, 1):
        if "error" in item:
            raise JobInputError(f"the model's chat template cannot render conversation {number}: {item['error']}")
    if number != count:
        raise JobInputError(f"the model's chat template could not render the conversations: {number} renders "
                            f"for {count} conversations")
    return renders


class Renders:
    """The renders `render_chats` got, read from their file one by one when iterated."""

    def __init__(self, path: Path, count: int, tmp=None):
        self.path, self.count, self._tmp = path, count, tmp

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def conversation_renders(tokenizer, messages: list[dict]) -> dict:
    """The conversation before each assistant turn with the generation prompt and up to its end
    (`steps`), and the whole (`whole`): the prefixes `data._chat_tokens` compares."""
    def render(part: list[dict], generation_prompt: bool) -> str:
        if not part:
            return ""
        return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)

    steps = [[render(messages[:i], True), render(messages[:i + 1], False)]
             for i, message in enumerate(messages) if message["role"] == "assistant"]
    return {"steps": steps, "whole": render(messages, False)}


def main(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    folder = Path(argv[0])
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True,
                                              trust_remote_code=False)
    tmp = folder / "renders.tmp"
    with open(folder / "conversations.jsonl", encoding="utf-8") as conversations, \
            open(tmp, "w", encoding="utf-8") as out:
        for line in conversations:
            try:
                item = conversation_renders(tokenizer, json.loads(line))
            except Exception as exc:  # noqa: BLE001 - a template's own error, reported per conversation
                item = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            out.write(json.dumps(item) + "\n")
    tmp.replace(folder / "renders.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
