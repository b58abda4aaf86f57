"""Evaluation tasks defined as data: a JSONL file of items and a small TOML spec.

A spec names its kind, where its items are, how an item becomes a prompt (Python format strings
over the item's fields: `{question}`, `{choices[0]}`), few-shot examples and how answers are
judged. The shipped specs live in `frontierlm/eval/tasks/*.toml`; a recipe's `eval.tasks` takes
their names or paths to your own `.toml` files. Paths inside a spec are relative to the current
directory, like the paths in recipes.

kinds
  bpb              bits per byte of `text` over held-out documents
  multiple_choice  the choice whose continuation the model finds likeliest (acc, acc_norm)
  exact_match      greedy answers against the reference (strict `#### N` and last number)
  pass_at_k        n sampled answers per problem, unbiased pass@k (Chen et al. 2021)
"""

from __future__ import annotations

import gzip
import json
import lzma
import random
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from frontierlm.config import Strict


class EvalTaskError(ValueError):
    """A task spec or item that cannot be evaluated; the message names the file and field."""


class TaskSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["bpb", "multiple_choice", "exact_match", "pass_at_k"]
    data: str = Field(description="JSONL of items (.gz/.xz allowed), relative to the cwd")
    description: str = Field("", description="text before the few-shot examples, formatted")
    prompt: str = Field("{question}", description="format string: an item -> its prompt")
    target: str = Field("{answer}", description="format string: a few-shot example's answer")
    target_delimiter: str = Field(" ", description="between the prompt and the answer/choice")
    fewshot_delimiter: str = Field("\n\n", description="between few-shot examples")
    # multiple choice: choices from a list field of the item, or the same literal list for every
    # item (MMLU's letters), each optionally formatted; gold is an index, a letter or the text.
    choices_field: str | None = None
    choices: list[str] | None = None
    gold: str = Field("answer", description="field holding the correct choice or answer")
    # few-shot examples from another JSONL (or the same one, never the item itself)
    fewshot: int = Field(0, ge=0)
    fewshot_data: str | None = None
    fewshot_match: str | None = Field(
        None, description="take examples whose field equals the item's (MMLU: subject)"
    )
    fewshot_seed: int = 1234
    # chat: the prompt is one user turn rendered with the chat template, the answer the reply
    format: Literal["text", "chat"] = "text"
    # generation (exact_match, pass_at_k)
    until: list[str] = Field(default_factory=lambda: ["Question:", "\n\n\n"])
    max_new_tokens: int = Field(256, ge=1)
    samples: int = Field(1, ge=1, description="pass_at_k: n samples per problem")
    k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1])
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    verifier: Literal["gsm8k", "python_tests"] = "gsm8k"
    timeout_s: float = Field(5.0, gt=0, description="python_tests: seconds per program")
    # bpb
    text_field: str = "text"
    limit: int | None = Field(None, ge=1, description="evaluate at most this many items")
    limit_order: Literal["first", "seeded"] = Field(
        "first", description="a limit takes the first items, or a seeded sample (fewshot_seed)"
    )

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.kind == "multiple_choice" and (self.choices_field is None) == (
            self.choices is None
        ):
            raise ValueError("multiple_choice needs exactly one of choices_field and choices")
        if self.kind == "pass_at_k":
            if max(self.k) > self.samples:
                raise ValueError(f"k={self.k} exceeds samples={self.samples} (pass@k needs k <= n)")
            if self.samples > 1 and self.temperature == 0:
                raise ValueError("pass_at_k with samples > 1 needs temperature > 0")
        return self

    # ------------------------------------------------------------------ items and prompts

    def items(self, limit: int | None = None) -> list[dict[str, Any]]:
        limit = min(x for x in (limit, self.limit, 1 << 62) if x is not None)
        out = []
        for _, item in read_jsonl(Path(self.data)):
            out.append(item)
            if self.limit_order == "first" and len(out) >= limit:
                break
        if self.limit_order == "seeded" and len(out) > limit:
            picked = sorted(random.Random(self.fewshot_seed).sample(range(len(out)), limit))
            out = [out[i] for i in picked]
        if not out:
            raise EvalTaskError(f"task {self.name}: {self.data} holds no items")
        return out

    def fill(self, template: str, item: dict[str, Any], what: str) -> str:
        try:
            return template.format_map(item)
        except (KeyError, IndexError, AttributeError, ValueError) as err:
            raise EvalTaskError(
                f"task {self.name}: {what} template {template!r} does not fit item "
                f"{_short(item)}: {err!r}; fix the spec or the item's fields"
            ) from None

    def choice_texts(self, item: dict[str, Any]) -> list[str]:
        if self.choices is not None:
            return [self.fill(c, item, "choices") for c in self.choices]
        value = item.get(self.choices_field)  # type: ignore[arg-type]
        if not isinstance(value, list) or not value:
            raise EvalTaskError(
                f"task {self.name}: item {_short(item)} has no list field {self.choices_field!r}"
            )
        return [str(v) for v in value]

    def gold_index(self, item: dict[str, Any], choices: list[str]) -> int:
        value = item.get(self.gold)
        if isinstance(value, int) and 0 <= value < len(choices):
            return value
        if isinstance(value, str):
            if value in choices:
                return choices.index(value)
            letters = "ABCDEFGHIJ"[: len(choices)]
            if len(value) == 1 and value.upper() in letters:
                return letters.index(value.upper())
            if value.isdigit() and int(value) < len(choices):
                return int(value)
        raise EvalTaskError(
            f"task {self.name}: item {_short(item)} field {self.gold!r}={value!r} names none of "
            f"its {len(choices)} choices (give an index, a letter or the choice text)"
        )

    def answer_text(self, item: dict[str, Any]) -> str:
        """A few-shot example's answer: the gold choice for multiple choice, else `target`."""
        if self.kind == "multiple_choice":
            choices = self.choice_texts(item)
            return choices[self.gold_index(item, choices)]
        return self.fill(self.target, item, "target")

    def fewshot_pool(self) -> list[dict[str, Any]]:
        if not self.fewshot:
            return []
        path = Path(self.fewshot_data or self.data)
        return [item for _, item in read_jsonl(path)]

    def context(self, item: dict[str, Any], pool: list[dict[str, Any]], index: int) -> str:
        """The text before the answer: description, few-shot examples, then the item's prompt.
        Examples are drawn with a seed per item, never the item itself."""
        shots: list[dict[str, Any]] = []
        if self.fewshot:
            candidates = [
                c
                for c in pool
                if c is not item
                and c != item
                and (
                    self.fewshot_match is None
                    or c.get(self.fewshot_match) == item.get(self.fewshot_match)
                )
            ]
            rng = random.Random(self.fewshot_seed * 1_000_003 + index)
            shots = rng.sample(candidates, min(self.fewshot, len(candidates)))
        parts = [
            self.fill(self.prompt, s, "prompt") + self.target_delimiter + self.answer_text(s)
            for s in shots
        ]
        parts.append(self.fill(self.prompt, item, "prompt"))
        return self.fill(self.description, item, "description") + self.fewshot_delimiter.join(parts)


