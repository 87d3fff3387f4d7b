"""`flashback chat` driven through a pseudo-terminal as a person types: streamed answers with their retrievals,
/mode, /reset, Ctrl-C at the prompt and while answering, an oversized turn refused without losing the
conversation, /exit; and every command's --help readable at 80 columns."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from tiny import save_tiny_chat_model
from typer.testing import CliRunner

from flashback_integrations.cli import app

FLASHBACK = str(Path(sys.executable).parent / "flashback")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("chat") / "model")


def spawn(model_dir: str, *extra: str) -> pexpect.spawn:
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "120"}  # plain text: no styles to match
    args = ["chat", "--model", model_dir, "--mode", "append", "--stride", "4", *extra]
    return pexpect.spawn(FLASHBACK, args, env=env, encoding="utf-8", timeout=120, dimensions=(40, 120))


def test_a_conversation_in_a_terminal(model_dir) -> None:
    child = spawn(model_dir, "--max-new-tokens", "6")
    child.expect("mode append, torch backend")
    child.expect("you> ")
    child.sendline("What is a kettle?")
    child.expect("bot> ")
    child.expect(r"retrieval @ token 0 query='What is a kettle\?'")  # the question, not the template's text
    child.expect(r"retrieval @ token 4 query='What is a kettle\?")  # the question and the answer so far
    child.expect("you> ")
    child.sendline("/mode none")
    child.expect("mode none")
    child.expect("you> ")
    child.sendline("And a teapot?")
    child.expect("bot> ")
    child.expect("you> ")
    assert "retrieval @" not in child.before  # mode none: no retrieval
    child.sendline("/mode sideways")
    child.expect("/mode takes one of append, prepend, isolated, none")
    child.expect("you> ")
    child.sendcontrol("c")  # at the prompt: a hint, not an exit
    child.expect(r"Ctrl-D or /exit to leave")
    child.expect("you> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect("you> ")
    child.sendline("/nope")
    child.expect("unknown command /nope")
    child.expect("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_an_oversized_turn_keeps_the_conversation(model_dir) -> None:
    # a retrieval per token: slow enough to interrupt
    child = spawn(model_dir, "--max-new-tokens", "400", "--stride", "1", "--max-doc-tokens", "16")
    child.expect("you> ")
    for streaming in (False, True):  # before the first token, then while it streams
        child.sendline("Tell me a long story.")
        child.expect(r"bot> \S" if streaming else "bot> ")
        child.sendcontrol("c")
        child.expect(r"\(stopped\)")
        child.expect("you> ")
    child.sendline("word " * 600)  # over the tiny model's 512-token context
    child.expect("error:")
    child.expect(r"/reset\s+starts\s+over")
    child.expect("you> ")
    child.sendline("Short one?")
    child.expect("bot> ")
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


COMMANDS = [["generate"], ["chat"], ["serve"], ["train"], ["index", "add"], ["eval", "ppl"], ["bench", "speed"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_is_readable_at_80_columns(command) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    starts = [m.end() for line in result.output.splitlines() if (m := re.match(r"│ (--\S+.*?<[^>]+> +)", line))]
    assert starts, result.output
    assert max(starts) <= 50, f"help text starts at column {max(starts)}: under 30 columns left for it"
