"""Which JSON Schema keywords each grammar backend enforces: normalise older drafts, route what xgrammar ignores.

xgrammar 0.2.9 compiles many schemas it does not fully enforce: it ignores some keywords and, where several
"winner" keywords meet (`$ref`, `const`, `enum`, `anyOf`, `oneOf`, `allOf`), keeps the first and drops
the rest of the object. `audit_schema` lists each case (checked on 0.2.9 by compiling a schema and feeding
the matcher a document that violates it; tests/test_structured.py keeps those probes); such a schema goes
to llguidance (tunelab.infer.grammar), and only a schema neither backend compiles is refused:
  not, if/then/else, dependentRequired, dependentSchemas, dependencies, contains, min/maxContains,
  uniqueItems: true, multipleOf on non-integers, $dynamicRef/$recursiveRef, remote `$ref`,
  allOf with more than one schema (compiled as "any JSON"), regex lookarounds and backreferences, oneOf whose
  branches are not plainly disjoint (compiled as anyOf), keywords beside a winner keyword (ignored; `$ref`
  siblings only from draft 2019-09 on, where they count), `pattern` beside `minLength`/`maxLength` and a
  known `format` beside either (only the first of format > pattern > length is kept), type-specific
  keywords with no `type`, a required key the object allows no value for.
`llguidance_open` says what llguidance leaves to the check on the finished answer (LL_OPEN, oneOf's
"exactly one", lookaround patterns). Every node is audited, $ref targets outside $defs included.
normalised (older drafts that xgrammar rejects or misreads): draft-04 boolean exclusiveMinimum/Maximum,
  draft-07 array-form `items` + `additionalItems` (-> prefixItems + items); and a `required` key that
  `properties` does not define gets the schema the object applies to it (xgrammar dropped it).
warned (ignored, but only loosens what jsonschema checks by default): an unknown `format` (an
  annotation unless a format checker is on), contentEncoding/contentMediaType/contentSchema. Also
  documented, not warned: xgrammar's strict mode never adds keys a schema does not list, which is
  stricter than `additionalProperties` left open, so documents stay valid.
"""

from __future__ import annotations

import copy
import json
import re

UNENFORCED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "contains",
              "minContains", "maxContains", "$dynamicRef", "$recursiveRef", "unevaluatedItems")
LL_OPEN = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "contains",
           "minContains", "maxContains", "uniqueItems", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
           "$dynamicRef", "$recursiveRef")  # llguidance 1.9 leaves these open ("lenient")
WINNERS = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf")  # xgrammar's order: the first present wins
ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment",
               "$schema", "$id", "id", "$anchor", "$defs", "definitions", "$vocabulary", "markdownDescription",
               "enumDescriptions", "markdownEnumDescriptions", "deprecationMessage", "errorMessage",
               "patternErrorMessage", "x-intellij-html-description", "x-taplo", "x-taplo-info", "$ref-note"}
LOOSE_ONLY = ("contentEncoding", "contentMediaType", "contentSchema")
FORMATS = {"email", "date", "time", "date-time", "duration", "hostname", "uuid", "uri", "uri-reference", "ipv4",
           "ipv6"}
TYPED = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
         "pattern", "required", "minProperties", "maxProperties", "propertyNames", "patternProperties",
         "minItems", "maxItems", "uniqueItems"}
SHAPE = {"type", "properties", "additionalProperties", "unevaluatedProperties", "items", "prefixItems", *WINNERS}
_LOOKAROUND = re.compile(r"\(\?<?[=!]|\\[1-9]")  # (?= (?! (?<= (?<! and \1 .. \9
SUB_ONE = ("additionalProperties", "unevaluatedProperties", "items", "propertyNames")
SUB_MAP = ("properties", "patternProperties", "$defs", "definitions")
SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _old_draft(schema: dict) -> bool:
    """Drafts 04-07, where keywords beside `$ref` are ignored by the spec itself."""
    s = str(schema.get("$schema", ""))
    return any(f"draft-0{n}" in s for n in (3, 4, 6, 7))


def normalise(schema: dict | bool) -> dict | bool:
    """A copy with draft-04/07 spellings xgrammar misreads rewritten in 2020-12 form, and every required key
    defined (`_define_required`)."""
    schema = copy.deepcopy(schema)
    for _, node in nodes(schema):  # each node is fixed before its children are walked
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(node.get(key), bool):
                if node.pop(key) and bound in node:
                    node[key] = node.pop(bound)
        if isinstance(node.get("items"), list):
            node["prefixItems"] = node.pop("items")
            if "additionalItems" in node:
                node["items"] = node.pop("additionalItems")
        _define_required(node)
    return schema


