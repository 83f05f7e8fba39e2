"""The Ollama Modelfile of an exported model: FROM the GGUF, an optional ADAPTER, the chat TEMPLATE in Ollama's Go
template syntax derived from the tokenizer's own Jinja chat template, a ``PARAMETER stop`` per end-of-turn token.

``write_modelfile`` writes it; ``check_modelfile`` renders the Modelfile's TEMPLATE with a small interpreter for
the Go-template subset emitted here (``render_go_template``) next to the tokenizer's Jinja template, on the same
conversations, and reports whether both give the same text and whether every end-of-turn token stops generation.
Ollama itself is not needed to check a Modelfile (notebook 08); ``ollama_commands`` prints how to run it.

Sources: the Ollama Modelfile reference (https://github.com/ollama/ollama/blob/main/docs/modelfile.md) and Go's
``text/template`` (https://pkg.go.dev/text/template).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .export import ExportError, _check_destination, format_table
from .paths import write_text_atomic

_PROBE = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U1"},
          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


@dataclass(frozen=True)
class TemplateFamily:
    """A chat-template family: how to recognise its Jinja rendering and its Go template for Ollama."""

    name: str
    turn: Callable[[str, str], str]  # (role, content) -> rendered turn
    generation_prompt: str
    end_of_turn: tuple[str, ...]
    go_turn: str  # the Go template of one message, with .Role / .Content


FAMILIES: tuple[TemplateFamily, ...] = (
    TemplateFamily("chatml", lambda r, c: f"<|im_start|>{r}\n{c}<|im_end|>\n", "<|im_start|>assistant\n",
                   ("<|im_end|>",), "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"),
)


def _render_jinja(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         chat_template=template)


def detect_template(tokenizer: Any) -> tuple[TemplateFamily, str | None, str]:
    """``(family, default system prompt or None, prefix)`` of the tokenizer's chat template, found by rendering.

    Probing the rendered output (not parsing the Jinja source) recognises any template that produces the family's
    format; ``prefix`` is what precedes the first turn (e.g. a BOS token) and must be empty for Ollama here.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError("the tokenizer has no chat template: Ollama needs one to format conversations")
    full = _render_jinja(tokenizer, _PROBE)
    for fam in FAMILIES:
        body = "".join(fam.turn(m["role"], m["content"]) for m in _PROBE) + fam.generation_prompt
        if not full.endswith(body):
            continue
        prefix = full[: -len(body)]
        bare = _render_jinja(tokenizer, _PROBE[1:])
        rest = "".join(fam.turn(m["role"], m["content"]) for m in _PROBE[1:]) + fam.generation_prompt
        if not bare.startswith(prefix) or not bare.endswith(rest):
            continue
        default = bare[len(prefix): -len(rest)]
        if not default:
            return fam, None, prefix
        m = re.fullmatch(re.escape(fam.turn("system", "\x00")).replace("\\x00", "\x00").replace("\x00", "(.*)"),
                         default, re.DOTALL)
        if m:
            return fam, m.group(1), prefix
    raise ExportError("unsupported chat template: write_modelfile knows the "
                      f"{', '.join(f.name for f in FAMILIES)} families; render of a probe conversation:\n{full!r}")


def go_template(tokenizer: Any) -> str:
    """The Ollama TEMPLATE (Go ``text/template`` over ``.Messages``) equivalent to the tokenizer's chat template."""
    fam, default_system, prefix = detect_template(tokenizer)
    if prefix:
        raise ExportError(f"the chat template starts with {prefix!r} before the first turn; "
                          "this Go-template writer supports templates without a prefix")
    head = ""
    if default_system is not None:
        sys_turn = fam.go_turn.replace("{{ .Role }}", "system").replace("{{ .Content }}", default_system)
        head = ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + sys_turn + "{{ end }}\n")
    return head + "{{- range .Messages }}" + fam.go_turn + "{{ end }}" + fam.generation_prompt


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """Every token that ends an assistant turn: the family's end-of-turn marker(s) and the tokenizer's eos."""
    fam, _, _ = detect_template(tokenizer)
    stops = list(fam.end_of_turn)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def _quote(value: str) -> str:
    if '"""' in value:
        raise ExportError('a Modelfile value may not contain """')
    return f'"""{value}"""'


