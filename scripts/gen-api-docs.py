#!/usr/bin/env python3
"""Renders the registry's OpenAPI document as a Markdown API reference.

    cargo run -q -p shamal-registry --example openapi | scripts/gen-api-docs.py > docs/registry-api.md
    scripts/gen-api-docs.py --update   # regenerate docs/openapi.json and docs/registry-api.md
    scripts/gen-api-docs.py --check    # exit 1 when either is out of date
    scripts/gen-api-docs.py --check-markdown   # markdown vs committed JSON only (no build)

The OpenAPI document is the source of truth (generated from the handlers'
annotations); `services/registry/tests/rest_api.rs` checks that the served
document equals the committed docs/openapi.json.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "docs" / "openapi.json"
MARKDOWN = ROOT / "docs" / "registry-api.md"
METHODS = ["get", "head", "post", "put", "patch", "delete"]


def ref_name(ref):
    return ref.rsplit("/", 1)[-1]


def anchor(name):
    return "schema-" + name.lower().replace("_", "-")


def one_line(text):
    return " ".join((text or "").split())


def cell(text):
    return one_line(text).replace("|", "\\|")


def type_of(schema):
    """A short, linked rendering of a schema's type."""
    if not schema:
        return "any"
    if "$ref" in schema:
        name = ref_name(schema["$ref"])
        return f"[{name}](#{anchor(name)})"
    for key in ("oneOf", "anyOf", "allOf"):
        if key in schema:
            parts = [type_of(part) for part in schema[key]]
            return (" & " if key == "allOf" else " \\| ").join(parts)
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    kind = schema.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    rendered = []
    for kind in kinds:
        if kind == "array":
            rendered.append(f"array of {type_of(schema.get('items'))}")
        elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
            rendered.append(f"map of string to {type_of(schema['additionalProperties'])}")
        elif kind in ("integer", "number", "string") and schema.get("format"):
            rendered.append(f"{kind} ({schema['format']})")
        else:
            rendered.append(kind)
    return " \\| ".join(rendered)


def constraints(schema):
    notes = []
    if not schema:
        return notes
    if "minimum" in schema and "maximum" in schema:
        notes.append(f"{schema['minimum']}..={schema['maximum']}")
    elif "minimum" in schema and schema["minimum"] != 0:
        notes.append(f">= {schema['minimum']}")
    elif "maximum" in schema:
        notes.append(f"<= {schema['maximum']}")
    if "pattern" in schema:
        notes.append(f"pattern `{schema['pattern']}`")
    if "maxLength" in schema:
        notes.append(f"at most {schema['maxLength']} characters")
    if schema.get("additionalProperties") is False:
        notes.append("no other fields")
    return notes


def describe(schema, description=None):
    text = one_line(description if description is not None else schema.get("description", ""))
    notes = constraints(schema)
    if notes:
        text = (text + " " if text else "") + "(" + "; ".join(notes) + ")"
    return text


def render_fields(out, schema):
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    if not properties:
        return
    out.append("| field | type | required | description |")
    out.append("|---|---|---|---|")
    for name, field in properties.items():
        out.append(
            f"| `{name}` | {type_of(field)} | {'yes' if name in required else 'no'} "
            f"| {cell(describe(field))} |"
        )
    out.append("")


def resolve_response(document, response):
    if "$ref" in response:
        return document["components"]["responses"][ref_name(response["$ref"])]
    return response


def render_operation(out, document, path, method, operation):
    summary = operation.get("summary", "").rstrip(".")
    out.append(f"### `{method.upper()} {path}`")
    out.append("")
    if summary:
        out.append(f"**{summary}.**")
        out.append("")
    if operation.get("description"):
        out.append(one_line(operation["description"]))
        out.append("")
    parameters = operation.get("parameters", [])
    if parameters:
        out.append("| parameter | in | type | required | description |")
        out.append("|---|---|---|---|---|")
        for parameter in parameters:
            schema = parameter.get("schema", {})
            out.append(
                f"| `{parameter['name']}` | {parameter['in']} | {type_of(schema)} "
                f"| {'yes' if parameter.get('required') else 'no'} "
                f"| {cell(describe(schema, parameter.get('description', '')))} |"
            )
        out.append("")
    body = operation.get("requestBody")
    if body:
        for content_type, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            line = f"Request body (`{content_type}`): {type_of(schema)}"
            if body.get("description"):
                line += f", {one_line(body['description']).rstrip('.').lower()}"
            out.append(line + ".")
            out.append("")
            if "$ref" in schema:
                target = document["components"]["schemas"].get(ref_name(schema["$ref"]), {})
                render_fields(out, target)
    out.append("| status | description | body |")
    out.append("|---|---|---|")
    for status, response in sorted(operation.get("responses", {}).items()):
        response = resolve_response(document, response)
        content = response.get("content", {})
        bodies = ", ".join(
            f"{type_of(item.get('schema'))} (`{content_type}`)"
            if content_type != "application/json"
            else type_of(item.get("schema"))
            for content_type, item in content.items()
        )
        headers = response.get("headers", {})
        description = one_line(response.get("description", ""))
        if headers:
            if description and not description.endswith("."):
                description += "."
            description += " Headers: " + ", ".join(f"`{name}`" for name in headers) + "."
        out.append(f"| {status} | {cell(description)} | {bodies or '—'} |")
    out.append("")