def _define_required(node: dict) -> None:
    """A `required` key that `properties` does not define is given the schema the object applies to it anyway
    (the matching patternProperties, else additionalProperties, else any value): the grammar then writes
    it (xgrammar dropped it, so the answer failed validation). Same meaning; left alone where that schema is
    `false` (no document is valid: audit_schema says so) or a combinator beside may define the key."""
    req = node.get("required")
    if not isinstance(req, list) or any(k in node for k in WINNERS):
        return
    props = node.get("properties", {})
    if not isinstance(props, dict):
        return
    for key in req:
        if not isinstance(key, str) or key in props:
            continue
        pats = node.get("patternProperties") if isinstance(node.get("patternProperties"), dict) else {}
        matched = [sub for pat, sub in pats.items() if _search(pat, key)]
        rest = node.get("additionalProperties", node.get("unevaluatedProperties", True))
        value = matched[0] if len(matched) == 1 else {"allOf": matched} if matched else rest
        if value is False:
            continue
        props = node.setdefault("properties", props)
        props[key] = {} if value is True else copy.deepcopy(value)


def _search(pattern: str, key: str) -> bool:
    try:
        return re.search(pattern, key) is not None
    except re.error:
        return True  # a regex Python cannot read: assume it applies, the backends then decide


def _disjoint(branches: list) -> bool:
    """oneOf branches a document cannot match twice: distinct plain types or distinct constant values."""
    if not all(isinstance(b, dict) for b in branches):
        return False
    if all(isinstance(b.get("type"), str) for b in branches):
        types = [b["type"] for b in branches]
        if "number" in types and "integer" in types:
            return False
        return len(set(types)) == len(types)
    values = []
    for b in branches:
        if "const" in b:
            values.append([b["const"]])
        elif isinstance(b.get("enum"), list):
            values.append(b["enum"])
        else:
            return False
    flat = [json.dumps(v, sort_keys=True) for vs in values for v in vs]
    return len(set(flat)) == len(flat)


def _values_fit(node: dict, values: list) -> bool:
    """Whether every const/enum value also satisfies the keywords beside it (which xgrammar drops)."""
    import jsonschema

    rest = {k: v for k, v in node.items() if k not in ("const", "enum")}
    if "$ref" in json.dumps(rest):
        return False
    try:
        return all(jsonschema.Draft202012Validator(rest).is_valid(v) for v in values)
    except jsonschema.SchemaError:
        return False


def _check_node(node: dict, ptr: str, old_draft: bool, errors: list, warns: list, is_key: bool = False) -> None:
    where = ptr or "/"
    for key in UNENFORCED:
        if key in node:
            errors.append((f"{ptr}/{_esc(key)}", key, "xgrammar does not enforce it"))
    if node.get("uniqueItems") is True:
        errors.append((f"{ptr}/uniqueItems", "uniqueItems", "xgrammar does not enforce it"))
    if "multipleOf" in node and not (node.get("type") == "integer" and isinstance(node["multipleOf"], int)):
        errors.append((f"{ptr}/multipleOf", "multipleOf", "xgrammar enforces it only on integer types"))
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        errors.append((f"{ptr}/$ref", "$ref", f"remote reference {ref!r}: inline it under $defs"))
    winner = next((k for k in WINNERS if k in node), None)
    if winner is not None and not (winner == "$ref" and old_draft):
        extra = [k for k in node if k != winner and k not in ANNOTATIONS]
        if winner in ("const", "enum") and extra:
            values = [node["const"]] if winner == "const" else list(node.get("enum") or [])
            if _values_fit(node, values):
                extra = []
        for k in extra:
            errors.append((f"{ptr}/{_esc(k)}", k, f"xgrammar keeps only {winner!r} of this object and ignores "
                                                   f"{k!r}: move {k!r} into the {winner} branches or drop it"))
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        errors.append((f"{ptr}/allOf", "allOf", f"{len(node['allOf'])} schemas: xgrammar 0.2.9 accepts any JSON "
                                                "there; merge them into one schema"))
    if isinstance(node.get("oneOf"), list) and len(node["oneOf"]) > 1 and not _disjoint(node["oneOf"]):
        errors.append((f"{ptr}/oneOf", "oneOf", "branches are not plainly disjoint (distinct types or constants) "
                                                "and xgrammar enforces oneOf as anyOf; use anyOf if that is meant"))
    for key in ("pattern", "patternProperties"):
        value = node.get(key)
        pats = [value] if isinstance(value, str) else list(value) if isinstance(value, dict) else []
        for pat in pats:
            if isinstance(pat, str) and _LOOKAROUND.search(pat):
                errors.append((f"{ptr}/{key}", key, f"regex {pat!r} uses a lookaround or backreference, which "
                                                     "xgrammar ignores"))
    props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    for key in node.get("required") or () if isinstance(node.get("required"), list) else ():
        if key not in props and winner is None:
            errors.append((f"{ptr}/required", "required", f"key {key!r} is not in properties and the object "
                                                          "allows it no value: xgrammar would drop it"))
    fmt = node.get("format")
    if fmt in FORMATS and "pattern" in node:
        errors.append((f"{ptr}/pattern", "pattern", f"xgrammar ignores it beside format {fmt!r}"))
    if "pattern" in node or fmt in FORMATS:
        for k in ("minLength", "maxLength"):
            if k in node:
                errors.append((f"{ptr}/{k}", k, "xgrammar ignores it beside " + ("format" if fmt in FORMATS
                                                                                  else "pattern")))
    if not SHAPE & set(node) and not is_key:  # xgrammar reads propertyNames as a string schema
        for k in sorted(TYPED & set(node)):
            errors.append((f"{ptr}/{_esc(k)}", k, "xgrammar ignores it when the schema has no \"type\"; add one"))
    if isinstance(fmt, str) and fmt not in FORMATS:
        warns.append(f"{where}: format {fmt!r} is not enforced (jsonschema treats it as an annotation too)")
    for k in LOOSE_ONLY:
        if k in node:
            warns.append(f"{where}: {k} is not enforced (an annotation in JSON Schema 2020-12)")


