"""Replace secret values with ``***`` in text and JSON, including across chunk boundaries."""

from __future__ import annotations

import json
from typing import Any

MASK = "***"


class Masker:
    def __init__(self, values: list[str] | tuple[str, ...]) -> None:
        # Longest first, so a secret containing another is masked whole.
        self.values = sorted({v for v in values if v}, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.values)

    def text(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, MASK)
        return text

    def json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, int | float) and self.values:  # a number (or bool) may be one too
            text = json.dumps(value)
            return MASK if self.text(text) != text else value
        if isinstance(value, dict):
            return {self.text(str(k)): self.json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return value

    def held_back(self, text: str) -> int:
        """How many trailing characters could be the start of a secret split across chunks."""
        longest = 0
        for value in self.values:
            for size in range(min(len(value) - 1, len(text)), longest, -1):
                if value.startswith(text[-size:]):
                    longest = size
                    break
        return longest


class StreamMasker:
    """Masks one output stream whose secrets may arrive split over several reads."""

    def __init__(self, masker: Masker) -> None:
        self._masker = masker
        self._pending = ""

    def feed(self, text: str) -> str:
        if not self._masker:
            return text
        combined = self._masker.text(self._pending + text)
        keep = self._masker.held_back(combined)
        self._pending = combined[len(combined) - keep :] if keep else ""
        return combined[: len(combined) - keep]

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return self._masker.text(rest)