def write_modelfile(gguf_path: str | Path, tokenizer: Any, out_path: str | Path, system: str | None = None,
                    parameters: dict[str, Any] | None = None, overwrite: bool = False,
                    adapter: str | Path | None = None) -> Path:
    """Write an Ollama Modelfile for ``gguf_path`` built from the tokenizer's own chat template and specials.

    FROM the GGUF (relative when it sits next to the Modelfile), TEMPLATE in Ollama's Go-template syntax
    equivalent to the Jinja chat template, a ``PARAMETER stop`` for every end-of-turn token (else Ollama keeps
    generating past the turn), optional SYSTEM and other PARAMETERs. Check it with ``check_modelfile``.

    ``adapter``: a LoRA adapter in GGUF (``export.lora_to_gguf``) that Ollama applies on top of the FROM model at
    load time (the Modelfile's ``ADAPTER`` line): the base stays unmerged and shared, as with llama.cpp's
    ``--lora``. The adapter must have been trained on that base.
    """
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    _check_destination(out_path, overwrite)
    for what, path in (("model", gguf_path), ("adapter", adapter)):
        if path is not None and not Path(path).is_file():
            raise ExportError(f"the {what} GGUF {path} does not exist: write it first (export.to_gguf / "
                              "export.lora_to_gguf), then the Modelfile")

    def rel(path: Path) -> str:
        try:
            return "./" + str(path.resolve().relative_to(out_path.parent.resolve()))
        except ValueError:
            return str(path.resolve())

    lines = [f"# Ollama Modelfile written by lora_course.modelfile from {gguf_path.name}", f"FROM {rel(gguf_path)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {rel(Path(adapter))}")
    lines.append(f"TEMPLATE {_quote(go_template(tokenizer))}")
    if system is not None:
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in end_of_turn_tokens(tokenizer):
        lines.append(f'PARAMETER stop "{stop}"')
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return write_text_atomic(out_path, "\n".join(lines) + "\n")


def parse_modelfile(text: str) -> dict[str, Any]:
    """The instructions of a Modelfile: ``{"FROM": str, "TEMPLATE": str, "SYSTEM": str, "PARAMETER": [(k, v)]}``."""
    out: dict[str, Any] = {"PARAMETER": []}
    pos = 0
    pattern = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER|ADAPTER|LICENSE|MESSAGE)\s+', re.MULTILINE | re.IGNORECASE)
    while (m := pattern.search(text, pos)):
        cmd, start = m.group(1).upper(), m.end()
        if text.startswith('"""', start):
            end = text.index('"""', start + 3)
            value, pos = text[start + 3:end], end + 3
        else:
            end = text.find("\n", start)
            end = len(text) if end < 0 else end
            value, pos = text[start:end].strip(), end
        if cmd == "PARAMETER":
            k, _, v = value.partition(" ")
            v = v.strip()
            out["PARAMETER"].append((k, v[1:-1] if len(v) > 1 and v[0] == v[-1] == '"' else v))
        else:
            out[cmd] = value
    return out


# A renderer for the subset of Go's text/template that go_template emits (and a little more): text, actions with
# {{- -}} trimming, range over a list (with or without $i, $x :=), if/else/end, and pipelines of fields (.A, $.A,
# $x.A, (expr).A), string/number literals and the functions eq, ne, not, and, or, index, len.
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


def _go_parse(src: str) -> list[Any]:
    items: list[Any] = []
    pos = 0
    pending_ltrim = False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if pending_ltrim:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        pending_ltrim = bool(m.group(3))
        pos = m.end()
    tail = src[pos:]
    if pending_ltrim:
        tail = tail.lstrip()
    if tail:
        items.append(("text", tail))
    tree, rest = _go_block(items, 0)
    if rest != len(items):
        raise ExportError(f"unexpected {{{{ {items[rest][1]} }}}} in template")
    return tree


