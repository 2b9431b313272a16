"""The report's file formats, each rendering the same tables and document (xentlab/lab/report/tables.py,
document.py): report.md, report.html (one self-contained page, plots inline), report.tex (booktabs
tables for `\\input`) and the CSVs.

Text from a sweep folder (override values, labels, paths, error messages) is untrusted, so each format
escapes it: Markdown so that a newline or `|` cannot break a table and no link, image or HTML can be
injected; HTML with `html.escape` under a Content-Security-Policy that allows no script and no remote
resource; LaTeX so that no command can run; CSV so that a spreadsheet never reads a cell as a formula.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re

from xentlab.lab.report.document import Bullets, Figure, Heading, Paragraph
from xentlab.lab.report.tables import BETTER, WORSE, Marked, Table

SIGNS = {BETTER: "★", WORSE: "▼"}

# ---- plain values -------------------------------------------------------------------------------------


def value_text(value: object) -> str:
    """A cell as display text: numbers to 4 significant digits, booleans and None as words."""
    if isinstance(value, Marked):
        return f"{SIGNS[value.mark]} {value.text}" if value.mark else value.text
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """Control characters (newlines, ANSI escapes) as spaces: untrusted text stays on its line."""
    return CONTROL.sub(" ", text)


# ---- CSV ----------------------------------------------------------------------------------------------

FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value: object) -> object:
    """A CSV cell: numbers as they are (full precision), booleans as true/false, None as empty, and text
    that a spreadsheet would read as a formula (a leading =, +, -, @, tab or line break that is not
    simply a number) prefixed with an apostrophe, OWASP's neutralisation."""
    if isinstance(value, Marked):
        value = value.text
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and value.startswith(FORMULA_START):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([csv_cell(c) for c in table.columns])
    writer.writerows([csv_cell(v) for v in row] for row in table.rows)
    return buffer.getvalue()


# ---- Markdown -----------------------------------------------------------------------------------------

MD_SPECIAL = re.compile(r"([\\`*|<>$~])")
MD_LINK_CLOSE = re.compile(r"\](?=[(\[:])")
# What starts a heading, list item or link definition at the start of a line.
MD_LEADING = re.compile(r"^(\s*)(#{1,6}(?=\s|$)|[-+=](?=\s|$)|\d{1,9}[.)](?=\s|$)|\[)")
MD_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_text(text: object) -> str:
    """Untrusted text as literal Markdown on one line: control characters become spaces; characters that
    start code, emphasis, HTML, math, links, tables, headings or lists are backslash-escaped (an
    underscore inside a word, as in `weighted_ce`, needs none and keeps the file readable)."""
    text = MD_SPECIAL.sub(r"\\\1", one_line(str(text)))
    text = MD_LINK_CLOSE.sub(r"\\]", text)
    text = MD_EDGE_UNDERSCORE.sub(r"\\_", text)
    return MD_LEADING.sub(lambda m: m[1] + "\\" + m[2], text)


def md_cell(value: object) -> str:
    if isinstance(value, Marked) and value.mark:
        return f"**{SIGNS[value.mark]} {md_text(value.text)}**"
    return md_text(value_text(value))


