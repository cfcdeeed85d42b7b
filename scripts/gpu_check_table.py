#!/usr/bin/env python3
"""The Markdown report of scripts/gpu_check.sh, from the TSV it appends one row to per case:

    case <TAB> result <TAB> seconds <TAB> peak GPU MiB <TAB> note

result is pass, fail, refused, skipped, unavailable (a preparation step the cases can do without) or dry-run.
Prints the report and, with --output, writes it there too. Standard library only (it runs before, or without,
the project's environment). Exit status 0 unless the TSV cannot be read: scripts/gpu_check.sh decides its own.

    python3 scripts/gpu_check_table.py /tmp/gpu_check.tsv --output /tmp/gpu_check.md --logs /tmp/gpu_check_logs
"""
import argparse
import os
import sys

COLUMNS = ("case", "result", "seconds", "peak GPU MiB")
ORDER = ("pass", "fail", "refused", "skipped", "unavailable", "dry-run")


def read_rows(path):
    """[(case, result, seconds, peak, note)]: short rows are padded, blank and # lines skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = (line.split("\t") + [""] * 5)[:5]
            case, result, seconds, peak, note = (x.strip() for x in fields)
            rows.append((case, result or "?", seconds or "-", peak or "-", note))
    return rows


def cell(text):
    """Text safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def code(text):
    """Inline code that survives backticks in the text."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def render(rows, title=None, meta=(), notes=(), logs=None):
    out = []
    if title:
        out += [f"# {title}", ""]
    out += [f"- {m}" for m in meta]
    if meta:
        out.append("")
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|---|---|---:|---:|")
    for case, result, seconds, peak, note in rows:
        shown = result
        if result == "refused" and note:
            shown = f"refused: {code(note)}"
        out.append(f"| {cell(case)} | {cell(shown)} | {cell(seconds)} | {cell(peak)} |")
    counts = {}
    for _, result, *_ in rows:
        counts[result] = counts.get(result, 0) + 1
    known = [r for r in ORDER if r in counts] + sorted(r for r in counts if r not in ORDER)
    out += ["", ", ".join(f"{counts[r]} {r}" for r in known) if rows else "no cases ran"]
    details = [(case, result, note) for case, result, _, _, note in rows
               if note and result != "refused" and result not in ("pass", "dry-run")]
    if details or notes:
        out += ["", "Notes:", ""]
        for case, result, note in details:
            # cases log to LOGS/<case>.log; the preparation steps name their own log in the note
            where = (f" (log: {os.path.join(logs, case + '.log')})"
                     if logs and result == "fail" and not case.startswith("prep: ") else "")
            out.append(f"- {cell(case)} ({result}): {code(note)}{where}")
        out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tsv", help="Rows written by scripts/gpu_check.sh.")
    p.add_argument("--output", help="Also write the report to this file.")
    p.add_argument("--title", help="Heading of the report.")
    p.add_argument("--meta", action="append", default=[], help="A bullet line above the table (repeatable).")
    p.add_argument("--note", action="append", default=[], help="A line in the notes below the table (repeatable).")
    p.add_argument("--logs", help="Directory of the per-case logs, named in the notes of failed cases.")
    args = p.parse_args(argv)
    try:
        rows = read_rows(args.tsv)
    except OSError as e:
        print(f"error: cannot read {args.tsv}: {e.strerror}", file=sys.stderr)
        return 2
    text = render(rows, args.title, args.meta, args.note, args.logs)
    sys.stdout.write(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
