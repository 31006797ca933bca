//! Per-contact rendering of message text and template parameters.
//!
//! A campaign's message may say `Olá {{contact.name}}, sua loja em
//! {{contact.attributes.city}}`. This module turns that into the text for one
//! contact, and refuses rather than guess: a missing value is an error naming the
//! variable, never an empty string (an empty template parameter is rejected by Meta,
//! and "Olá , ..." reaches a customer). Pure: no I/O, so the controller's preflight can
//! use [`variables`] to count contacts lacking a value before anything is sent.
//!
//! Syntax: `{{contact.name}}`, `{{contact.phone}}`, `{{contact.attributes.KEY}}`, with
//! optional whitespace inside the braces (`{{ contact.name }}`). `KEY` is one
//! top-level attribute (dots belong to the key). Numbers and booleans render as text;
//! objects and arrays are errors.

use serde_json::Value;

/// The contact fields a message may use.
#[derive(Debug, Clone, Copy)]
pub struct ContactView<'a> {
    /// Display name, if known.
    pub name: Option<&'a str>,
    /// E.164 phone number with `+`.
    pub phone: &'a str,
    /// Free-form attributes (a JSON object).
    pub attributes: &'a Value,
}

/// One variable a template uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variable {
    /// `{{contact.name}}`.
    Name,
    /// `{{contact.phone}}`.
    Phone,
    /// `{{contact.attributes.KEY}}`.
    Attribute(String),
}

impl Variable {
    /// This variable's text for one contact.
    pub(crate) fn resolve(&self, contact: &ContactView<'_>) -> Result<String, RenderError> {
        let missing = || RenderError::MissingVariable { variable: self.clone() };
        match self {
            Variable::Name => contact.name.filter(|n| !n.trim().is_empty()).map(str::to_owned).ok_or_else(missing),
            Variable::Phone => {
                Some(contact.phone).filter(|p| !p.trim().is_empty()).map(str::to_owned).ok_or_else(missing)
            }
            Variable::Attribute(key) => match contact.attributes.get(key) {
                None | Some(Value::Null) => Err(missing()),
                Some(Value::String(s)) if s.trim().is_empty() => Err(missing()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) => Ok(n.to_string()),
                Some(Value::Bool(b)) => Ok(b.to_string()),
                Some(Value::Array(_)) => Err(RenderError::NotText { variable: self.clone(), kind: "a list" }),
                Some(Value::Object(_)) => Err(RenderError::NotText { variable: self.clone(), kind: "an object" }),
            },
        }
    }
}

impl std::fmt::Display for Variable {
    /// The canonical spelling, as a user would write it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variable::Name => f.write_str("{{contact.name}}"),
            Variable::Phone => f.write_str("{{contact.phone}}"),
            Variable::Attribute(key) => write!(f, "{{{{contact.attributes.{key}}}}}"),
        }
    }
}

/// Why a template could not be rendered for a contact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The contact lacks the value (absent, null or blank).
    #[error("{}", missing_message(variable))]
    MissingVariable {
        /// The variable without a value.
        variable: Variable,
    },
    /// The value is an object or a list, which has no single text form.
    #[error("the contact's value for {variable} is {kind}, not text")]
    NotText {
        /// The variable.
        variable: Variable,
        /// What it is instead.
        kind: &'static str,
    },
    /// `{{...}}` names nothing this module knows.
    #[error("unknown variable {{{{{variable}}}}}: use contact.name, contact.phone or contact.attributes.KEY")]
    UnknownVariable {
        /// What was inside the braces, trimmed.
        variable: String,
    },
    /// `{{` without a closing `}}`.
    #[error("'{{{{' at byte {offset} is never closed with '}}}}'")]
    Unclosed {
        /// Byte offset of the opening braces.
        offset: usize,
    },
}

fn missing_message(variable: &Variable) -> String {
    match variable {
        Variable::Name => format!("contact has no name (used as {variable})"),
        Variable::Phone => format!("contact has no phone (used as {variable})"),
        Variable::Attribute(key) => format!("contact has no attribute '{key}' (used as {variable})"),
    }
}

/// A piece of a parsed template.
enum Piece<'t> {
    Literal(&'t str),
    Variable(Variable),
}

/// Splits a template into literals and variables.
fn parse(template: &str) -> Result<Vec<Piece<'_>>, RenderError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    let mut offset = 0;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Literal(&rest[..open]));
        }
        let inner_start = open + 2;
        let Some(close) = rest[inner_start..].find("}}") else {
            return Err(RenderError::Unclosed { offset: offset + open });
        };
        pieces.push(Piece::Variable(variable(&rest[inner_start..inner_start + close])?));
        let consumed = inner_start + close + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest));
    }
    Ok(pieces)
}

/// Reads what is between the braces.
fn variable(inner: &str) -> Result<Variable, RenderError> {
    let name = inner.trim();
    let unknown = || RenderError::UnknownVariable { variable: name.to_owned() };
    match name {
        "contact.name" => Ok(Variable::Name),
        "contact.phone" => Ok(Variable::Phone),
        _ => match name.strip_prefix("contact.attributes.") {
            Some(key) if !key.is_empty() && !key.contains(char::is_whitespace) && !key.contains(['{', '}']) => {
                Ok(Variable::Attribute(key.to_owned()))
            }
            _ => Err(unknown()),
        },
    }
}