def _go_block(items: list[Any], i: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    while i < len(items):
        kind, val = items[i]
        if kind == "text":
            out.append(("text", val))
            i += 1
            continue
        word = val.split(None, 1)[0] if val else ""
        if word in ("end", "else"):
            return out, i
        if word in ("if", "range"):
            body, j = _go_block(items, i + 1)
            other: list[Any] = []
            if j < len(items) and items[j][1] == "else":
                other, j = _go_block(items, j + 1)
            if j >= len(items) or items[j][1] != "end":
                raise ExportError(f"{{{{ {val} }}}} has no {{{{ end }}}}")
            out.append((word, val[len(word):].strip(), body, other))
            i = j + 1
            continue
        out.append(("print", val))
        i += 1
    return out, i


_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|-?\d+|\$?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|\$(?:\.[A-Za-z_]\w*)*'
                    r'|\.(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?)')


def _go_tokens(expr: str) -> list[str]:
    toks, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ExportError(f"cannot parse template expression {expr!r} at {expr[pos:]!r}")
        toks.append(m.group(1))
        pos = m.end()
        if pos < len(expr) and expr[pos] == "." and toks[-1] == ")":  # (expr).Field
            m2 = re.match(r"\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", expr[pos:])
            if m2:
                toks.append("@" + m2.group(0))
                pos += m2.end()
    return toks


def _truthy(v: Any) -> bool:
    return bool(v) if v is not None else False


def _field(obj: Any, path: str) -> Any:
    for name in [p for p in path.split(".") if p]:
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name)
    return obj


_GO_FUNCS: dict[str, Callable[..., Any]] = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
    "index": lambda a, *k: _index(a, k), "len": lambda a: len(a),
}


