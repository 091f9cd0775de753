//! The R4 (4.0.1) element table: the type and cardinality of every element of every resource and
//! complex type, from HL7's StructureDefinitions (`r4_elements.tsv`, written by
//! `tests/deid/make_r4_elements.py`). The engine types each node of a resource with it, as
//! Microsoft's engine does with Firely's model, so `nodesByType('date')` finds every date.

use std::sync::OnceLock;

use rustc_hash::FxHashMap as HashMap;

/// One element of a definition.
#[derive(Debug)]
pub struct Element {
    /// Its path (`Patient.contact`, without `[x]`).
    pub path: &'static str,
    /// Its types: one, or several for a choice element (`value[x]`).
    pub types: Vec<&'static str>,
    /// For a content reference (`Questionnaire.item.item`), the path whose children it has.
    pub same_as: Option<&'static str>,
    pub repeats: bool,
    pub choice: bool,
}

/// Where a JSON member leads: the element's name, its type, and where its own children are
/// defined.
#[derive(Debug, Clone, Copy)]
pub struct Typed {
    /// The length of the element's name in the member's key (`value` in `valueQuantity`).
    pub name_len: usize,
    pub ty: &'static str,
    pub repeats: bool,
    /// The definition path of its children: the type, or the element's own path for a backbone.
    pub children_at: &'static str,
}

/// The elements by the path of their parent, then by name.
type Table = HashMap<&'static str, HashMap<&'static str, Element>>;

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table: Table = HashMap::default();
        for line in include_str!("r4_elements.tsv").lines() {
            let mut fields = line.split('\t');
            let (Some(path), Some(types), Some(cardinality)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (path, choice) = match path.strip_suffix("[x]") {
                Some(stem) => (stem, true),
                None => (path, false),
            };
            let (types, same_as) = match types.strip_prefix('@') {
                Some(target) => (Vec::new(), Some(target)),
                None => (types.split(',').collect(), None),
            };
            let Some((parent, name)) = path.rsplit_once('.') else {
                continue;
            };
            table.entry(parent).or_default().insert(
                name,
                Element {
                    path,
                    types,
                    same_as,
                    repeats: cardinality == "*",
                    choice,
                },
            );
        }
        table
    })
}

/// True for the FHIR primitive types (their names start in lower case).
pub fn is_primitive(ty: &str) -> bool {
    ty.starts_with(|c: char| c.is_ascii_lowercase())
}

/// The element a member `key` of a node defined at `parent` is, or `None` when R4 has no such
/// element there.
pub fn member(parent: &'static str, key: &str) -> Option<Typed> {
    match key {
        "extension" | "modifierExtension" => {
            return Some(Typed {
                name_len: key.len(),
                ty: "Extension",
                repeats: true,
                children_at: "Extension",
            })
        }
        "id" if !crate::fhir::types::is_resource_type(parent) => {
            return Some(Typed {
                name_len: 2,
                ty: "string",
                repeats: false,
                children_at: "string",
            })
        }
        _ => {}
    }
    let members = table().get(parent)?;
    if let Some(element) = members.get(key) {
        if !element.choice {
            // An element defined as another (`contentReference`) has no type of its own.
            let ty = match element.same_as {
                Some(_) => "BackboneElement",
                None => element.types.first().copied()?,
            };
            return Some(typed(key.len(), element, ty));
        }
    }
    // A choice element: `valueQuantity` is `value[x]` with the type Quantity.
    for (split, _) in key.char_indices().filter(|(_, c)| c.is_ascii_uppercase()) {
        let (name, suffix) = key.split_at(split);
        let Some(element) = members.get(name).filter(|element| element.choice) else {
            continue;
        };
        let ty = element.types.iter().find(|ty| capitalised_is(ty, suffix))?;
        return Some(typed(split, element, ty));
    }
    None
}

fn capitalised_is(ty: &str, suffix: &str) -> bool {
    let mut chars = ty.chars();
    match chars.next() {
        Some(first) => {
            suffix.len() == ty.len()
                && suffix.starts_with(first.to_ascii_uppercase())
                && suffix[first.len_utf8()..] == *chars.as_str()
        }
        None => false,
    }
}

fn typed(name_len: usize, element: &Element, ty: &'static str) -> Typed {
    let children_at = match (element.same_as, ty) {
        (Some(target), _) => target,
        (None, "BackboneElement" | "Element") => element.path,
        (None, ty) => ty,
    };
    let ty = match element.same_as {
        Some(_) => "BackboneElement",
        None => ty,
    };
    Typed {
        name_len,
        ty,
        repeats: element.repeats,
        children_at,
    }
}
