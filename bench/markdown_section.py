"""Replace one ``## `` section of a markdown file (BENCHMARKS.md) in place, or append it; other sections stay."""

from __future__ import annotations

from pathlib import Path

DEFAULT_HEADER = "# Benchmarks\n\nMeasured numbers; each section names the script that writes it.\n"


def merge_section(path: Path, heading: str, lines: list[str]) -> None:
    """Write ``lines`` (starting with ``heading``, a ``## `` line) over the section of that heading in ``path``.

    The old section runs from its heading to the next ``## `` heading or the end of the file. The file is replaced
    atomically (written beside it, then renamed), so a reader never sees half a file.
    """
    if not lines or lines[0] != heading:
        raise ValueError(f"the section must start with its heading {heading!r}")
    text = path.read_text() if path.exists() else DEFAULT_HEADER
    body = "\n".join(lines).rstrip("\n") + "\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + body + ("" if nxt < 0 else text[nxt:])
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)