def _index(a: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        a = a[k]
    return a


def _go_eval(toks: list[str], dot: Any, scope: dict[str, Any]) -> Any:
    """Evaluate a command (``fn arg ...`` or a single operand) given as tokens."""
    args, i = [], 0
    while i < len(toks):
        t = toks[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
            # evaluated only when used, so ``and`` / ``or`` short-circuit as in Go >= 1.18
            # (``or (not .Messages) (ne (index .Messages 0).Role "system")`` on no messages)
            suffix = toks[j][1:] if j < len(toks) and toks[j].startswith("@") else ""
            args.append(("expr", (toks[i + 1:j - 1], suffix)))
            i = j + (1 if suffix else 0)
            continue
        args.append(("tok", t))
        i += 1
    if not args:
        raise ExportError("empty template expression")
    head = args[0]
    if head[0] == "tok" and head[1] in ("and", "or"):
        result: Any = None
        for a in args[1:]:
            result = _go_operand(a, dot, scope)
            if (head[1] == "and") != _truthy(result):
                return result
        return result
    if head[0] == "tok" and head[1] in _GO_FUNCS:
        return _GO_FUNCS[head[1]](*[_go_operand(a, dot, scope) for a in args[1:]])
    if len(args) != 1:
        raise ExportError(f"unsupported template command {toks!r}")
    return _go_operand(head, dot, scope)


def _go_operand(arg: tuple[str, Any], dot: Any, scope: dict[str, Any]) -> Any:
    kind, t = arg
    if kind == "expr":
        sub, suffix = t
        value = _go_eval(sub, dot, scope)
        return _field(value, suffix) if suffix else value
    if t.startswith('"'):
        return json.loads(t)
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    if t == ".":
        return dot
    if t.startswith("."):
        return _field(dot, t)
    if t.startswith("$"):
        name, _, rest = t.partition(".")
        return _field(scope[name], rest)
    raise ExportError(f"unsupported template operand {t!r}")


def _go_exec(tree: list[Any], dot: Any, scope: dict[str, Any], out: list[str]) -> None:
    for node in tree:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            value = _go_eval(_go_tokens(node[1]), dot, scope)
            out.append("" if value is None else str(value))
        elif kind == "if":
            branch = node[2] if _truthy(_go_eval(_go_tokens(node[1]), dot, scope)) else node[3]
            _go_exec(branch, dot, scope, out)
        elif kind == "range":
            expr = node[1]
            names: list[str] = []
            if ":=" in expr:
                lhs, expr = expr.split(":=", 1)
                names = [n.strip() for n in lhs.split(",")]
            seq = _go_eval(_go_tokens(expr), dot, scope) or []
            if not seq:
                _go_exec(node[3], dot, scope, out)
            for i, item in enumerate(seq):
                inner = dict(scope)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = i, item
                elif len(names) == 1:
                    inner[names[0]] = item
                _go_exec(node[2], item, inner, out)


def render_go_template(template: str, messages: list[dict[str, str]], system: str | None = None) -> str:
    """Render an Ollama TEMPLATE for a conversation as Ollama does for a chat request.

    Messages are exposed as ``.Messages`` with ``.Role`` / ``.Content``; like Ollama, a Modelfile SYSTEM is
    prepended as a system message when the conversation does not start with one.
    """
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system is not None and (not msgs or msgs[0]["Role"] != "system"):
        msgs.insert(0, {"Role": "system", "Content": system})
    data = {"Messages": msgs, "System": system or ""}
    out: list[str] = []
    _go_exec(_go_parse(template), data, {"$": data}, out)
    return "".join(out)


DEFAULT_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Convert 3 km to m."}],
    [{"role": "user", "content": "Write a poem about the sea."}, {"role": "assistant", "content": "Waves\nroll"},
     {"role": "user", "content": "Shorter, with\nnew lines and {{ braces }}."}],
]


@dataclass
class ModelfileCheck:
    """The Modelfile TEMPLATE and the Jinja chat template rendered on the same conversations."""

    results: list[tuple[list[dict[str, str]], str, str]]  # (conversation, go rendering, jinja rendering)
    stops: list[str]
    missing_stops: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing_stops and all(go == jinja for _, go, jinja in self.results)

    def __str__(self) -> str:
        rows = [{"conversation": " | ".join(m["role"] for m in conv), "equal": go == jinja,
                 "chars": len(jinja)} for conv, go, jinja in self.results]
        return format_table(rows) + f"\nstop tokens: {self.stops}" + \
            (f"\nMISSING stop tokens: {self.missing_stops}" if self.missing_stops else "")


def check_modelfile(modelfile: str | Path, tokenizer: Any,
                    conversations: list[list[dict[str, str]]] | None = None) -> ModelfileCheck:
    """Render the Modelfile's TEMPLATE (as Ollama would) and the tokenizer's Jinja template; compare them.

    Also checks that every end-of-turn token has a ``PARAMETER stop``. ``.ok`` is True when all renderings are
    identical character for character.
    """
    text = Path(modelfile).read_text(encoding="utf-8") if isinstance(modelfile, Path) or (
        isinstance(modelfile, str) and "\n" not in modelfile and Path(modelfile).exists()) else str(modelfile)
    spec = parse_modelfile(text)
    if "TEMPLATE" not in spec:
        raise ExportError("the Modelfile has no TEMPLATE")
    system = spec.get("SYSTEM")
    results = []
    for conv in conversations or DEFAULT_CONVERSATIONS:
        effective = conv if system is None or (conv and conv[0]["role"] == "system") else \
            [{"role": "system", "content": system}, *conv]
        results.append((conv, render_go_template(spec["TEMPLATE"], conv, system),
                        _render_jinja(tokenizer, effective)))
    stops = [v for k, v in spec["PARAMETER"] if k == "stop"]
    missing = [s for s in end_of_turn_tokens(tokenizer) if s not in stops]
    return ModelfileCheck(results, stops, missing)


def ollama_commands(modelfile: str | Path, name: str = "lora-course") -> list[str]:
    """The shell commands that build and run the model in Ollama from ``modelfile``."""
    return [f"ollama create {name} -f {modelfile}", f"ollama run {name} \"Write a poem about the sea.\""]
