//! A YAML document as a tree that remembers where each value came from, and a serde
//! `Deserializer` over it whose errors name the line, column and field path of the offending
//! value. serde-saphyr parses (panic-free, with alias budgets); this tree only carries positions.
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// 1-based line and column; 0 where unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    /// Field path from the document root, e.g. `spec.ports[0].number`.
    pub path: String,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

impl Node {
    /// Parses every document of a YAML stream.
    pub fn parse_documents(text: &str) -> Result<Vec<Node>, serde_saphyr::Error> {
        let docs: Vec<Spanned<Kind>> = serde_saphyr::from_multiple(text)?;
        Ok(docs
            .into_iter()
            .map(|doc| {
                let mut node = Node::from_spanned(doc);
                node.assign_paths(String::new());
                node
            })
            .collect())
    }

    fn from_spanned(s: Spanned<Kind>) -> Node {
        Node {
            pos: Pos {
                line: s.referenced.line() as u32,
                col: s.referenced.column() as u32,
            },
            path: String::new(),
            kind: s.value,
        }
    }

    fn assign_paths(&mut self, path: String) {
        match &mut self.kind {
            Kind::Seq(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    item.assign_paths(format!("{path}[{i}]"));
                }
            }
            Kind::Map(entries) => {
                for (key, value) in entries.iter_mut() {
                    let child = if path.is_empty() {
                        key.name.clone()
                    } else {
                        format!("{path}.{}", key.name)
                    };
                    value.assign_paths(child);
                }
            }
            _ => {}
        }
        self.path = path;
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Position of the map key or sequence item at a serde_ignored path such as `spec.ports.0.nmae`.
    pub fn locate(&self, segments: &[String]) -> Option<Pos> {
        let (first, rest) = segments.split_first()?;
        match &self.kind {
            Kind::Map(entries) => {
                let (key, value) = entries.iter().find(|(k, _)| &k.name == first)?;
                if rest.is_empty() {
                    Some(key.pos)
                } else {
                    value.locate(rest)
                }
            }
            Kind::Seq(items) => {
                let item = items.get(first.parse::<usize>().ok()?)?;
                if rest.is_empty() {
                    Some(item.pos)
                } else {
                    item.locate(rest)
                }
            }
            _ => None,
        }
    }

