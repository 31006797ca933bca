//! `disparo contacts import`: loads contacts from CSV (with a header) or JSON lines into
//! an organization, streaming the file in batches so a million rows never sit in memory,
//! validating every phone number with libphonenumber's rules, and reporting each
//! rejected row with its line number while the good rows load.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use sqlx::PgPool;

use crate::store::contacts::{self, NewContact};

/// Arguments of `contacts import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Organization (Kubernetes namespace) the contacts belong to.
    #[arg(long, short = 'n')]
    pub namespace: String,
    /// CSV file with a header row (`phone`, optional `name`, `tags`, other columns become
    /// attributes) or JSON lines (`{"phone":..,"name":..,"tags":[..],"attributes":{..}}`).
    pub file: PathBuf,
    /// Input format; guessed from the file extension when omitted.
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// Region used for numbers written without a country code (ISO 3166 code, e.g. BR).
    #[arg(long)]
    pub default_region: Option<String>,
    /// Rows per upsert statement.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// One rejected row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line number in the file.
    pub line: u64,
    /// Why it was rejected.
    pub reason: String,
}

/// The final report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Data rows read.
    pub read: u64,
    /// New contacts.
    pub inserted: u64,
    /// Existing contacts updated (including rows repeating a phone seen earlier in the file).
    pub updated: u64,
    /// Rows rejected, with line numbers.
    pub rejected: Vec<Rejected>,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "rows read: {}", self.read)?;
        writeln!(f, "inserted:  {}", self.inserted)?;
        writeln!(f, "updated:   {}", self.updated)?;
        writeln!(f, "rejected:  {}", self.rejected.len())?;
        for r in &self.rejected {
            writeln!(f, "  line {}: {}", r.line, r.reason)?;
        }
        Ok(())
    }
}

/// Normalizes a phone number to E.164, or says why it is not a valid number.
pub fn normalize_phone(raw: &str, default_region: Option<phonenumber::country::Id>) -> Result<String, String> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("phone is empty".into());
    }
    let number = phonenumber::parse(default_region, trimmed).map_err(|e| format!("phone {trimmed:?} is not a phone number ({e})"))?;
    if !phonenumber::is_valid(&number) {
        return Err(format!("phone {trimmed:?} is not a valid number for its country"));
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

/// A row before phone validation.
#[derive(Debug, Default)]
struct RawRow {
    phone: String,
    name: Option<String>,
    tags: Vec<String>,
    attributes: Map<String, Value>,
}

fn split_tags(raw: &str) -> Vec<String> {
    raw.split(['|', ';', ','])
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

fn row_from_json(line: &str) -> Result<RawRow, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = value else { return Err("expected a JSON object".into()) };
    let phone = match obj.remove("phone") {
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("phone must be a string".into()),
        None => return Err("missing field phone".into()),
    };
    let name = match obj.remove("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Some(Value::String(_) | Value::Null) | None => None,
        Some(_) => return Err("name must be a string".into()),
    };
    let tags = match obj.remove("tags") {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|t| match t {
                Value::String(s) => Ok(s),
                _ => Err("tags must be strings".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::String(s)) => split_tags(&s),
        Some(Value::Null) | None => Vec::new(),
        Some(_) => return Err("tags must be a list of strings".into()),
    };
    let attributes = match obj.remove("attributes") {
        Some(Value::Object(map)) => map,
        Some(Value::Null) | None => Map::new(),
        Some(_) => return Err("attributes must be an object".into()),
    };
    Ok(RawRow { phone, name, tags, attributes })
}

/// Validates and batches rows, upserting each full batch.
struct Loader<'a> {
    pool: &'a PgPool,
    organization: &'a str,
    region: Option<phonenumber::country::Id>,
    batch_size: usize,
    batch: Vec<NewContact>,
    index: HashMap<String, usize>,
    report: ImportReport,
}

impl<'a> Loader<'a> {
    async fn accept(&mut self, line: u64, row: Result<RawRow, String>) -> anyhow::Result<()> {
        self.report.read += 1;
        let row = match row {
            Ok(row) => row,
            Err(reason) => {
                self.report.rejected.push(Rejected { line, reason });
                return Ok(());
            }
        };
        let phone = match normalize_phone(&row.phone, self.region) {
            Ok(p) => p,
            Err(reason) => {
                self.report.rejected.push(Rejected { line, reason });
                return Ok(());
            }
        };
        let contact = NewContact { phone: phone.clone(), name: row.name, tags: row.tags, attributes: Value::Object(row.attributes), whatsapp_id: None };
        // One statement cannot upsert the same row twice: a phone repeated within a batch
        // keeps its last row, and counts as an update.
        if let Some(&at) = self.index.get(&phone) {
            self.batch[at] = contact;
            self.report.updated += 1;
        } else {
            self.index.insert(phone, self.batch.len());
            self.batch.push(contact);
        }
        if self.batch.len() >= self.batch_size {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let done = contacts::upsert(self.pool, self.organization, &self.batch).await.context("upserting contacts")?;
        self.report.inserted += done.inserted;
        self.report.updated += done.updated;
        self.batch.clear();
        self.index.clear();
        Ok(())
    }
}

/// Counts bytes read so the progress bar can follow the file without knowing the rows.
struct Counted<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{spinner} importing [{bar:40}] {bytes}/{total_bytes} ({eta} left)") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn guess_format(path: &Path) -> InputFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl" | "ndjson" | "json") => InputFormat::Jsonl,
        _ => InputFormat::Csv,
    }
}

