//! Topic templates (`outbox.event.{aggregate_type}`) and Kafka's rule for
//! topic names.

/// A topic template: `outbox.event.{aggregate_type}` and the like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    AggregateType,
    EventType,
    Schema,
    Table,
}

impl std::str::FromStr for TopicTemplate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed '{{'"))?
                + open;
            parts.push(match &rest[open + 1..close] {
                "aggregate_type" => TemplatePart::AggregateType,
                "event_type" => TemplatePart::EventType,
                "schema" => TemplatePart::Schema,
                "table" => TemplatePart::Table,
                other => {
                    return Err(format!(
                        "{text:?}: unknown placeholder {{{other}}}; use {{aggregate_type}}, {{event_type}}, {{schema}} or {{table}}"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.into()));
        }
        let template = TopicTemplate {
            parts,
            text: text.into(),
        };
        // The literal parts alone must already be a legal topic name.
        let sample = template.render("a", "e", "s", "t");
        check_topic_name(&sample).map_err(|e| format!("{text:?}: {e}"))?;
        Ok(template)
    }
}

impl TopicTemplate {
    pub fn render(
        &self,
        aggregate_type: &str,
        event_type: &str,
        schema: &str,
        table: &str,
    ) -> String {
        let mut out = String::with_capacity(self.text.len() + aggregate_type.len());
        for part in &self.parts {
            out.push_str(match part {
                TemplatePart::Literal(s) => s,
                TemplatePart::AggregateType => aggregate_type,
                TemplatePart::EventType => event_type,
                TemplatePart::Schema => schema,
                TemplatePart::Table => table,
            });
        }
        out
    }
}

impl TopicTemplate {
    /// Whether `topic` is a name this template renders: for a row of one
    /// of `tables` (its schema and table in their placeholders), or for a
    /// logical decoding message (no schema, no table).
    /// `{aggregate_type}` and `{event_type}` stand for any text.
    pub fn could_render(&self, topic: &str, tables: &[(String, String)]) -> bool {
        let message = (String::new(), String::new());
        tables
            .iter()
            .chain(std::iter::once(&message))
            .any(|(schema, table)| matches_parts(&self.parts, topic, schema, table))
    }
}

fn matches_parts(parts: &[TemplatePart], rest: &str, schema: &str, table: &str) -> bool {
    let Some((part, after)) = parts.split_first() else {
        return rest.is_empty();
    };
    let fixed = match part {
        TemplatePart::Literal(s) => s.as_str(),
        TemplatePart::Schema => schema,
        TemplatePart::Table => table,
        // Any text: try every length (topic names are short).
        TemplatePart::AggregateType | TemplatePart::EventType => {
            return (0..=rest.len())
                .filter(|at| rest.is_char_boundary(*at))
                .any(|at| matches_parts(after, &rest[at..], schema, table));
        }
    };
    rest.strip_prefix(fixed)
        .is_some_and(|rest| matches_parts(after, rest, schema, table))
}

impl std::fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Kafka's rule for topic names.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!(
            "topic name {name:?} must be 1 to 249 characters long"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name {name:?} is reserved"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates_are_validated() {
        assert!(
            "outbox.{nope}"
                .parse::<TopicTemplate>()
                .unwrap_err()
                .contains("unknown placeholder {nope}")
        );
        assert!("outbox.{aggregate_type".parse::<TopicTemplate>().is_err());
        assert!(
            "bad topic {table}"
                .parse::<TopicTemplate>()
                .unwrap_err()
                .contains("' '")
        );
        assert!("events".parse::<TopicTemplate>().is_ok());
    }

    #[test]
    fn every_placeholder_is_replaced() {
        let t: TopicTemplate = "{schema}.{table}.{aggregate_type}.{event_type}"
            .parse()
            .unwrap();
        assert_eq!(
            t.render("order", "Paid", "public", "outbox"),
            "public.outbox.order.Paid"
        );
        assert_eq!(
            t.to_string(),
            "{schema}.{table}.{aggregate_type}.{event_type}"
        );
    }

    #[test]
    fn a_template_recognises_the_topics_it_renders() {
        let tables = [("public".to_owned(), "outbox".to_owned())];
        let default: TopicTemplate = "outbox.event.{aggregate_type}".parse().unwrap();
        assert!(default.could_render("outbox.event.order", &tables));
        assert!(!default.could_render("outbox.events.order", &tables));
        assert!(!default.could_render("other", &tables));

        // Placeholders anywhere: the schema and table are those of the
        // tables, or none (a logical decoding message).
        let t: TopicTemplate = "{aggregate_type}-{schema}.{table}-v1".parse().unwrap();
        assert!(t.could_render("order-public.outbox-v1", &tables));
        assert!(t.could_render("order-.-v1", &tables));
        assert!(!t.could_render("order-sales.outbox-v1", &tables));
        assert!(!t.could_render("order-public.outbox-v2", &tables));

        let two: TopicTemplate = "{aggregate_type}.{event_type}".parse().unwrap();
        assert!(two.could_render("order.Paid", &tables));
        assert!(two.could_render("a.b.c", &tables));
        assert!(!two.could_render("nodot", &tables));
    }
}