def _short(item: dict[str, Any]) -> str:
    text = json.dumps(item, ensure_ascii=False)
    return text if len(text) < 120 else text[:117] + "..."


def open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line; a bad line raises naming file and line."""
    if not path.is_file():
        raise EvalTaskError(f"eval data {path} does not exist (paths are relative to {Path.cwd()})")
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalTaskError(f"{path}:{line_no}: not JSON ({err})") from None
            if not isinstance(record, dict):
                raise EvalTaskError(f"{path}:{line_no}: not a JSON object")
            yield line_no, record


# ---------------------------------------------------------------------- finding specs


def shipped_tasks() -> dict[str, Path]:
    folder = resources.files("frontierlm.eval") / "tasks"
    return {
        p.name.removesuffix(".toml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".toml")
    }


def spec_path(name_or_path: str) -> Path:
    """A shipped task's name (`mmlu`) or a path to a spec file (`my_tasks/quiz.toml`)."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise EvalTaskError(f"eval task spec {path} does not exist")
        return path
    shipped = shipped_tasks()
    if name_or_path not in shipped:
        raise EvalTaskError(
            f"eval task {name_or_path!r} is not shipped (known: {', '.join(sorted(shipped))}); "
            "give a path ending in .toml for your own task"
        )
    return shipped[name_or_path]


def load_spec(name_or_path: str) -> TaskSpec:
    path = spec_path(name_or_path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise EvalTaskError(f"eval task spec {path} is not valid TOML: {err}") from None
    tree.setdefault("name", path.name.removesuffix(".toml"))
    try:
        return TaskSpec.model_validate(tree)
    except ValidationError as err:
        lines = [f"invalid eval task spec {path}:"]
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        raise EvalTaskError("\n".join(lines)) from None


def task_files(spec: TaskSpec) -> list[str]:
    """The data files a task reads: fingerprinted by the eval stage."""
    return [p for p in dict.fromkeys([spec.data, spec.fewshot_data]) if p]
