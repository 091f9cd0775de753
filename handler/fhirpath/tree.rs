//! A resource as a typed tree, as Microsoft's engine sees it through Firely's model: one node per
//! element, typed by R4 (`valueQuantity` is a node `value` of type `Quantity`), a primitive's value
//! and its `_x` sibling (`id`, `extension`) in one node. Values keep their JSON tokens, so what no
//! rule changes is written back as it was read (numbers included).

use std::borrow::Cow;

use super::r4;
use crate::fhir::json::Json;

/// Why a resource cannot be typed as R4 (an element R4 does not have, a value of the wrong shape).
/// It names paths and types, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

#[derive(Debug, Clone)]
pub struct Node<'a> {
    /// The JSON member it was read from (`valueQuantity`); empty for the root.
    pub key: Cow<'a, str>,
    name_len: usize,
    pub ty: &'static str,
    pub repeats: bool,
    /// Where R4 defines its children.
    pub children_at: &'static str,
    /// A primitive's value as a JSON token (`"text"`, `1.50`, `true`); `None` when it has none.
    pub value: Option<Cow<'a, str>>,
    pub children: Vec<usize>,
    pub parent: Option<usize>,
    pub resource: bool,
    pub removed: bool,
}

impl<'a> Node<'a> {
    /// A node of the element `typed`, read from the member `key`, without value or children.
    fn typed(key: Cow<'a, str>, typed: r4::Typed, parent: Option<usize>) -> Node<'a> {
        Node {
            key,
            name_len: typed.name_len,
            ty: typed.ty,
            repeats: typed.repeats,
            children_at: typed.children_at,
            value: None,
            children: Vec::new(),
            parent,
            resource: false,
            removed: false,
        }
    }

    /// The element's name (`value` for `valueQuantity`).
    pub fn name(&self) -> &str {
        &self.key[..self.name_len]
    }

    pub fn is_primitive(&self) -> bool {
        !self.resource && r4::is_primitive(self.ty)
    }

    /// The value's text: a string unescaped, a number or boolean as written.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        let token = self.value.as_deref()?;
        match token.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(inner) if !inner.contains('\\') => Some(Cow::Borrowed(inner)),
            Some(_) => serde_json::from_str::<String>(token).ok().map(Cow::Owned),
            None => Some(Cow::Borrowed(token)),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Tree<'a> {
    pub nodes: Vec<Node<'a>>,
}

pub const ROOT: usize = 0;

impl<'a> Tree<'a> {
    /// Types a resource; the root is node 0.
    pub fn from_json(json: Json<'a>) -> Result<Tree<'a>, InvalidInput> {
        let mut tree = Tree {
            nodes: Vec::with_capacity(64),
        };
        tree.add_resource(json, Cow::Borrowed(""), None)?;
        Ok(tree)
    }

    /// The live children of `id`.
    pub fn children(&self, id: usize) -> impl Iterator<Item = usize> + '_ {
        self.nodes[id]
            .children
            .iter()
            .copied()
            .filter(|&child| !self.nodes[child].removed)
    }