def md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(md_text(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in table.rows]


def to_markdown(blocks: list) -> str:
    lines = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + md_text(block.text), ""]
        elif isinstance(block, Paragraph):
            lines += [md_text(block.text), ""]
        elif isinstance(block, Bullets):
            lines += [f"- {md_text(item)}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += md_table(block) + [""]
        elif isinstance(block, Figure):
            lines += [f"![{md_text(block.caption)}]({block.name})", "", f"*{md_text(block.caption)}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---- HTML ---------------------------------------------------------------------------------------------

# No script, no remote anything: the page is one file that shows the same offline, and a value from a
# sweep folder cannot make it fetch or run something even if an escape were missed.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem;
       color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.5rem; word-break: break-all; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { border-bottom: 2px solid #444; }
tr.block td { border-top: 2px solid #999; }
td.value { white-space: nowrap; }
td.better { color: #0a6b20; font-weight: 600; } td.worse { color: #a4161a; font-weight: 600; }
figure { margin: 1rem 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9rem; color: #444; }
"""


def html_text(text: object) -> str:
    """Untrusted text as HTML text: control characters blanked, then `html.escape` (quotes included)."""
    return html.escape(one_line(str(text)))


def html_cell(value: object) -> str:
    """A cell; results and numbers are kept on one line (class "value"), marked ones coloured."""
    classes = []
    if isinstance(value, Marked) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        classes.append("value")
    if isinstance(value, Marked) and value.mark:
        classes.append(value.mark)
    opening = f'<td class="{" ".join(classes)}">' if classes else "<td>"
    return f"{opening}{html_text(value_text(value))}</td>"


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html_text(c)}</th>" for c in table.columns)
    rows = []
    for i, row in enumerate(table.rows):
        opening = '<tr class="block">' if i in table.blocks and i > 0 else "<tr>"
        rows.append(opening + "".join(html_cell(v) for v in row) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>' + "\n".join(rows)
            + "</tbody></table></div>")


def to_html(blocks: list, title: str) -> str:
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html_text(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html_text(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{html_text(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            body.append(html_table(block))
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html_text(block.caption)}">'
                        f"<figcaption>{html_text(block.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html_text(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---- LaTeX --------------------------------------------------------------------------------------------

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "↑": r"$\uparrow$", "↓": r"$\downarrow$", "★": r"$\star$", "▼": r"$\dagger$",
                 "—": "---", "–": "--", "−": "$-$", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
                 "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
LATEX_PATTERN = re.compile("|".join(re.escape(c) for c in LATEX_SPECIAL))
LATEX_MARKS = {BETTER: r"$^{\star}$", WORSE: r"$^{\dagger}$"}


def latex_text(text: object) -> str:
    """Untrusted text as literal LaTeX: every special character escaped, so no command can be formed."""
    return LATEX_PATTERN.sub(lambda m: LATEX_SPECIAL[m[0]], one_line(str(text)))


def latex_cell(value: object) -> str:
    if isinstance(value, Marked):
        return latex_text(value.text) + LATEX_MARKS.get(value.mark, "")
    return latex_text(value_text(value))


def latex_table(table: Table, label: str) -> list[str]:
    """A booktabs `table` float: \\toprule, a \\midrule between blocks (contexts), \\bottomrule."""
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in table.rows)
               for i in range(len(table.columns))]
    spec = "".join("r" if n else "l" for n in numeric)
    caption = latex_text(table.caption or table.title)
    lines = [r"\begin{table}[tbp]", r"\centering", r"\small", f"\\caption{{{caption}}}",
             f"\\label{{{label}}}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_text(c) for c in table.columns) + r" \\", r"\midrule"]
    for i, row in enumerate(table.rows):
        if i in table.blocks and i > 0:
            lines.append(r"\midrule")
        cells = [latex_cell(v) for v in row]
        if table.blocks and i not in table.blocks and table.columns[0] == "context":
            cells[0] = ""  # the context is named once, in its block's first row
        lines.append(" & ".join(cells) + r" \\")
    return lines + [r"\bottomrule", r"\end{tabular}", r"\end{table}"]


def to_latex(tables: list[Table], setup: list[tuple[str, str]], source: str) -> str:
    """report.tex: the set-up as comments, then one booktabs table per table shown in LaTeX (★ and ▼ become
    the plain-LaTeX marks $^\\star$ and $^\\dagger$). Needs `\\usepackage{booktabs}`."""
    lines = [f"% xentlab report of {one_line(source)}",
             r"% \input{report.tex} with \usepackage{booktabs} in the preamble.",
             *(f"% {item}: {one_line(text)}" for item, text in setup), ""]
    for n, table in enumerate(t for t in tables if "latex" in t.formats):
        name = re.sub(r"[^a-z0-9]+", "-", (table.name or table.title).lower()).strip("-")
        lines += latex_table(table, f"tab:xentlab-{name}{'-' + str(n) if n else ''}") + [""]
    return "\n".join(lines)
