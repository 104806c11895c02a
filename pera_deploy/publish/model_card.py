"""The one model-card writer: the README.md of every folder pera-deploy publishes.

Hugging Face reads a card's YAML front matter (base_model, library_name, tags). Values
come from input files (an adapter's `base_model_name_or_path`), so each is written as a
JSON string, which YAML reads as a quoted scalar: a newline or a `---` in a value cannot
end the front matter or add keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


def _scalar(value: str) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) as one space: safe in a heading."""
    return " ".join(str(text).split())


@dataclass
class ModelCard:
    title: str
    body: str  # markdown, after the title
    base_model: str | None = None
    library_name: str | None = None
    tags: list[str] = field(default_factory=list)

    def render(self) -> str:
        front = ["---"]
        if self.library_name:
            front.append(f"library_name: {_scalar(self.library_name)}")
        if self.base_model:
            front.append(f"base_model: {_scalar(self.base_model)}")
        tags = ["pera", "pera-deploy", *self.tags]
        front += ["tags:", *(f"- {_scalar(tag)}" for tag in dict.fromkeys(tags)), "---", ""]
        return "\n".join(front) + f"# {one_line(self.title)}\n\n{self.body.rstrip()}\n"
