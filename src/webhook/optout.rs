//! Opt-out keywords: an inbound message whose whole text is one of them marks its
//! sender opted out. Whole-message matching (after trimming punctuation, case and
//! accents) rather than "contains", so "don't stop" or "stop by tomorrow" do not
//! unsubscribe anyone.

use std::collections::HashSet;

/// The defaults: the usual English carrier keywords and their Portuguese counterparts,
/// and the text of the quick-reply button Meta adds to marketing templates (its reply
/// arrives as an inbound message with that text).
pub(crate) const DEFAULT_KEYWORDS: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "OPT OUT",
    "OPTOUT",          // English
    "STOP PROMOTIONS", // Meta's marketing opt-out button
    "SAIR",
    "PARAR",
    "PARE",
    "CANCELAR",
    "DESCADASTRAR",
    "REMOVER", // Portuguese
];

/// A set of normalized opt-out keywords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptOutKeywords(HashSet<String>);

impl Default for OptOutKeywords {
    fn default() -> Self {
        Self::new(DEFAULT_KEYWORDS.iter().copied())
    }
}

impl OptOutKeywords {
    /// Builds the set from keywords as a person writes them (any case, accents).
    /// Blank entries are dropped.
    pub fn new<'a>(keywords: impl IntoIterator<Item = &'a str>) -> Self {
        Self(keywords.into_iter().map(normalize).filter(|k| !k.is_empty()).collect())
    }

    /// Whether the whole text is an opt-out keyword.
    pub fn matches(&self, text: &str) -> bool {
        // Long texts are conversations, not keywords; skip normalizing them.
        text.len() <= 64 && self.0.contains(&normalize(text))
    }

    /// How many keywords there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (opt-out detection is then off).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Upper case, accents folded, surrounding punctuation and emoji dropped, inner
/// whitespace collapsed: "  Parar! " → "PARAR", "não" → "NAO".
fn normalize(text: &str) -> String {
    let folded: String = text.chars().map(fold_accent).flat_map(char::to_uppercase).collect();
    let trimmed = folded.trim_matches(|c: char| !c.is_alphanumeric());
    trimmed.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn fold_accent(c: char) -> char {
    match c {
        'á' | 'à' | 'â' | 'ã' | 'ä' | 'Á' | 'À' | 'Â' | 'Ã' | 'Ä' => 'a',
        'é' | 'è' | 'ê' | 'ë' | 'É' | 'È' | 'Ê' | 'Ë' => 'e',
        'í' | 'ì' | 'î' | 'ï' | 'Í' | 'Ì' | 'Î' | 'Ï' => 'i',
        'ó' | 'ò' | 'ô' | 'õ' | 'ö' | 'Ó' | 'Ò' | 'Ô' | 'Õ' | 'Ö' => 'o',
        'ú' | 'ù' | 'û' | 'ü' | 'Ú' | 'Ù' | 'Û' | 'Ü' => 'u',
        'ç' | 'Ç' => 'c',
        'ñ' | 'Ñ' => 'n',
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_cover_english_and_portuguese() {
        let k = OptOutKeywords::default();
        for yes in [
            "STOP",
            "stop",
            " Stop. ",
            "SAIR",
            "sair!",
            "Parar",
            "CANCELAR",
            "opt  out",
            "🛑 stop 🛑",
            "Descadastrar",
            "Stop promotions",
        ] {
            assert!(k.matches(yes), "{yes}");
        }
        for no in [
            "",
            "stop sending me that on sunday",
            "don't stop",
            "olá",
            "sairemos",
            "STOPP",
            "s t o p",
            "promotions",
            "stop promotions please",
        ] {
            assert!(!k.matches(no), "{no}");
        }
    }

    #[test]
    fn configured_keywords_replace_the_defaults() {
        let k = OptOutKeywords::new(["Não quero", " baja ", ""]);
        assert_eq!(k.len(), 2);
        assert!(k.matches("NAO QUERO") && k.matches("não quero.") && k.matches("BAJA"));
        assert!(!k.matches("STOP"));
        assert!(OptOutKeywords::new([]).is_empty());
    }
}