def render(document):
    info = document["info"]
    out = [
        f"# {info['title']}",
        "",
        "<!-- Generated by scripts/gen-api-docs.py from docs/openapi.json; do not edit. -->",
        "",
        f"API version {info['version']}, OpenAPI {document['openapi']}. The machine-readable "
        "document is served at `GET /openapi.json` (committed as "
        "[`docs/openapi.json`](openapi.json)); the registry's HTTP listener "
        "(default `127.0.0.1:8200`) also serves a web UI at `/`.",
        "",
    ]
    for paragraph in info.get("description", "").split("\n\n"):
        out.append(one_line(paragraph))
        out.append("")
    operations = []
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                operations.append((path, method, item[method]))
    tags = [tag["name"] for tag in document.get("tags", [])]
    tag_descriptions = {tag["name"]: tag.get("description", "") for tag in document.get("tags", [])}
    for path, method, operation in operations:
        for tag in operation.get("tags", ["other"]):
            if tag not in tags:
                tags.append(tag)

    out.append("## Routes")
    out.append("")
    out.append("| method | path | summary |")
    out.append("|---|---|---|")
    for tag in tags:
        for path, method, operation in operations:
            if tag in operation.get("tags", ["other"]):
                out.append(
                    f"| {method.upper()} | `{path}` | {cell(operation.get('summary', '').rstrip('.'))} |"
                )
    out.append("")
    for tag in tags:
        tagged = [op for op in operations if tag in op[2].get("tags", ["other"])]
        if not tagged:
            continue
        out.append(f"## {tag.capitalize()}")
        out.append("")
        if tag_descriptions.get(tag):
            out.append(one_line(tag_descriptions[tag]) + ".")
            out.append("")
        for path, method, operation in tagged:
            render_operation(out, document, path, method, operation)

    out.append("## Schemas")
    out.append("")
    for name, schema in sorted(document.get("components", {}).get("schemas", {}).items()):
        out.append(f'<a id="{anchor(name)}"></a>')
        out.append("")
        out.append(f"### {name}")
        out.append("")
        if schema.get("description"):
            out.append(one_line(schema["description"]))
            out.append("")
        if schema.get("properties"):
            if schema.get("additionalProperties") is False:
                out.append("Unknown fields are refused.")
                out.append("")
            render_fields(out, schema)
        else:
            out.append(f"Type: {type_of(schema)}.")
            notes = constraints(schema)
            if notes:
                out.append("(" + "; ".join(notes) + ")")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def generated_openapi():
    result = subprocess.run(
        ["cargo", "run", "-q", "-p", "shamal-registry", "--example", "openapi"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


def main(argv):
    if argv[1:] == ["--update"]:
        text = generated_openapi()
        OPENAPI.write_text(text)
        MARKDOWN.write_text(render(json.loads(text)))
        print(f"wrote {OPENAPI.relative_to(ROOT)} and {MARKDOWN.relative_to(ROOT)}")
        return 0
    if argv[1:] == ["--check-markdown"]:
        # The Rust test `openapi_document_describes_every_route_and_is_committed`
        # keeps docs/openapi.json equal to the served document; this keeps
        # the markdown equal to docs/openapi.json, without building anything.
        if MARKDOWN.read_text() != render(json.loads(OPENAPI.read_text())):
            print(f"out of date: {MARKDOWN.relative_to(ROOT)}; run scripts/gen-api-docs.py --update",
                  file=sys.stderr)
            return 1
        return 0
    if argv[1:] == ["--check"]:
        committed = json.loads(OPENAPI.read_text())
        stale = []
        if json.loads(generated_openapi()) != committed:
            stale.append(str(OPENAPI.relative_to(ROOT)))
        if MARKDOWN.read_text() != render(committed):
            stale.append(str(MARKDOWN.relative_to(ROOT)))
        if stale:
            print(f"out of date: {', '.join(stale)}; run scripts/gen-api-docs.py --update",
                  file=sys.stderr)
            return 1
        return 0
    if len(argv) > 1:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(render(json.load(sys.stdin)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
