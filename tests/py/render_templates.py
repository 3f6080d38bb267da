"""The chat-template oracle: renders conversations with Python's jinja2
exactly as transformers' `apply_chat_template(tokenize=False)` does
(sandboxed, trim_blocks, lstrip_blocks, loop controls, `{% generation %}`,
its `tojson`, `raise_exception` and `strftime_now`).

Reads {"templates": {name: source}, "cases": [...]} as JSON on stdin and
prints {name: [{"text": ...} | {"raised": ...} | {"failed": ...}, ...]} on
stdout: the text, the message a template passed to `raise_exception`, or
another error (a template bug on that input)."""

import json
import sys
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Generation(Extension):
    """transformers' `{% generation %}` block (its AssistantTracker): it
    marks the assistant's text for training masks and renders its body
    unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class Raised(jinja2.exceptions.TemplateError):
    pass


def raise_exception(message):
    raise Raised(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                    extensions=[loopcontrols, Generation])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now

request = json.load(sys.stdin)
out = {}
for name, source in request["templates"].items():
    results = []
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        out[name] = {"compile_error": str(e)}
        continue
    for case in request["cases"]:
        try:
            results.append({"text": template.render(**case)})
        except Raised as e:
            results.append({"raised": str(e)})
        except Exception as e:  # a template bug on this input
            results.append({"failed": f"{type(e).__name__}: {e}"})
    out[name] = results
json.dump(out, sys.stdout, ensure_ascii=False)