    /// The live children of `id` named `name`.
    pub fn children_named<'t>(
        &'t self,
        id: usize,
        name: &'t str,
    ) -> impl Iterator<Item = usize> + 't {
        self.children(id)
            .filter(move |&child| self.nodes[child].name() == name)
    }

    /// The outermost node above `id`.
    pub fn root_of(&self, mut id: usize) -> usize {
        while let Some(parent) = self.nodes[id].parent {
            id = parent;
        }
        id
    }

    pub fn remove(&mut self, id: usize) {
        self.nodes[id].removed = true;
    }

    /// Appends `child` (a detached node) to `parent`'s children.
    pub fn attach(&mut self, parent: usize, child: usize) {
        self.nodes[child].parent = Some(parent);
        self.nodes[parent].children.push(child);
    }

    /// Inserts `child` (detached) among `parent`'s children at `position`.
    pub fn attach_at(&mut self, parent: usize, child: usize, position: usize) {
        self.nodes[child].parent = Some(parent);
        let children = &mut self.nodes[parent].children;
        children.insert(position.min(children.len()), child);
    }

    /// A detached primitive node.
    pub fn new_primitive(&mut self, key: &str, ty: &'static str, token: String) -> usize {
        self.push(Node {
            key: Cow::Owned(key.into()),
            name_len: key.len(),
            ty,
            repeats: false,
            children_at: ty,
            value: Some(Cow::Owned(token)),
            children: Vec::new(),
            parent: None,
            resource: false,
            removed: false,
        })
    }

    /// A detached complex node typed as the member `key` of a node defined at `parent_at`.
    pub fn new_member(&mut self, parent_at: &'static str, key: &str) -> Option<usize> {
        let typed = r4::member(parent_at, key)?;
        Some(self.push(Node::typed(Cow::Owned(key.into()), typed, None)))
    }

    /// Parses `json` as the content of a node like `like` (its key and type), detached: a
    /// substitute's replacement.
    pub fn new_like(&mut self, like: usize, json: Json<'a>) -> Result<usize, InvalidInput> {
        let template = &self.nodes[like];
        let node = Node {
            key: template.key.clone(),
            name_len: template.name_len,
            ty: template.ty,
            repeats: template.repeats,
            children_at: template.children_at,
            value: None,
            children: Vec::new(),
            parent: None,
            resource: false,
            removed: false,
        };
        let id = self.push(node);
        match json {
            Json::Object(members) => self.add_members(id, members)?,
            Json::Leaf(token) if token.as_ref() != "null" => self.nodes[id].value = Some(token),
            _ => {}
        }
        Ok(id)
    }

    fn push(&mut self, node: Node<'a>) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn add_resource(
        &mut self,
        json: Json<'a>,
        key: Cow<'a, str>,
        parent: Option<usize>,
    ) -> Result<usize, InvalidInput> {
        let Json::Object(members) = json else {
            return Err(InvalidInput("a resource is not a JSON object".into()));
        };
        let ty = members
            .iter()
            .find(|(key, _)| key == "resourceType")
            .and_then(|(_, value)| value.as_str())
            .ok_or_else(|| InvalidInput("a resource has no resourceType".into()))?;
        let ty = crate::fhir::types::R4_RESOURCE_TYPES
            .iter()
            .copied()
            .find(|name| *name == ty)
            .ok_or_else(|| InvalidInput(format!("'{}' is not an R4 resource type", short(&ty))))?;
        let name_len = key.len();
        let id = self.push(Node {
            key,
            name_len,
            ty,
            repeats: false,
            children_at: ty,
            value: None,
            children: Vec::new(),
            parent,
            resource: true,
            removed: false,
        });
        self.add_members(id, members)?;
        Ok(id)
    }

    fn add_members(
        &mut self,
        id: usize,
        members: Vec<(Cow<'a, str>, Json<'a>)>,
    ) -> Result<(), InvalidInput> {
        let at = self.nodes[id].children_at;
        let is_resource = self.nodes[id].resource;
        if !members.iter().any(|(key, _)| key.starts_with('_')) {
            // The common case, without `_x` siblings: one pass, nothing set aside.
            for (key, value) in members {
                if key == "resourceType" && is_resource {
                    continue;
                }
                self.add_member(id, at, key, Some(value), None)?;
            }
            return Ok(());
        }
        let mut extras: Vec<(Cow<'a, str>, Json<'a>)> = Vec::new();
        let mut plain: Vec<(Cow<'a, str>, Json<'a>)> = Vec::new();
        for (key, value) in members {
            if key == "resourceType" && self.nodes[id].resource {
                continue;
            }
            match key.strip_prefix('_') {
                Some(_) => extras.push((key, value)),
                None => plain.push((key, value)),
            }
        }
        for (key, value) in plain {
            let extra = extras
                .iter()
                .position(|(extra, _)| extra[1..] == *key)
                .map(|index| extras.remove(index).1);
            self.add_member(id, at, key, Some(value), extra)?;
        }
        for (key, extra) in extras {
            let key = match key {
                Cow::Borrowed(key) => Cow::Borrowed(&key[1..]),
                Cow::Owned(key) => Cow::Owned(key[1..].to_string()),
            };
            self.add_member(id, at, key, None, Some(extra))?;
        }
        Ok(())
    }

    fn add_member(
        &mut self,
        parent: usize,
        at: &'static str,
        key: Cow<'a, str>,
        value: Option<Json<'a>>,
        extra: Option<Json<'a>>,
    ) -> Result<(), InvalidInput> {
        let typed = r4::member(at, &key)
            .ok_or_else(|| InvalidInput(format!("{at} has no element '{}'", short(&key))))?;
        let values = spread(value);
        let extras = spread(extra);
        if typed.ty == "Resource" {
            for value in values.into_iter().flatten() {
                let child = self.add_resource(value, key.clone(), Some(parent))?;
                self.nodes[child].repeats = typed.repeats;
                self.nodes[parent].children.push(child);
            }
            return Ok(());
        }
        let primitive = r4::is_primitive(typed.ty);
        if !primitive && !extras.is_empty() {
            return Err(InvalidInput(format!(
                "{at}.{} is not a primitive",
                short(&key)
            )));
        }
        let count = values.len().max(extras.len());
        let mut values = values.into_iter();
        let mut extras = extras.into_iter();
        for _ in 0..count {
            let value = values.next().flatten();
            let extra = extras.next().flatten();
            let child = self.push(Node::typed(key.clone(), typed, Some(parent)));
            self.nodes[parent].children.push(child);
            match (primitive, value) {
                (true, Some(Json::Leaf(token))) => self.nodes[child].value = Some(token),
                (false, Some(Json::Object(members))) => self.add_members(child, members)?,
                (_, None) => {}
                _ => {
                    return Err(InvalidInput(format!(
                        "{at}.{} has a value of the wrong kind",
                        short(&key)
                    )))
                }
            }
            match extra {
                Some(Json::Object(members)) => self.add_members(child, members)?,
                None => {}
                Some(_) => {
                    return Err(InvalidInput(format!(
                        "{at}._{} is not an object",
                        short(&key)
                    )))
                }
            }
        }
        Ok(())
    }

    /// Removes the nodes left with no value and no children (a resource stays).
    pub fn prune(&mut self, id: usize) {
        let mut at = 0;
        while let Some(&child) = self.nodes[id].children.get(at) {
            at += 1;
            if self.nodes[child].removed {
                continue;
            }
            self.prune(child);
            let node = &self.nodes[child];
            if !node.resource && node.value.is_none() && self.children(child).next().is_none() {
                self.nodes[child].removed = true;
            }
        }
    }

    /// Compact JSON of the node `id` (a resource or a complex node).
    pub fn write(&self, id: usize, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut first = true;
        if self.nodes[id].resource {
            out.extend_from_slice(b"\"resourceType\":");
            serde_json::to_writer(&mut *out, self.nodes[id].ty).expect("a string serialises");
            first = false;
        }
        // Members in the order their keys first appear; the nodes of one key together.
        let children = &self.nodes[id].children;
        for (index, &head) in children.iter().enumerate() {
            let node = &self.nodes[head];
            let key = node.key.as_ref();
            let seen = |&child: &usize| !self.nodes[child].removed && self.nodes[child].key == key;
            if node.removed || children[..index].iter().any(seen) {
                continue;
            }
            let group = || children[index..].iter().copied().filter(seen);
            let array = node.repeats;
            if node.is_primitive() {
                if group().any(|child| self.nodes[child].value.is_some()) {
                    member_key(out, &mut first, key, false);
                    self.write_list(out, group(), array, |tree, child, out| {
                        match &tree.nodes[child].value {
                            Some(token) => out.extend_from_slice(token.as_bytes()),
                            None => out.extend_from_slice(b"null"),
                        }
                    });
                }
                if group().any(|child| self.children(child).next().is_some()) {
                    member_key(out, &mut first, key, true);
                    self.write_list(out, group(), array, |tree, child, out| {
                        match tree.children(child).next() {
                            Some(_) => tree.write(child, out),
                            None => out.extend_from_slice(b"null"),
                        }
                    });
                }
            } else {
                member_key(out, &mut first, key, false);
                self.write_list(out, group(), array, |tree, child, out| {
                    tree.write(child, out)
                });
            }
        }
        out.push(b'}');
    }

    fn write_list(
        &self,
        out: &mut Vec<u8>,
        mut group: impl Iterator<Item = usize>,
        array: bool,
        item: impl Fn(&Self, usize, &mut Vec<u8>),
    ) {
        if !array {
            if let Some(child) = group.next() {
                item(self, child, out);
            }
            return;
        }
        out.push(b'[');
        for (index, child) in group.enumerate() {
            if index > 0 {
                out.push(b',');
            }
            item(self, child, out);
        }
        out.push(b']');
    }
}

fn member_key(out: &mut Vec<u8>, first: &mut bool, key: &str, extra: bool) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    out.push(b'"');
    if extra {
        out.push(b'_');
    }
    let quoted = serde_json::to_string(key).expect("a string serialises");
    out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
    out.extend_from_slice(b"\":");
}

/// A member's value as a list: an array's items (`null` ones as `None`), or the one value.
fn spread(value: Option<Json<'_>>) -> Vec<Option<Json<'_>>> {
    match value {
        None => Vec::new(),
        Some(Json::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Json::Leaf(token) if token == "null" => None,
                item => Some(item),
            })
            .collect(),
        Some(Json::Leaf(token)) if token == "null" => Vec::new(),
        Some(value) => vec![Some(value)],
    }
}

/// A name from the input, cut short for an error message.
fn short(text: &str) -> String {
    text.chars().take(64).collect()
}