    fn describe(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

impl<'de> de::Deserialize<'de> for Kind {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor)
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_none<E>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Kind, E> {
        Ok(Kind::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Kind, E> {
        Ok(Kind::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
        i64::try_from(v)
            .map(Kind::Int)
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Kind, E> {
        Ok(Kind::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Kind, E> {
        Ok(Kind::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Kind, E> {
        Ok(Kind::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Kind>>()? {
            items.push(Node::from_spanned(item));
        }
        Ok(Kind::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut entries: Vec<(Key, Node)> = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = Node::from_spanned(map.next_value::<Spanned<Kind>>()?);
            let name = key.value.0;
            if entries.iter().any(|(k, _)| k.name == name) {
                return Err(de::Error::custom(format!("duplicate key `{name}`")));
            }
            let pos = Pos {
                line: key.referenced.line() as u32,
                col: key.referenced.column() as u32,
            };
            entries.push((Key { name, pos }, value));
        }
        Ok(Kind::Map(entries))
    }
}

/// A mapping key: any scalar, kept as text (`80: x` and `"80": x` are the same key).
struct KeyText(String);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(KindVisitor)? {
            Kind::Str(s) => Ok(KeyText(s)),
            Kind::Int(i) => Ok(KeyText(i.to_string())),
            Kind::Bool(b) => Ok(KeyText(b.to_string())),
            Kind::Float(f) => Ok(KeyText(f.to_string())),
            _ => Err(de::Error::custom("mapping keys must be scalars")),
        }
    }
}

/// An error met while reading a node, with where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    pub message: String,
    pub pos: Pos,
    pub path: String,
    located: bool,
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for NodeError {}

impl de::Error for NodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        NodeError {
            message: msg.to_string(),
            pos: Pos::default(),
            path: String::new(),
            located: false,
        }
    }
}

impl NodeError {
    /// Attributes an error to the innermost node it came out of.
    fn at(mut self, node: &Node) -> Self {
        if !self.located {
            self.pos = node.pos;
            self.path = node.path.clone();
            self.located = true;
        }
        self
    }
}

impl<'de> de::Deserializer<'de> for &'de Node {
    type Error = NodeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
        let r = match &self.kind {
            Kind::Null => v.visit_unit(),
            Kind::Bool(b) => v.visit_bool(*b),
            Kind::Int(i) => v.visit_i64(*i),
            Kind::Float(x) => v.visit_f64(*x),
            Kind::Str(s) => v.visit_borrowed_str::<NodeError>(s),
            Kind::Seq(items) => v.visit_seq(Items(items.iter())),
            Kind::Map(entries) => v.visit_map(Entries {
                iter: entries.iter(),
                value: None,
            }),
        };
        r.map_err(|e| e.at(self))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
        match self.kind {
            Kind::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
        .map_err(|e| e.at(self))
    }

    /// Scalars read as text where text is wanted: `name: 443` is the string "443".
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
        let r = match &self.kind {
            Kind::Str(s) => v.visit_borrowed_str::<NodeError>(s),
            Kind::Int(i) => v.visit_string(i.to_string()),
            Kind::Bool(b) => v.visit_string(b.to_string()),
            Kind::Float(x) => v.visit_string(x.to_string()),
            _ => Err(de::Error::custom(format!(
                "expected a string, found {}",
                self.describe()
            ))),
        };
        r.map_err(|e| e.at(self))
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
        self.deserialize_str(v)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
        match &self.kind {
            // An empty value where a list is expected (`hosts:`) is an empty list.
            Kind::Null => v.visit_seq(Items([].iter())).map_err(|e| e.at(self)),
            Kind::Seq(_) => self.deserialize_any(v),
            _ => Err(de::Error::custom(format!(
                "expected a list, found {}",
                self.describe()
            )))
            .map_err(|e: NodeError| e.at(self)),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, NodeError> {
        match &self.kind {
            Kind::Null => v
                .visit_map(Entries {
                    iter: [].iter(),
                    value: None,
                })
                .map_err(|e| e.at(self)),
            Kind::Map(_) => self.deserialize_any(v),
            _ => Err(de::Error::custom(format!(
                "expected a mapping, found {}",
                self.describe()
            )))
            .map_err(|e: NodeError| e.at(self)),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, NodeError> {
        self.deserialize_map(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, NodeError> {
        match &self.kind {
            Kind::Str(s) => v.visit_enum(s.as_str().into_deserializer()),
            _ => Err(de::Error::custom(format!(
                "expected a string, found {}",
                self.describe()
            ))),
        }
        .map_err(|e: NodeError| e.at(self))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, NodeError> {
        v.visit_newtype_struct(self).map_err(|e| e.at(self))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit
        unit_struct tuple tuple_struct identifier ignored_any
    }
}

struct Items<'a>(std::slice::Iter<'a, Node>);

impl<'de> SeqAccess<'de> for Items<'de> {
    type Error = NodeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, NodeError> {
        self.0.next().map(|n| seed.deserialize(n)).transpose()
    }
}

struct Entries<'a> {
    iter: std::slice::Iter<'a, (Key, Node)>,
    value: Option<&'a Node>,
}

impl<'de> MapAccess<'de> for Entries<'de> {
    type Error = NodeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, NodeError> {
        match self.iter.next() {
            Some((key, value)) => {
                self.value = Some(value);
                let d: de::value::BorrowedStrDeserializer<'de, NodeError> =
                    de::value::BorrowedStrDeserializer::new(&key.name);
                seed.deserialize(d).map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, NodeError> {
        let node = self
            .value
            .take()
            .ok_or_else(|| <NodeError as de::Error>::custom("value without a key"))?;
        seed.deserialize(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_paths() {
        let docs =
            Node::parse_documents("a: 1\nb:\n  - x: y\n    z: 2\n---\nc: d\n").expect("parses");
        assert_eq!(docs.len(), 2);
        let z = docs[0].get("b").and_then(|b| match &b.kind {
            Kind::Seq(items) => items[0].get("z"),
            _ => None,
        });
        let z = z.expect("b[0].z");
        assert_eq!(z.path, "b[0].z");
        assert_eq!(z.pos, Pos { line: 4, col: 8 });
        assert_eq!(
            docs[0].locate(&["b".into(), "0".into(), "z".into()]),
            Some(Pos { line: 4, col: 5 })
        );
        assert_eq!(docs[1].get("c").and_then(Node::as_str), Some("d"));
    }

    #[test]
    fn errors_point_at_the_value() {
        #[derive(serde::Deserialize, Debug)]
        #[expect(dead_code, reason = "only the error matters")]
        struct P {
            ports: Vec<Port>,
        }
        #[derive(serde::Deserialize, Debug)]
        #[expect(dead_code, reason = "only the error matters")]
        struct Port {
            number: u16,
        }
        let docs =
            Node::parse_documents("ports:\n- number: 80\n- number: 70000\n").expect("parses");
        let err = <P as serde::Deserialize>::deserialize(&docs[0]).expect_err("out of range");
        assert_eq!(err.pos, Pos { line: 3, col: 11 });
        assert_eq!(err.path, "ports[1].number");
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        assert!(Node::parse_documents("a: 1\na: 2\n").is_err());
    }
}
