"""A renderer for the subset of Helm's Go templates our chart uses, by translation to Jinja2.

helm itself cannot be installed on these machines (no registry package ships it), so the tests
render the chart with this and validate the manifests. Supported: {{ .Values.x }},
.Release.Name, .Chart.Name, include "name" ., `if`, `range $k, $v := map`, `end`, and the
pipes quote, nindent N, toYaml, with {{- -}} whitespace trimming.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_DEFINE = re.compile(r'\{\{-?\s*define\s+"([^"]+)"\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}', re.S)


def _expr(text: str) -> str:
    text = re.sub(r'include\s+"([^"]+)"\s+\.', r'include("\1")', text)
    text = re.sub(r"toYaml\s+(\S+)", r"toYaml(\1)", text)
    text = re.sub(r"\bnindent\s+(\d+)", r"nindent(\1)", text)
    text = text.replace("$", "")
    return re.sub(r"(?<![\w)\]])\.(Values|Release|Chart)\b", r"\1", text)


def _translate(source: str) -> str:
    blocks: list[str] = []

    def action(match: re.Match) -> str:
        left, body, right = match.groups()
        ws_left, ws_right = ("-" if left else ""), ("-" if right else "")
        if body.startswith("if "):
            blocks.append("if")
            return f"{{%{ws_left} if {_expr(body[3:])} {ws_right}%}}"
        if body.startswith("range "):
            names, _, collection = body[6:].partition(":=")
            key, value = (n.strip().lstrip("$") for n in names.split(","))
            blocks.append("for")
            return (f"{{%{ws_left} for {key}, {value} in ({_expr(collection.strip())}).items() "
                    f"{ws_right}%}}")
        if body == "end":
            return f"{{%{ws_left} end{blocks.pop()} {ws_right}%}}"
        return f"{{{{{ws_left} {_expr(body)} {ws_right}}}}}"

    return _ACTION.sub(action, source)


def render_chart(chart: Path, values: dict[str, Any] | None = None,
                 release: str = "test") -> dict[str, str]:
    chart_meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    merged = yaml.safe_load((chart / "values.yaml").read_text())
    merged.update(values or {})
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["quote"] = lambda v: '"' + str(v).replace('"', '\\"') + '"'
    env.filters["nindent"] = lambda v, n: "\n" + "\n".join(
        " " * n + line if line else line for line in str(v).splitlines())
    context = {"Values": merged, "Release": {"Name": release},
               "Chart": {"Name": chart_meta["name"]}}
    helpers = {name: body for name, body in
               _DEFINE.findall((chart / "templates/_helpers.tpl").read_text())}
    env.globals["include"] = lambda name: env.from_string(_translate(helpers[name])).render(
        context).strip()
    env.globals["toYaml"] = lambda v: yaml.safe_dump(v, default_flow_style=False).strip()
    return {
        path.name: env.from_string(_translate(path.read_text())).render(context)
        for path in sorted((chart / "templates").glob("*.yaml"))
    }
