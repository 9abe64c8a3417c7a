"""Rendering a customer's conversations with the model's chat template, in a process of its own.

A chat template is a program the customer sends (inside the model archive): Jinja's sandbox keeps
it from the files and the network but bounds no CPU, and a thread cannot be stopped. So the
worker never renders one itself: `render_chats` saves the tokenizer, starts ``python -m
dvm_llm_finetune.render <folder>`` and kills it (its whole process group) when the time allowed
runs out or the job is cancelled; the child writes every render `data._chat_tokens` needs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from dvm_core import JobInputError
from dvm_core.childproc import run_process_group
from dvm_core.launch import environment

RENDER_SECONDS = 120.0   # for a dataset's conversations, at most (less when the job has less left)


class _OutOfTime(Exception):
    pass


def render_chats(tokenizer, conversations: list[list[dict]], *, seconds: float = RENDER_SECONDS,
                 check_cancelled: Callable[[], None] = lambda: None) -> list[dict]:
    """For each conversation, what `conversation_renders` returns, rendered in a child process
    stopped after `seconds`; JobInputError when the template is too slow or fails."""
    with tempfile.TemporaryDirectory(prefix="dvm-chat-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        (folder / "conversations.json").write_text(json.dumps(conversations), encoding="utf-8")
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
                                f"{len(conversations)} conversations (stopped): send a model whose template "
                                "renders in reasonable time") from None
        out = folder / "renders.json"
        if code != 0 or not out.is_file():
            tail = (folder / "render.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise JobInputError(f"the model's chat template could not render the conversations: {tail[0][:300]}")
        renders = json.loads(out.read_text(encoding="utf-8"))
    for number, item in enumerate(renders, 1):
        if "error" in item:
            raise JobInputError(f"the model's chat template cannot render conversation {number}: {item['error']}")
    return renders


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
    conversations = json.loads((folder / "conversations.json").read_text(encoding="utf-8"))
    renders = []
    for messages in conversations:
        try:
            renders.append(conversation_renders(tokenizer, messages))
        except Exception as exc:  # noqa: BLE001 - a template's own error, reported per conversation
            renders.append({"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    tmp = folder / "renders.tmp"
    tmp.write_text(json.dumps(renders), encoding="utf-8")
    tmp.replace(folder / "renders.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
