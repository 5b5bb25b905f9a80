"""One schema for verified coding problems, whatever dataset they come from.

A test is either `stdin` (feed `input` on stdin, compare stdout with `output`) or
`functional` (call `fn_name(*input)` and compare the return value with `output`;
inputs/outputs are JSON values). Loaders in `training.loaders` map each public
format onto this schema; everything downstream (curation, reward, evaluation)
reads only `Problem`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TestCase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["stdin", "functional"]
    input: Any = Field(description="stdin text, or the JSON list of positional arguments of a functional test")
    output: Any = Field(description="expected stdout text, or the expected JSON return value")
    fn_name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "TestCase":
        if self.kind == "functional":
            if not self.fn_name:
                raise ValueError("a functional test needs fn_name")
            if not isinstance(self.input, list):
                raise ValueError("a functional test's input is the list of positional arguments")
        elif not isinstance(self.input, str) or not isinstance(self.output, str):
            raise ValueError("a stdin test's input and output are text")
        return self

    @property
    def size(self) -> int:
        """Length of the input as text: how the reward ranks tests by difficulty."""
        return len(self.input) if isinstance(self.input, str) else len(json.dumps(self.input))


class Problem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    source: str
    statement: str = Field(min_length=1)
    starter_code: str = ""
    tests: tuple[TestCase, ...]
    reference_solutions: tuple[str, ...] = ()
    metadata: dict[str, Any] = Field(default_factory=dict)


def write_jsonl(problems: list[Problem], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(p.model_dump_json() + "\n")


def read_jsonl(path: Path) -> list[Problem]:
    return [Problem.model_validate_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


def chat_prompt(tokenizer, statement: str) -> str:
    """The one rendering of a problem as a prompt: a single user turn, generation prompt appended."""
    return tokenizer.apply_chat_template([{"role": "user", "content": statement}], tokenize=False,
                                         add_generation_prompt=True)