/// Renders a template for one contact. Fails on the first variable without a value.
pub fn render(template: &str, contact: &ContactView<'_>) -> Result<String, RenderError> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        match piece {
            Piece::Literal(text) => out.push_str(text),
            Piece::Variable(variable) => out.push_str(&variable.resolve(contact)?),
        }
    }
    Ok(out)
}

/// The distinct variables a template uses, in order of first use. Malformed or
/// unknown ones are left out: [`validate`] reports those.
pub(crate) fn variables(template: &str) -> Vec<Variable> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let inner_start = open + 2;
        let Some(close) = rest[inner_start..].find("}}") else { break };
        if let Ok(var) = variable(&rest[inner_start..inner_start + close])
            && !found.contains(&var)
        {
            found.push(var);
        }
        rest = &rest[inner_start + close + 2..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render_for(template: &str, name: Option<&str>, attributes: Value) -> Result<String, RenderError> {
        render(template, &ContactView { name, phone: "+5511999999999", attributes: &attributes })
    }

    #[test]
    fn renders_every_kind_of_variable() {
        let attrs = json!({ "city": "Recife", "visits": 3, "ratio": 1.5, "vip": true, "a.b": "dotted" });
        let cases = [
            ("Olá {{contact.name}}!", "Olá Ana!"),
            ("{{ contact.name }}", "Ana"),
            ("{{contact.phone}}", "+5511999999999"),
            ("em {{contact.attributes.city}}", "em Recife"),
            ("{{contact.attributes.visits}} visitas", "3 visitas"),
            ("{{contact.attributes.ratio}}", "1.5"),
            ("{{contact.attributes.vip}}", "true"),
            ("{{ contact.attributes.a.b }}", "dotted"),
            ("no variables at all", "no variables at all"),
            ("", ""),
            ("{{contact.name}}{{contact.name}}", "AnaAna"),
            ("single { brace } stays", "single { brace } stays"),
        ];
        for (template, expected) in cases {
            assert_eq!(render_for(template, Some("Ana"), attrs.clone()).as_deref(), Ok(expected), "{template}");
        }
    }

    #[test]
    fn missing_values_are_errors_naming_the_variable() {
        let err = render_for("Loja em {{contact.attributes.city}}", Some("Ana"), json!({}));
        assert_eq!(err, Err(RenderError::MissingVariable { variable: Variable::Attribute("city".into()) }));
        let message = err.err().map(|e| e.to_string());
        assert_eq!(message.as_deref(), Some("contact has no attribute 'city' (used as {{contact.attributes.city}})"));

        for attrs in [json!({ "city": null }), json!({ "city": "  " }), json!({ "city": "" })] {
            assert!(matches!(
                render_for("{{contact.attributes.city}}", None, attrs),
                Err(RenderError::MissingVariable { .. })
            ));
        }
        for name in [None, Some(""), Some("  ")] {
            let err = render_for("Olá {{contact.name}}", name, json!({}));
            assert_eq!(
                err.err().map(|e| e.to_string()).as_deref(),
                Some("contact has no name (used as {{contact.name}})")
            );
        }
    }

    #[test]
    fn nested_values_are_not_text() {
        let err = render_for("{{contact.attributes.address}}", None, json!({ "address": { "city": "Recife" } }));
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("the contact's value for {{contact.attributes.address}} is an object, not text")
        );
        assert!(matches!(
            render_for("{{contact.attributes.tags}}", None, json!({ "tags": ["a"] })),
            Err(RenderError::NotText { kind: "a list", .. })
        ));
    }

    #[test]
    fn unknown_and_malformed_variables_are_errors() {
        let err = render_for("Hi {{contact.email}}", None, json!({}));
        assert_eq!(err, Err(RenderError::UnknownVariable { variable: "contact.email".into() }));
        assert_eq!(
            err.err().map(|e| e.to_string()).as_deref(),
            Some("unknown variable {{contact.email}}: use contact.name, contact.phone or contact.attributes.KEY")
        );
        assert!(matches!(render_for("{{1}}", None, json!({})), Err(RenderError::UnknownVariable { .. })));
        assert!(matches!(
            render_for("{{contact.attributes.}}", None, json!({})),
            Err(RenderError::UnknownVariable { .. })
        ));
        assert!(matches!(
            render_for("{{contact.attributes.my key}}", None, json!({})),
            Err(RenderError::UnknownVariable { .. })
        ));
        assert_eq!(render_for("ok {{contact.name", Some("Ana"), json!({})), Err(RenderError::Unclosed { offset: 3 }));
    }

    #[test]
    fn variables_lists_distinct_valid_variables_in_order() {
        let vars = variables(
            "{{contact.attributes.city}} {{ contact.name }} {{contact.attributes.city}} {{bogus}} {{contact.phone}}",
        );
        assert_eq!(vars, vec![Variable::Attribute("city".into()), Variable::Name, Variable::Phone]);
        assert_eq!(vars[0], Variable::Attribute("city".into()));
        assert!(variables("plain").is_empty());
        assert_eq!(Variable::Attribute("city".into()).to_string(), "{{contact.attributes.city}}");
    }
}