def nodes(schema, ptr: str = ""):
    """(JSON pointer, node) for every schema object in `schema`, the root first, then the targets of local
    `$ref`s that lie outside the keywords walked (a schema may keep definitions under any key)."""
    seen: set[str] = set()
    refs: list[str] = []
    yield from _walk(schema, ptr, seen, refs)
    while refs:
        target = refs.pop()
        if target in seen:
            continue
        node = resolve(schema, target)
        yield from _walk(node, target, seen, refs) if isinstance(node, dict) else ()
        seen.add(target)


def _walk(node, ptr: str, seen: set, refs: list):
    if not isinstance(node, dict):
        return
    seen.add(ptr)
    yield ptr, node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        refs.append(ref[1:])
    for key in SUB_ONE:
        yield from _walk(node.get(key), f"{ptr}/{key}", seen, refs)
    for key in SUB_MAP:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield from _walk(sub, f"{ptr}/{key}/{_esc(name)}", seen, refs)
    for key in SUB_LIST:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield from _walk(sub, f"{ptr}/{key}/{i}", seen, refs)


def resolve(schema, pointer: str):
    """The node at a JSON pointer ("/a/b~1c"), None where there is none."""
    node = schema
    for part in pointer.split("/")[1:] if pointer else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def audit_schema(schema: dict | bool) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(errors as (JSON pointer, keyword, why), warnings) for a schema already passed through `normalise`:
    what xgrammar would not enforce."""
    errors: list[tuple[str, str, str]] = []
    warns: list[str] = []
    old = isinstance(schema, dict) and _old_draft(schema)
    for ptr, node in nodes(schema):
        _check_node(node, ptr, old, errors, warns, is_key=ptr.endswith("/propertyNames"))
    return errors, warns


def llguidance_open(schema: dict | bool) -> tuple[dict | bool, list[tuple[str, str]]]:
    """(schema for llguidance, [(pointer, keyword)] it leaves to the check on the finished answer).

    llguidance 1.9 enforces what xgrammar does plus allOf, keywords beside $ref/anyOf, pattern beside
    length or format, required keys without properties, type-specific keywords without `type` and
    multipleOf on decimals (tests/test_structured_backends.py probes each). It does not enforce LL_OPEN nor
    oneOf's "exactly one" (compiled as anyOf) and cannot read lookaround regexes: such a `pattern` or
    patternProperties entry is left out of the grammar (a copy) and checked on the answer."""
    out = copy.deepcopy(schema)
    open_: list[tuple[str, str]] = []
    for ptr, node in nodes(out):
        open_ += [(f"{ptr}/{_esc(k)}", k) for k in LL_OPEN if k in node and node[k] is not False]
        if isinstance(node.get("oneOf"), list) and len(node["oneOf"]) > 1 and not _disjoint(node["oneOf"]):
            open_.append((f"{ptr}/oneOf", "oneOf"))
        if isinstance(node.get("pattern"), str) and _LOOKAROUND.search(node["pattern"]):
            del node["pattern"]
            open_.append((f"{ptr}/pattern", "pattern"))
        pats = node.get("patternProperties")
        for pat in [p for p in pats if _LOOKAROUND.search(p)] if isinstance(pats, dict) else ():
            del pats[pat]  # its keys fall to additionalProperties: as strict or looser, the check decides
            open_.append((f"{ptr}/patternProperties/{_esc(pat)}", "patternProperties"))
    return out, open_


def refusal(errors: list[tuple[str, str, str]], source: str = "schema") -> str:
    """The message refusing a schema for the first of audit_schema's `errors` (keyword, pointer and why)."""
    ptr, key, why = errors[0]
    more = f" (and {len(errors) - 1} more: " + ", ".join(f"{p}" for p, _, _ in errors[1:4]) + \
        (", ..." if len(errors) > 4 else "") + ")" if len(errors) > 1 else ""
    return (f"{source}: unsupported JSON Schema keyword {key!r} at {ptr or '/'}: {why}; constrained decoding "
            f"could not guarantee valid output{more}.")