/// Imports a file into an organization and returns the report (rejected rows do not
/// stop the import).
pub async fn import_file(
    pool: &PgPool,
    organization: &str,
    path: &Path,
    format: Option<InputFormat>,
    default_region: Option<&str>,
    batch_size: usize,
) -> anyhow::Result<ImportReport> {
    let region = match default_region {
        Some(code) => Some(code.to_ascii_uppercase().parse::<phonenumber::country::Id>().map_err(|_| anyhow::anyhow!("unknown region {code:?}"))?),
        None => None,
    };
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(len);
    let reader = BufReader::new(Counted { inner: file, bar: bar.clone() });
    let mut loader = Loader {
        pool,
        organization,
        region,
        batch_size: batch_size.max(1),
        batch: Vec::with_capacity(batch_size.max(1)),
        index: HashMap::new(),
        report: ImportReport::default(),
    };
    match format.unwrap_or_else(|| guess_format(path)) {
        InputFormat::Jsonl => {
            for (i, line) in reader.lines().enumerate() {
                let line = line.with_context(|| format!("reading line {}", i + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                loader.accept(i as u64 + 1, row_from_json(&line)).await?;
            }
        }
        InputFormat::Csv => {
            let mut csv = csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).from_reader(reader);
            let headers: Vec<String> = csv.headers().context("reading the CSV header")?.iter().map(|h| h.to_ascii_lowercase()).collect();
            let Some(phone_col) = headers.iter().position(|h| h == "phone") else {
                bail!("the CSV header has no 'phone' column (found: {})", headers.join(", "));
            };
            let mut record = csv::StringRecord::new();
            loop {
                let line = csv.position().line() + 1;
                match csv.read_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {
                        let line = record.position().map_or(line, |p| p.line());
                        let row = row_from_csv(&headers, phone_col, &record);
                        loader.accept(line, row).await?;
                    }
                    Err(e) => {
                        let line = e.position().map_or(line, |p| p.line());
                        loader.accept(line, Err(format!("unreadable CSV row: {e}"))).await?;
                    }
                }
            }
        }
    }
    loader.flush().await?;
    bar.finish_and_clear();
    Ok(loader.report)
}

fn row_from_csv(headers: &[String], phone_col: usize, record: &csv::StringRecord) -> Result<RawRow, String> {
    if record.len() != headers.len() {
        return Err(format!("expected {} fields, found {}", headers.len(), record.len()));
    }
    let mut row = RawRow { phone: record.get(phone_col).unwrap_or_default().to_owned(), ..Default::default() };
    for (header, value) in headers.iter().zip(record.iter()) {
        match header.as_str() {
            "phone" => {}
            "name" => row.name = Some(value.to_owned()).filter(|v| !v.is_empty()),
            "tags" => row.tags = split_tags(value),
            key if !value.is_empty() => {
                row.attributes.insert(key.to_owned(), Value::String(value.to_owned()));
            }
            _ => {}
        }
    }
    Ok(row)
}

/// Runs the command: imports, prints the report, fails when any row was rejected.
pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let pool = crate::store::connect(&args.database_url, 4).await.context("connecting to Postgres")?;
    let report = import_file(&pool, &args.namespace, &args.file, args.format, args.default_region.as_deref(), args.batch_size).await?;
    print!("{report}");
    if !report.rejected.is_empty() {
        bail!("{} row(s) rejected; the other rows were imported", report.rejected.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalize_to_e164() {
        assert_eq!(normalize_phone("+55 11 99999-9999", None).unwrap(), "+5511999999999");
        assert_eq!(normalize_phone("(11) 99999-9999", Some(phonenumber::country::Id::BR)).unwrap(), "+5511999999999");
        assert_eq!(normalize_phone("+1 650-253-0000", None).unwrap(), "+16502530000");
    }

    #[test]
    fn bad_phones_say_why() {
        assert!(normalize_phone("", None).unwrap_err().contains("empty"));
        assert!(normalize_phone("hello", None).is_err());
        assert!(normalize_phone("+55 11 123", None).unwrap_err().contains("not a valid number"));
        // no country code and no default region
        assert!(normalize_phone("11999999999", None).is_err());
    }

    #[test]
    fn json_rows_parse_and_reject_clearly() {
        let row = row_from_json(r#"{"phone":"+5511999999999","name":"Ana","tags":["vip"],"attributes":{"city":"SP"}}"#).unwrap();
        assert_eq!(row.tags, vec!["vip"]);
        assert_eq!(row.attributes["city"], "SP");
        assert_eq!(row_from_json(r#"{"name":"x"}"#).unwrap_err(), "missing field phone");
        assert!(row_from_json("{").unwrap_err().starts_with("invalid JSON"));
    }

    #[test]
    fn tags_split_on_common_separators() {
        assert_eq!(split_tags("vip| sp ;new,"), vec!["vip", "sp", "new"]);
    }
}
